"""Helpers of the shipped-config resume tests: run ``drpo`` as a user does, in its own process and folder."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from rel_helpers import ROOT

from drpo_lightning.rewards.base import RewardFunction


def drpo(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``drpo ARGS`` in ``cwd`` (where ``configs/`` links to the shipped configs), one torch thread."""
    configs = cwd / "configs"
    if not configs.exists():
        configs.symlink_to(ROOT / "configs")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "drpo_lightning.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def rewards(metrics_csv: Path) -> dict[int, float]:
    """step -> training reward of a run's metrics.csv."""
    with open(metrics_csv) as f:
        return {int(r["step"]): float(r["reward"]) for r in csv.DictReader(f) if r.get("reward")}


class SigtermAtCall(RewardFunction):
    """Scores 0 and, on its ``call``-th call (1-based; 0: never), sends SIGTERM to its own process: a
    preemption that lands while that batch is being trained."""

    def __init__(self, call: int = 0) -> None:
        self.call = call
        self.calls = 0

    def __call__(self, *, prompts, completions, **columns):
        self.calls += 1
        if self.calls == self.call:
            os.kill(os.getpid(), signal.SIGTERM)
        return [0.0] * len(completions)
