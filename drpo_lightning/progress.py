"""A one-line progress bar that counts what the user configured: rollouts (and updates when they differ).

Lightning's bars count batches of the current epoch (``Epoch 0/-2`` when ``max_steps`` ends the run, as
it does for RL) and show ``v_num``. Here a batch of prompts is one rollout step; with ``ppo_epochs x
num_minibatches`` updates per rollout, ``trainer.max_steps`` (updates) is translated back into rollouts, so
a finished run always ends at ``N/N``::

    step 37/100 · reward 0.812 · val/accuracy 0.652 · corrected 0.06% · 1.5 s/step · 0:55 < 1:34

In a terminal the line is redrawn in place and the last state is printed exactly once; in a log file (not
a terminal) one line is written every tenth of the run and after each held-out evaluation.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

TRUST_REGION_METRICS = (
    ("corrected", ("drpo/corrective_frac",)),
    ("masked", ("dppo/masked_frac",)),
    ("clipped", ("ppo/clip_frac_low", "ppo/clip_frac_high")),
)
"""Bar label -> the objective's metrics summed into it: the share of tokens its trust region acted on."""
_NOT_OBJECTIVE = ("reward", "val", "train", "perf", "completion", "advantage", "test")


def updates_per_rollout(pl_module: Any) -> int:
    hparams = getattr(pl_module, "hparams", {}) or {}
    return max(1, int(hparams.get("ppo_epochs", 1) or 1) * int(hparams.get("num_minibatches", 1) or 1))


def planned_rollouts(trainer: Any, pl_module: Any) -> int | None:
    """Rollout steps the run will make: ``max_steps`` updates, or ``max_epochs`` passes; None if unbounded."""
    limits = []
    if trainer.max_steps is not None and trainer.max_steps > 0:
        limits.append(math.ceil(trainer.max_steps / updates_per_rollout(pl_module)))
    batches = trainer.num_training_batches
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(batches):
        limits.append(int(trainer.max_epochs * batches))
    return min(limits) if limits else None


def rollouts_done(trainer: Any) -> int:
    return int(trainer.fit_loop.epoch_loop.batch_progress.total.ready)


def trust_region_text(metrics: dict[str, Any]) -> str | None:
    """``corrected 0.4%`` for the objective's own trust-region share; a plugin's first ``*_frac`` metric."""
    for label, keys in TRUST_REGION_METRICS:
        if all(key in metrics for key in keys):
            return f"{label} {100 * sum(float(metrics[key]) for key in keys):.2f}%"
    for key, value in metrics.items():
        if "/" in key and key.split("/", 1)[0] not in _NOT_OBJECTIVE and key.endswith("_frac"):
            return f"{key} {100 * float(value):.2f}%"
    return None


def clock(seconds: float) -> str:
    """``M:SS`` or ``H:MM:SS``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class StepProgressBar(ProgressBar):
    """Rollout steps out of the planned total, reward, held-out accuracy and the trust region's share.

    Args:
        refresh_seconds: least time between two redraws in a terminal.
        interactive: redraw one line in place (a terminal) or write lines (a log); None: ``isatty()``.
    """

    def __init__(self, refresh_seconds: float = 0.25, interactive: bool | None = None) -> None:
        super().__init__()
        self.refresh_seconds = refresh_seconds
        self.interactive = interactive
        self._enabled = True
        self._line = ""  # what is drawn in the terminal now (cleared before any other output)
        self._last_draw = 0.0
        self._start = None
        self._start_rollouts = 0
        self._pending = ""  # a log line that is due (not a terminal)
        self._finished = False

    # -- ProgressBar interface ---------------------------------------------------------------------
    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        self._clear()
        print(*args, **kwargs)
        if self._line and self._tty():
            self._write("\r" + self._line)

    # -- drawing -----------------------------------------------------------------------------------
    def _tty(self) -> bool:
        if self.interactive is not None:
            return self.interactive
        return bool(getattr(sys.stdout, "isatty", lambda: False)())

    def _write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def _clear(self) -> None:
        if self._line and self._tty():
            self._write("\r\x1b[2K")
            self._last_draw = 0.0  # redraw at the next update, below whatever is printed now

    def _text(self, trainer: Any, pl_module: Any, extra: str = "") -> str:
        done, total = rollouts_done(trainer), planned_rollouts(trainer, pl_module)
        total = None if total is None else max(total, done)
        per = updates_per_rollout(pl_module)
        if per > 1:  # the config's max_steps counts updates: show both, each ending at its own total
            update_total = None if total is None else total * per
            parts = [f"rollout {done}/{total or '?'} · update {trainer.global_step}/{update_total or '?'}"]
        else:
            parts = [f"step {done}/{total or '?'}"]
        metrics = trainer.callback_metrics
        if "reward" in metrics:
            parts.append(f"reward {float(metrics['reward']):.3f}")
        if "val/accuracy" in metrics:
            parts.append(f"val/accuracy {float(metrics['val/accuracy']):.3f}")
        trust = trust_region_text(metrics)
        if trust:
            parts.append(trust)
        if self._start is not None and done > self._start_rollouts:
            elapsed = time.monotonic() - self._start
            per_step = elapsed / (done - self._start_rollouts)
            timing = f"{per_step:.2f} s/step · {clock(elapsed)}"
            if total is not None:
                timing += f" < {clock(per_step * (total - done))}"
            parts.append(timing)
        if extra:
            parts.append(extra)
        return " · ".join(parts)

    def _draw(self, text: str, force: bool = False) -> None:
        if not self._enabled or self._finished:
            return
        now = time.monotonic()
        if self._tty():
            if force or now - self._last_draw >= self.refresh_seconds:
                self._write("\r\x1b[2K" + text)
                self._last_draw = now
            self._line = text
        elif force:
            self._write(text + "\n")

    # -- hooks -------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.monotonic()
        self._start_rollouts = rollouts_done(trainer)
        self._finished = False
        if self._tty():  # Lightning's messages during training ("`Trainer.fit` stopped: ...") get a line of
            for handler in logging.getLogger("lightning.pytorch").handlers:  # their own, the bar moves below
                handler.addFilter(self._clear_before_log)
        self._draw(self._text(trainer, pl_module), force=self._tty())

    def _clear_before_log(self, record: logging.LogRecord) -> bool:
        self._clear()
        return True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done, total = rollouts_done(trainer), planned_rollouts(trainer, pl_module)
        if self._tty():
            self._draw(self._text(trainer, pl_module), force=done == total)
        elif done % max(1, (total or 100) // 10) == 0 or done == total:
            # written at the next batch, or replaced by the line after the evaluation that may follow
            self._pending = self._text(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._flush_pending()

    def _flush_pending(self) -> None:
        if self._pending:
            text, self._pending = self._pending, ""
            self._draw(text, force=True)

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        if self._tty():  # a log gets the module's "held-out accuracy before training" line instead
            self._draw("held-out evaluation before training", force=True)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self._tty():
            return
        batches = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        total = batches[dataloader_idx] if dataloader_idx < len(batches) else float("inf")
        where = "before training" if trainer.sanity_checking else "held-out"
        extra = f"{where} evaluation {batch_idx + 1}/{total if math.isfinite(total) else '?'}"
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        text = self._text(trainer, pl_module, extra) if fitting else extra
        self._draw(text)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            self._clear()
            self._line = ""
            return
        if trainer.state.fn == "fit":
            self._pending = ""
            self._draw(self._text(trainer, pl_module), force=True)
        else:  # drpo validate / test: Lightning prints its results table next
            self._clear()
            self._line = ""

    def on_train_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._finish(trainer, pl_module)

    def _finish(self, trainer, pl_module) -> None:
        """The last state, once: a terminal keeps the drawn line and moves below it."""
        if self._finished or not self._enabled:
            return
        self._flush_pending()
        if self._tty() and self._line:
            self._write("\r\x1b[2K" + self._text(trainer, pl_module) + "\n")
        self._line = ""
        self._finished = True
        for handler in logging.getLogger("lightning.pytorch").handlers:
            handler.removeFilter(self._clear_before_log)


class ParamsSummary(ModelSummary):
    """The model summary as one line. Lightning's table lists the module's metric objects and a FLOPs
    column that is always 0 here (an RL module has no ``example_input_array`` to count them on)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self._max_depth or not trainer.is_global_zero:
            return
        from lightning.pytorch.utilities.model_summary import summarize
        from lightning.pytorch.utilities.model_summary.model_summary import (
            get_formatted_model_size,
            get_human_readable_count,
        )

        summary = summarize(pl_module, max_depth=1)
        policy = getattr(pl_module, "policy", None)
        name = type(policy).__name__ if policy is not None else type(pl_module).__name__
        where = getattr(getattr(pl_module, "hparams", None), "get", lambda *_: None)("model_name_or_path")
        trainable, total = summary.trainable_parameters, summary.total_parameters
        print(f"policy: {name}{f' ({where})' if where else ''}, {get_human_readable_count(total).strip()} "
              f"parameters ({get_human_readable_count(trainable).strip()} trainable, "
              f"{get_formatted_model_size(summary.model_size)} MB)", flush=True)
