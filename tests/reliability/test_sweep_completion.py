"""`drpo sweep` judges a run complete by the step it reached, not by how many rows it logged (a grid with
`trainer.log_every_n_steps: 2` was reported failed although every run finished)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from rel_helpers import ROOT

from drpo_lightning.sweep import load_grid, read_result, run_grid


def write_grid(tmp_path: Path, objectives: dict, overrides: dict) -> Path:
    spec = {
        "base": str(ROOT / "configs" / "quickstart.yaml"), "out_dir": str(tmp_path / "out"), "seeds": [0],
        "jobs": 1, "objectives": objectives,
        "overrides": {"trainer.callbacks": [], "model.num_minibatches": 1, "data.task_size": 64,
                      "data.val_size": 8, "data.batch_size": 4, "data.val_batch_size": 8, **overrides},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_complete_run_that_logs_every_second_step_is_done(tmp_path):
    # Rows are logged at rollouts 1 and 3 of 5 only: counting them said "stopped after 2 of 5 rollouts".
    grid = load_grid(write_grid(tmp_path, objectives={"ppo": {"model.objective": "ppo"}}, overrides={
        "trainer.max_steps": 5, "trainer.log_every_n_steps": 2, "trainer.val_check_interval": 5,
        "trainer.callbacks": [], "data.task_size": 32, "data.val_size": 4, "data.batch_size": 2,
        "data.val_batch_size": 4, "model.num_generations": 2, "model.rollout.init_args.max_new_tokens": 3}))
    messages: list[str] = []
    assert run_grid(grid, echo=messages.append) == {"skipped": 0, "done": 1, "failed": 0}, messages
    assert [s for s, _ in read_result(grid.runs[0])["metrics"]["reward"]] == [1, 3]


SPARSE_FIT = """
import pathlib, sys
folder = pathlib.Path(sys.argv[-1]).parent
(folder / "logs" / "version_0").mkdir(parents=True)
(folder / "logs" / "version_0" / "metrics.csv").write_text("step,reward\\n1,0.5\\n")
print(sys.argv[1])
"""


@pytest.mark.parametrize(("last_line", "outcome", "reason"), [
    ("`Trainer.fit` stopped: `max_steps=4` reached.", "done", None),
    ("SIGTERM: saved the checkpoint of step 3 to x.ckpt", "failed", "stopped after 3 of 4 rollouts"),
    ("", "failed", "stopped after 2 of 4 rollouts"),
], ids=["max-steps-reached", "sigterm", "no-word-of-the-end"])
def test_completion_is_judged_by_the_step_the_run_reached(tmp_path, last_line, outcome, reason):
    """metrics.csv holds a row at rollout 1 only (log_every_n_steps: 2) of the 4 that max_steps sets."""
    grid = load_grid(write_grid(tmp_path, objectives={"ppo": {"model.objective": "ppo"}},
                                overrides={"trainer.max_steps": 4}))
    counts = run_grid(grid, command=[sys.executable, "-c", SPARSE_FIT, last_line], echo=lambda _: None)
    assert counts[outcome] == 1
    if reason:
        assert json.loads(grid.runs[0].failed_path.read_text())["reason"] == reason


