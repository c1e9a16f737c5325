"""What ``--ckpt_path`` means for ``drpo fit|validate|test``, checked before any model weights load.

- ``--ckpt_path last`` is the newest ``last*.ckpt`` of *this config's run folder*: every ``version_*/checkpoints``
  under the logger's ``save_dir/name`` (each ``drpo fit`` writes a new version folder), or the checkpoint
  callback's fixed ``dirpath``. None there is a one-line error: a resume never silently trains from step 0.
- ``--ckpt_path FILE`` and ``last`` behave the same. The file must be a checkpoint ``torch.load`` reads with
  ``weights_only=True`` (a text file, a truncated or empty archive is one line naming it).
- The config wins over the checkpoint. LightningCLI would apply the checkpoint's stored hyperparameters over
  the config, so a checkpoint could switch ``trust_remote_code`` on, point ``model_name_or_path`` at a folder
  of its choosing or silently undo command-line values; drpo-lightning never reads them into the config.
  Settings that differ from the checkpoint's and change what training does are reported in one line.
- The optimizer must be the one the checkpoint's state belongs to (AdamW moments resumed into SGD would be
  loaded as nonsense or fail at the first step).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from drpo_lightning.errors import ConfigError

#: RLModule settings that do not change the updates (a resume with other values still continues exactly).
NOT_TRAINING = frozenset({
    "export_dir", "merge_adapters_on_export", "val_num_samples", "val_success_threshold", "reward_timeout",
    "max_consecutive_skips", "trust_remote_code", "logprob_chunk_size", "gradient_checkpointing",
})


def checkpoint_folders(trainer: Any) -> list[Path]:
    """Where this config's runs keep their checkpoints: each ModelCheckpoint's fixed ``dirpath``, else every
    version folder of the first logger (Lightning's default layout), else ``default_root_dir/checkpoints``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    folders: list[Path] = []
    for callback in trainer.callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        if callback.dirpath:
            folders.append(Path(callback.dirpath))
        elif trainer.loggers:
            logger = trainer.loggers[0]
            root = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name or "")
            folders.extend(sorted(p for p in root.glob("*/checkpoints") if p.is_dir()) or [root / "*" / "checkpoints"])
        else:
            folders.append(Path(trainer.default_root_dir) / "checkpoints")
    return list(dict.fromkeys(folders))


class NothingToResume(ConfigError):
    """``ckpt_path: last`` found no checkpoint."""


def find_last(trainer: Any) -> Path:
    """The newest ``last*.ckpt`` in :func:`checkpoint_folders` (by modification time, as Lightning picks)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    folders = checkpoint_folders(trainer)
    if not any(isinstance(cb, ModelCheckpoint) for cb in trainer.callbacks):
        raise ConfigError("ckpt_path: last needs a checkpoint callback (trainer.callbacks: RLCheckpoint), and this "
                          "config has none")
    found = [p for folder in folders if folder.is_dir() for p in folder.glob("last*.ckpt")
             if not p.name.startswith(".")]
    if not found:
        where = ", ".join(str(f) for f in folders)
        raise NothingToResume(f"ckpt_path: last: no last checkpoint in {where}; nothing to resume (leave out "
                              "--ckpt_path, or use --ckpt_path auto, to start a new run)")
    return max(found, key=lambda p: p.lstat().st_mtime)


def load_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's contents without copying its tensors (memory-mapped), or one line saying why not."""
    if not path.exists():
        raise ConfigError(f"ckpt_path: {path} does not exist")
    target = path.resolve()
    if target.is_dir():  # a sharded checkpoint: Lightning keeps everything but the shards in meta.pt
        meta = target / "meta.pt"
        if not meta.is_file():
            raise ConfigError(f"ckpt_path: {path} is a folder without meta.pt: not a sharded checkpoint")
        target = meta
    try:
        loaded = torch.load(target, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a text file, a truncated or empty archive, pickled objects, ...
        if "Weights only load failed" in str(err):
            message = pickled_checkpoint_message(err)
            if message is None:
                raise  # a checkpoint drpo-lightning wrote itself is refused: a bug, keep the traceback
            raise ConfigError(message) from err
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"ckpt_path: {path} is not a checkpoint drpo can resume from: {reason}") from err
    if not isinstance(loaded, dict) or "global_step" not in loaded:
        raise ConfigError(f"ckpt_path: {path} is not a checkpoint written by drpo fit (no global_step in it)")
    return loaded


def pickled_checkpoint_message(err: BaseException) -> str | None:
    """One line for a checkpoint that ``torch.load(weights_only=True)`` refused because it pickles Python
    objects; None when the refused object is drpo-lightning's or Lightning's own (then it is a bug of ours)."""
    import re

    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    if unsupported and unsupported.group(1).startswith(("drpo_lightning.", "lightning.")):
        return None
    what = f" ({unsupported.group(1)})" if unsupported else ""
    return (f"ckpt_path: the checkpoint holds pickled Python objects{what}, which weights-only loading refuses "
            "(nothing in it was run); resume only from checkpoints written by drpo fit")


def setting_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``model.key value (checkpoint: other)`` for each training setting the config changes."""
    conflicts = []
    for key, value in current.items():
        if key in NOT_TRAINING or key not in saved or key.startswith("_"):
            continue
        old = saved[key]
        if _plain(old) != _plain(value):
            conflicts.append(f"model.{key} {_plain(value)!r} (checkpoint: {_plain(old)!r})")
    return conflicts


def _plain(value: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def optimizer_name(optimizer: Any) -> str:
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def check_optimizer(saved: dict[str, Any], optimizer_factory: Any) -> None:
    """The configured optimizer is the class whose state the checkpoint holds (``RLCheckpoint`` records it):
    AdamW's moments loaded into SGD would be silently meaningless or fail at the first step."""
    stored = saved.get("drpo_optimizer")
    if not stored or optimizer_factory is None:
        return  # a checkpoint written without RLCheckpoint: Lightning's own loading decides
    try:
        configured = optimizer_name(optimizer_factory([torch.nn.Parameter(torch.zeros(1))]))
    except Exception:  # a bad optimizer setting is reported by its own check
        return
    if configured != stored:
        raise ConfigError(
            f"ckpt_path: the checkpoint holds the state of {stored} and model.optimizer is {configured}; resume "
            "with the optimizer it was saved with, or start a new run from its exported weights"
        )


def describe(path: Path) -> str:
    """``path`` relative to the working folder when it is inside it (shorter messages)."""
    try:
        return str(path.resolve().relative_to(Path(os.getcwd()).resolve()))
    except ValueError:
        return str(path)
