"""Checkpoints that survive being killed, a clean stop on SIGTERM, and exact resume of the random streams.

- :class:`RLCheckpoint` is Lightning's ``ModelCheckpoint`` with two additions:

  * **atomic writes**: every checkpoint is first written under a hidden temporary name in the same folder and
    only then moved into place. A single-file checkpoint is moved with ``os.replace`` (atomic on POSIX). A
    sharded checkpoint (a folder: FSDP ``state_dict_type: sharded``, FSDP2 ``ModelParallelStrategy``) is
    written to a hidden folder and published by atomically replacing a symbolic link (``last.ckpt ->
    .last.ckpt.d-000120``), since a non-empty folder cannot be replaced atomically. A process killed at any
    moment (even SIGKILL) therefore leaves the previous checkpoint of that name intact and loadable, plus at
    most some hidden ``*.partial*`` leftovers, which are ignored by ``ckpt_path: last``.
  * **save on SIGTERM** (``save_on_sigterm``, default on): Lightning stops a run that receives SIGTERM
    (preemption, ``scancel``, Kubernetes) at the end of the current step by raising ``SIGTERMException``;
    this callback then writes the checkpoint (and ``last``) for that step, and the process exits with code 0.
    ``drpo fit ... --ckpt_path last`` continues from it.

- :class:`AtomicCheckpointIO` is a ``CheckpointIO`` plugin (``trainer.plugins``) that makes *every*
  single-file save atomic (also ``trainer.save_checkpoint`` called by hand or by Lightning's SLURM requeue
  handler) and writes straight into the target folder: Lightning's default ``TorchCheckpointIO`` stages the
  file in the system temporary folder and copies it across file systems when that differs from the
  checkpoint folder.

- :func:`gather_rng_states` / :func:`restore_rng_states`: Lightning does not save random-number-generator
  states. :class:`~drpo_lightning.module.RLModule` stores every rank's torch, CUDA, numpy and Python states in
  the checkpoint and restores them right before the first resumed step, so sampling continues exactly as if
  the run had never stopped. The states are stored as tensors and plain Python values, so checkpoints load
  with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from drpo_lightning.errors import ConfigError, UserError

__all__ = [
    "AtomicCheckpointIO",
    "RLCheckpoint",
    "collect_rng_state",
    "gather_rng_states",
    "restore_rng_states",
    "set_rng_state",
]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _is_local(path: str | os.PathLike[str]) -> bool:
    return "://" not in str(path)


def _write_failure(err: BaseException, folder: Path) -> str:
    """Why a write failed, in a few words: the OS's reason, or the free space when torch hides it."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return str(err).strip().splitlines()[0][:120]
    return f"{free / 2**20:.0f} MiB free on that disk: probably full" if free < 2**30 else str(err).splitlines()[0][:120]


def _remove(path: Path) -> None:
    """Remove a file, a symbolic link (and the hidden folder it points to) or a folder; missing is fine."""
    if path.is_symlink():
        target = path.resolve()
        path.unlink()
        if target.is_dir() and target.name.startswith("."):
            shutil.rmtree(target, ignore_errors=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


# ------------------------------------------------------------------------------------------------ CheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a hidden temporary file next to the target, ``fsync``, then ``os.replace``.

    Use it as ``trainer.plugins: [{class_path: drpo_lightning.checkpoint.AtomicCheckpointIO}]``. Remote
    paths (``s3://...``) fall back to Lightning's default behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            self._before_commit(partial, target)
            os.replace(partial, target)
            _fsync_dir(target.parent)
        except (OSError, RuntimeError) as err:
            # torch's zip writer reports a full disk as "unexpected pos"; say what happened and what survived.
            # Name the checkpoint the user will look for, not RLCheckpoint's hidden staging name.
            public = target.with_name(target.name[1:].split(".partial-")[0]) if ".partial-" in target.name else target
            raise UserError(f"checkpoint {public}: could not be written ({_write_failure(err, target.parent)}); "
                            "the checkpoints already saved are intact") from err
        finally:
            if partial.exists():
                partial.unlink()
        return None

    def _before_commit(self, partial: Path, target: Path) -> None:
        """Called after the data is on disk and before it is moved into place (a test hook)."""


# ------------------------------------------------------------------------------------------------ ModelCheckpoint


class RLCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with atomic writes (files and sharded folders) and a checkpoint on SIGTERM.

    Takes every argument of Lightning's ``ModelCheckpoint`` (``dirpath``, ``every_n_train_steps``,
    ``save_last``, ``save_top_k``, ...), plus:

    Args:
        save_on_sigterm: when the run is stopped by SIGTERM, save a checkpoint (and ``last``) of the step that
            just finished before the process exits.
    """

    def __init__(self, *args: Any, save_on_sigterm: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.save_on_sigterm = save_on_sigterm
        self._lock = None

    # -- one run per folder, and what killed runs left behind ----------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or not self.dirpath or not _is_local(self.dirpath):
            return
        if trainer.is_global_zero:
            folder = Path(self.dirpath)
            folder.mkdir(parents=True, exist_ok=True)
            self._lock = _lock_folder(folder)
            removed = remove_stale_partials(folder)
            if removed:
                rank_zero_info(f"removed {removed} partial checkpoint(s) left in {folder} by a killed run")
        trainer.strategy.barrier("drpo-checkpoint-lock")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    # -- atomic save ------------------------------------------------------------------------------------
    def _save_checkpoint(self, trainer, filepath: str) -> None:
        if not _is_local(filepath):
            return super()._save_checkpoint(trainer, filepath)
        final = Path(filepath)
        staging = final.with_name(f".{final.name}.partial-{trainer.global_step}")
        if trainer.is_global_zero:
            final.parent.mkdir(parents=True, exist_ok=True)
            _remove(staging)  # a leftover of a run killed while saving this step
        trainer.strategy.barrier("drpo-checkpoint-staging")
        super()._save_checkpoint(trainer, str(staging))  # all ranks write (sharded folders: their shard)
        if trainer.is_global_zero:
            self._publish(staging, final, trainer.global_step)
        trainer.strategy.barrier("drpo-checkpoint-publish")
        self._last_checkpoint_saved = str(final)

    def _publish(self, staging: Path, final: Path, step: int) -> None:
        self._before_publish(staging, final)
        if staging.is_dir():
            # A folder cannot atomically replace a non-empty folder: keep it under a hidden name and switch
            # a symbolic link to it atomically.
            data = final.with_name(f".{final.name}.d-{step:09d}")
            _remove(data)
            os.replace(staging, data)
            old_target = final.resolve() if final.is_symlink() else None
            if final.exists() and not final.is_symlink():
                _remove(final)  # a real folder or file from an older save: not atomic, happens once
            link = final.with_name(f".{final.name}.link-{step:09d}")
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            os.symlink(data.name, link)
            os.replace(link, final)
            if old_target is not None and old_target != data.resolve() and old_target.name.startswith("."):
                shutil.rmtree(old_target, ignore_errors=True)
        else:
            os.replace(staging, final)
        _fsync_dir(final.parent)

    def _before_publish(self, staging: Path, final: Path) -> None:
        """Called on rank 0 after every rank wrote ``staging`` and before it becomes ``final`` (a test hook)."""

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        path = Path(filepath)
        if _is_local(filepath) and path.is_symlink():
            if trainer.is_global_zero:
                _remove(path)
            trainer.strategy.barrier("drpo-checkpoint-remove")
            return
        super()._remove_checkpoint(trainer, filepath)

    # -- manual optimisation ----------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning warns (with a 15-line example) that under manual optimisation the checkpoint holds the
        # state *after* the step's updates. For RL that is the state a resume must continue from (step N's
        # updates done, step N+1 next), so the warning is only noise in every quickstart terminal.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # -- SIGTERM ----------------------------------------------------------------------------------------
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if (
            self.save_on_sigterm
            and isinstance(exception, SIGTERMException)
            and not trainer.sanity_checking
            and self._last_global_step_saved != trainer.global_step
        ):
            candidates = self._monitor_candidates(trainer)
            filepath = self.format_checkpoint_name(metrics=candidates)
            self._save_checkpoint(trainer, filepath)
            self._save_last_checkpoint(trainer, candidates)
            rank_zero_info(f"SIGTERM: saved the checkpoint of step {trainer.global_step} to {filepath}")
        else:
            super().on_exception(trainer, pl_module, exception)
        self.teardown(trainer, pl_module, "fit")  # the run is over: free the folder even if teardown is skipped


# ------------------------------------------------------------------------------------------------ folder hygiene

LOCK_NAME = ".drpo-fit.lock"


def _lock_folder(folder: Path):
    """Hold an exclusive lock on ``folder`` for this run: two runs saving into one folder would mix their
    ``last.ckpt`` and ``last-v1.ckpt``. Released when the file is closed or the process dies."""
    import fcntl

    handle = (folder / LOCK_NAME).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise ConfigError(
            f"trainer.callbacks: another drpo fit (pid {holder}) is saving checkpoints in {folder}; two runs in "
            "one folder would mix their last.ckpt: give this run its own dirpath or wait for the other"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def remove_stale_partials(folder: Path) -> int:
    """Delete what a run killed while saving left in ``folder``: hidden ``.*.partial-*`` files and folders,
    ``.*.link-*`` links, and hidden sharded-checkpoint folders no link points to. Called with the folder's
    lock held, so nothing of this kind belongs to a live run."""
    entries = list(folder.iterdir())
    in_use = {p.resolve() for p in entries if p.is_symlink() and not p.name.startswith(".")}  # published
    removed = 0
    for path in entries:
        name = path.name
        stale = name.startswith(".") and (".partial-" in name or ".link-" in name)
        orphan = name.startswith(".") and ".d-" in name and path.is_dir() and not path.is_symlink() \
            and path.resolve() not in in_use
        if stale or orphan:
            if path.is_symlink() or path.is_file():
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


# ------------------------------------------------------------------------------------------------ loop position


def settle_loop_position(checkpoint: dict[str, Any], num_training_batches: float) -> None:
    """Write the fit loop's progress in the one form Lightning resumes exactly: "saved at the end of batch b
    of epoch e", with (e, b) taken from the training loader's own position (:class:`PromptDataLoader`).

    Lightning records the loop state differently depending on *when* it saves. A save at the end of a batch
    (``every_n_train_steps``) resumes exactly. A save while the fit loop winds down (``max_steps`` reached,
    SIGTERM) already marks the epoch finished although ``b`` batches of it were drawn: on resume the run
    either starts a new epoch at once (a run stopped mid-epoch by ``max_steps`` then sees other prompts than
    an uninterrupted run) or, stopped on the last batch, trains one batch of the next epoch and then skips
    the rest of it. Rewriting every checkpoint in the end-of-batch form makes all of them resume as an
    uninterrupted run would continue. Checkpoints without a resumable loader position are left alone.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    loaders = (fit or {}).get("state_dict", {}).get("combined_loader")
    if not fit or not loaders or not isinstance(loaders[0], dict) or "batches" not in loaders[0]:
        return
    epoch, batches = int(loaders[0]["epoch"]), int(loaders[0]["batches"])
    progress = fit.get("epoch_loop.batch_progress")
    if batches < 1 or progress is None or "epoch_progress" not in fit:
        return  # at the start of an epoch: nothing was drawn from it, any form resumes right
    total = int(progress["total"]["processed"])  # batches trained since the run began
    progress["current"] = {"ready": batches, "started": batches, "processed": batches, "completed": batches - 1}
    progress["total"] = {"ready": total, "started": total, "processed": total, "completed": total - 1}
    progress["is_last_batch"] = batches >= num_training_batches
    fit["epoch_progress"] = {part: {"ready": epoch + 1, "started": epoch + 1, "processed": epoch, "completed": epoch}
                             for part in ("total", "current")}
    # Lightning counts this batch as stepped only after the end-of-batch save, and adds it back on resume.
    fit.setdefault("epoch_loop.state_dict", {})["_batches_that_stepped"] = total - 1
    checkpoint["epoch"] = epoch


# ------------------------------------------------------------------------------------------------ RNG states


def collect_rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python RNG states as tensors and plain values."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    except ImportError:  # pragma: no cover - numpy comes with torch
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`collect_rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            rank_zero_warn("the checkpoint's CUDA RNG states are for another number of GPUs; not restored")


def gather_rng_states(trainer: Any | None) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective when several processes run)."""
    state = collect_rng_state()
    world = int(getattr(trainer, "world_size", 1) or 1)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        states: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, state)
        return states
    return [state]


def restore_rng_states(states: list[dict[str, Any]], trainer: Any | None) -> None:
    """Set this rank's RNG state from :func:`gather_rng_states`' list (rank 0's for a different world size)."""
    rank = int(getattr(trainer, "global_rank", 0) or 0)
    world = int(getattr(trainer, "world_size", 1) or 1)
    if len(states) != world:
        rank_zero_warn(
            f"the checkpoint holds RNG states of {len(states)} processes and this run has {world}: every rank "
            "continues from rank 0's state, so sampling does not continue exactly as in the saved run"
        )
        set_rng_state(states[0])
        return
    set_rng_state(states[rank])
