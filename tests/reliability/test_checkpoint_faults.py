"""Bad ``--ckpt_path`` values, two runs in one checkpoint folder, leftovers of killed saves, and an output
folder that cannot be written: one line each, before the model loads where that is possible, and the
checkpoints already on disk intact."""

from __future__ import annotations

import builtins
import errno
import os
import zipfile
from pathlib import Path

import pytest
import torch
from rel_helpers import QUICKSTART, assert_one_line_error

from drpo_lightning.checkpoint import _lock_folder
from drpo_lightning.cli import main


def fit_args(root: Path, *extra: str) -> list[str]:
    """The quickstart config shrunk to seconds, checkpointing every step into ``root/ckpt``."""
    return [
        "fit", "--config", str(QUICKSTART), f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0",
        "--trainer.callbacks.init_args.every_n_train_steps=1", f"--trainer.callbacks.init_args.dirpath={root / 'ckpt'}",
        "--data.task_size=16", "--data.val_size=0", "--data.batch_size=2", "--model.num_generations=2",
        "--model.export_dir=", "--model.rollout.init_args.max_new_tokens=3", "--model.num_minibatches=1", *extra,
    ]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A real one-step checkpoint of the shrunk quickstart run."""
    root = tmp_path_factory.mktemp("saved")
    assert main(fit_args(root, "--trainer.max_steps=1")) == 0
    return root / "ckpt" / "last.ckpt"


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the policy's weights are read: the error must come first."""
    import drpo_lightning.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(models, "load_policy", refuse)


def _truncated(saved: Path, tmp_path: Path) -> Path:
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    return path


def _text(saved: Path, tmp_path: Path) -> Path:
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint\n")
    return path


def _empty_zip(saved: Path, tmp_path: Path) -> Path:
    path = tmp_path / "empty.ckpt"
    zipfile.ZipFile(path, "w").close()
    return path


def _missing(saved: Path, tmp_path: Path) -> Path:
    return tmp_path / "no_such.ckpt"


@pytest.mark.parametrize("make, fragment", [
    (_missing, "does not exist"),
    (_text, "is not a checkpoint drpo can resume from"),
    (_truncated, "is not a checkpoint drpo can resume from"),
    (_empty_zip, "is not a checkpoint drpo can resume from"),
], ids=["missing-file", "text-file", "truncated", "empty-zip"])
def test_unreadable_ckpt_path_is_one_line_before_the_model_loads(make, fragment, saved, tmp_path, no_model_load,
                                                                  capsys):
    path = make(saved, tmp_path)
    code = main(fit_args(tmp_path / "run", "--trainer.max_steps=2", f"--ckpt_path={path}"))
    assert_one_line_error(code, capsys.readouterr().err, f"ckpt_path: {path}", fragment)


def test_checkpoint_of_another_optimizer_is_one_line_before_the_model_loads(saved, tmp_path, no_model_load, capsys):
    code = main(fit_args(tmp_path / "run", "--trainer.max_steps=2", f"--ckpt_path={saved}",
                         "--model.optimizer=torch.optim.SGD", "--model.optimizer.init_args.lr=0.1"))
    assert_one_line_error(code, capsys.readouterr().err, "ckpt_path: the checkpoint holds the state of torch.optim.adamw.AdamW",
                          "model.optimizer is torch.optim.sgd.SGD")


def test_checkpoint_of_another_model_shape_is_one_line(saved, tmp_path, capsys):
    checkpoint = torch.load(saved, weights_only=True)
    key = next(k for k in checkpoint["state_dict"] if k.endswith("embed_tokens.weight"))
    rows, width = checkpoint["state_dict"][key].shape
    checkpoint["state_dict"][key] = torch.zeros(rows + 5, width)
    other = tmp_path / "other_shape.ckpt"
    torch.save(checkpoint, other)
    code = main(fit_args(tmp_path / "run", "--trainer.max_steps=2", f"--ckpt_path={other}"))
    assert_one_line_error(code, capsys.readouterr().err, "ckpt_path: the checkpoint's weights do not fit",
                          "size mismatch", key)


def test_two_runs_in_one_checkpoint_folder_are_refused(tmp_path, no_model_load, capsys):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    held = _lock_folder(folder)  # a run in progress in that folder
    try:
        code = main(fit_args(tmp_path, "--trainer.max_steps=1"))
    finally:
        held.close()
    assert_one_line_error(code, capsys.readouterr().err, "trainer.callbacks: another drpo fit",
                          f"(pid {os.getpid()})", str(folder))


def test_stale_partial_files_are_cleaned_at_start_up(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    leftovers = [folder / ".last.ckpt.partial-4242", folder / ".epoch=0-step=3.ckpt.partial-3"]
    for path in leftovers:
        path.write_bytes(b"torn")
    orphan = folder / ".last.ckpt.d-000000003"  # a sharded save killed before its link was switched
    orphan.mkdir()
    (orphan / "shard.distcp").write_bytes(b"x")
    (folder / ".last.ckpt.link-000000003").symlink_to(orphan.name)
    (folder / "notes.txt").write_text("mine")
    assert main(fit_args(tmp_path, "--trainer.max_steps=1")) == 0
    assert sorted(p.name for p in folder.iterdir()) == [".drpo-fit.lock", "epoch=0-step=1.ckpt", "last.ckpt",
                                                        "notes.txt"]


def test_a_full_disk_is_one_line_and_keeps_the_saved_checkpoints(tmp_path, monkeypatch, capsys):
    real_save = torch.save
    calls = []

    def save_until_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 3:  # step 1 and its `last` are saved; step 2 finds the disk full
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4544 vs 4448")

    monkeypatch.setattr(torch, "save", save_until_full)
    code = main(fit_args(tmp_path, "--trainer.max_steps=3"))
    line = assert_one_line_error(code, capsys.readouterr().err, "epoch=0-step=2.ckpt: could not be written",
                                 "the checkpoints already saved are intact")
    assert "unexpected pos" in line or "full" in line
    folder = tmp_path / "ckpt"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".drpo")) == \
        ["epoch=0-step=1.ckpt", "last.ckpt"]
    for name in ("epoch=0-step=1.ckpt", "last.ckpt"):
        assert torch.load(folder / name, weights_only=True)["global_step"] == 1


def test_a_read_only_output_folder_is_one_line(tmp_path, monkeypatch, capsys):
    """Every write under the folder fails as on a read-only mount (a root test process ignores chmod)."""
    readonly = tmp_path / "ro"
    readonly.mkdir()
    (readonly / "old.ckpt").write_bytes(b"kept")
    real_open, real_mkdir = builtins.open, os.mkdir

    def refuse(path) -> None:
        if str(os.fspath(path)).startswith(str(readonly)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def ro_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(m in mode for m in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def ro_mkdir(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", ro_open)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)
    code = main(fit_args(readonly, "--trainer.max_steps=1"))
    assert_one_line_error(code, capsys.readouterr().err, str(readonly), "Read-only file system",
                          "must be writable and have free space")
    monkeypatch.undo()
    assert (readonly / "old.ckpt").read_bytes() == b"kept"


def test_ckpt_path_auto_starts_a_new_run_then_resumes(tmp_path, capsys):
    """For a job script that is resubmitted (SLURM requeue): `auto` says what it does either way."""
    assert main(fit_args(tmp_path, "--trainer.max_steps=1", "--ckpt_path=auto")) == 0
    assert "drpo: ckpt_path auto: no last checkpoint yet, starting a new run" in capsys.readouterr().err
    assert main(fit_args(tmp_path, "--trainer.max_steps=2", "--ckpt_path=auto")) == 0
    assert f"drpo: resuming from {tmp_path / 'ckpt' / 'last.ckpt'} (step 1)" in capsys.readouterr().err
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2
