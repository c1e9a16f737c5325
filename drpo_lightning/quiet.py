"""Silence what a ``drpo`` run would print that the user cannot act on.

``install()`` is called by the CLI before Lightning, transformers or bitsandbytes are imported: environment
variables they read at import time and ``logging`` filters on loggers they create later only work then.
Every entry below names its source, so a filter that stops matching (a library renamed its message) is easy
to find; ``tests/test_first_ten_minutes.py`` runs a real ``drpo fit`` and fails when one shows up again.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

WARNING_MESSAGES = (
    # torch 2.13 deprecated LeafSpec; Lightning 2.6's own _pytree.py still uses it (once per loop start).
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # transformers 5 renamed the property; peft (PeftModel.__init__) still reads the old name.
    r"`is_gradient_checkpointing` is deprecated",
)
"""Regexes (matched at the start of the message) of warnings that come from libraries, not the config."""

LOG_MESSAGES = {
    # Advertisements for Lightning's cloud products, printed on every run.
    # ... and the note that our one-line model summary replaces Lightning's table (summary.add_run_callbacks).
    "lightning.pytorch.utilities.rank_zero": (r"💡 Tip:", r"Trainer already configured with model summary"),
    "lightning.fabric.utilities.rank_zero": (r"💡 Tip:",),
    # bitsandbytes tries an optional download of a faster CPU kernel; without network it works as before.
    "bitsandbytes.backends.cpu.ops": (r"Failed to load CPU gemm_4bit_forward",),
}
"""Logger name -> regexes of records dropped from it."""

ENVIRONMENT = {
    # transformers shows a tqdm bar for loading a safetensors file and writing the export ("Loading
    # weights", "Writing model shards"): noise for a model that loads in milliseconds, and a bar inside the
    # training bar otherwise. huggingface_hub's switch, read by transformers at import time.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
"""Environment defaults; a value the user set wins."""


class _DropMessages(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def install() -> None:
    """Apply the filters above to this process. Idempotent; ``DRPO_VERBOSE=1`` turns it off."""
    if os.environ.get("DRPO_VERBOSE"):
        return
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1" and "huggingface_hub" in sys.modules:
        # imported before us (a script that imports transformers first): the switch was already read
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    for pattern in WARNING_MESSAGES:
        warnings.filterwarnings("ignore", message=pattern)
    for name, patterns in LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))
