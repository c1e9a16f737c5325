"""Helpers of the reliability suite: tiny CLI runs, one-line error checks, a per-step recorder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def tiny_fit_args(root: Path, *extra: str) -> list[str]:
    """``drpo fit`` on the quickstart config shrunk to seconds: 2 prompts x 2 samples, 3 new tokens, no
    validation, logging, checkpoints or export."""
    return [
        "fit", "--config", str(QUICKSTART),
        "--trainer.logger=false", "--trainer.callbacks=null", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0", "--trainer.max_steps=2",
        f"--trainer.default_root_dir={root}",
        "--data.task_size=8", "--data.val_size=0", "--data.batch_size=2",
        "--model.num_generations=2", "--model.export_dir=", "--model.rollout.init_args.max_new_tokens=3",
        *extra,
    ]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("drpo: error:")]


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    """Exit code 2, exactly one ``drpo: error:`` line holding every fragment, and no traceback."""
    assert code == 2, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def run_drpo(args: list[str], timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m drpo_lightning.cli ARGS`` in a real process (what a user sees: exit code, stderr)."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "drpo_lightning.cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


class StepRecorder(pl.Callback):
    """Per training step: the logged metrics, and whether the policy's weights moved during the step."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.moved: list[bool] = []
        self._before = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = [p.detach().clone() for p in pl_module.policy.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = list(pl_module.policy.parameters())
        self.moved.append(any(not a.detach().equal(b) for a, b in zip(after, self._before)))
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})


def tiny_trainer(root, steps: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=list(callbacks), default_root_dir=root,
    )


def tiny_data(batch_size: int = 2):
    from drpo_lightning.data import PromptDataModule

    return PromptDataModule(task="arithmetic", task_size=16, val_size=0, batch_size=batch_size, seed=0)
