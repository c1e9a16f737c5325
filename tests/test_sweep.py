"""`drpo sweep`: a 2-run x 2-step grid through the real `drpo fit`, resumability, failures, and the report."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from drpo_lightning.errors import ConfigError
from drpo_lightning.study import paired_test, run_summary, trust_region_series
from drpo_lightning.sweep import load_grid, run_grid, set_dotted
from drpo_lightning.sweep_cli import main

ROOT = Path(__file__).resolve().parents[1]


def write_grid(tmp_path: Path, **extra) -> Path:
    spec = {
        "base": str(ROOT / "configs" / "quickstart.yaml"),
        "out_dir": str(tmp_path / "out"),
        "seeds": [0],
        "jobs": 2,
        "overrides": {
            "trainer.max_steps": 2, "trainer.val_check_interval": 2, "trainer.callbacks": [],
            "data.task_size": 64, "data.val_size": 8, "data.batch_size": 4, "data.val_batch_size": 8,
        },
        "settings": {"bf16": {"model.rollout.init_args.precision": "bf16"}},
        "objectives": {
            "drpo": {"model.objective.init_args.delta": 0.3},
            "ppo": {"model.objective": "ppo"},
        },
        **extra,
    }
    spec["overrides"].setdefault("model.num_minibatches", 1)  # one update per rollout: steps are rollouts
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_set_dotted_creates_paths_and_expands_a_plugin_name():
    cfg = {"model": {"objective": "drpo"}}
    set_dotted(cfg, "model.objective.init_args.delta", 0.2)
    set_dotted(cfg, "trainer.max_steps", 5)
    assert cfg == {"model": {"objective": {"class_path": "drpo", "init_args": {"delta": 0.2}}},
                   "trainer": {"max_steps": 5}}
    with pytest.raises(ConfigError, match="trainer.max_steps is 5, not a mapping"):
        set_dotted(cfg, "trainer.max_steps.x", 1)


def test_grid_expands_settings_objectives_seeds_with_own_folders(tmp_path):
    grid = load_grid(write_grid(tmp_path, seeds=[3, 4]))
    assert [r.name for r in grid.runs] == ["bf16/drpo/seed3", "bf16/drpo/seed4", "bf16/ppo/seed3",
                                           "bf16/ppo/seed4"]
    run = grid.runs[1]
    assert run.config["seed_everything"] == 4 and run.config["data"]["seed"] == 4
    assert run.config["model"]["rollout"]["init_args"]["precision"] == "bf16"
    assert run.config["model"]["objective"] == {"class_path": "drpo", "init_args": {"delta": 0.3}}
    assert grid.runs[2].config["model"]["objective"] == "ppo"
    assert run.config["trainer"]["logger"]["init_args"]["save_dir"] == str(run.folder)
    assert len({str(r.folder) for r in grid.runs}) == 4


def test_bad_grid_files_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_grid(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seeds: [0]\n")
    with pytest.raises(ConfigError, match="needs a 'base' config"):
        load_grid(bad)
    bad.write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="base config 'missing.yaml' not found"):
        load_grid(bad)
    for seeds in ([], [0, 0], [True], [-1]):
        with pytest.raises(ConfigError, match="seeds must be a non-empty list of distinct integers >= 0"):
            load_grid(write_grid(tmp_path, seeds=seeds))
    for name in ("a/b", "..", ""):
        with pytest.raises(ConfigError, match="must be a plain folder name"):
            load_grid(write_grid(tmp_path, objectives={name: {}}))
    with pytest.raises(ConfigError, match="jobs must be an integer"):
        load_grid(write_grid(tmp_path, jobs="two"))


def test_two_run_two_step_grid_runs_resumes_and_reports(tmp_path):
    grid_path = write_grid(tmp_path)
    grid = load_grid(grid_path)
    messages: list[str] = []
    counts = run_grid(grid, echo=messages.append)
    assert counts == {"skipped": 0, "done": 2, "failed": 0}, "\n".join(messages)
    for run in grid.runs:
        result = json.loads(run.result_path.read_text())
        assert result["name"] == run.name
        assert 0.0 <= result["val_accuracy_before"] <= 1.0
        assert [s for s, _ in result["metrics"]["reward"]] == [0, 1]  # one row per rollout step
        assert result["metrics"]["val/accuracy"], "the held-out evaluation is collected"
        # the run's config alone reproduces it
        assert yaml.safe_load((run.folder / "config.yaml").read_text()) == run.config
    drpo, ppo = (json.loads(r.result_path.read_text())["metrics"] for r in grid.runs)
    assert "drpo/corrective_frac" in drpo and "ppo/clip_frac_low" in ppo

    # Finished runs are skipped; a deleted result is rerun.
    again = run_grid(load_grid(grid_path), echo=messages.append)
    assert again == {"skipped": 2, "done": 0, "failed": 0}
    grid.runs[0].result_path.unlink()
    assert run_grid(load_grid(grid_path), only="drpo", echo=messages.append) == {"skipped": 1, "done": 1, "failed": 0}

    out = tmp_path / "report"
    assert main(["report", "--grid", str(grid_path), "--out", str(out)]) == 0
    report = (out / "grid.md").read_text()  # named after the grid file, as its plots and raw runs
    assert "| drpo | drpo | 1 |" in report and "| ppo | ppo | 1 |" in report  # arm, objective class, seeds
    assert "**Verdict (bf16).**" in report and "drpo sweep run --grid" in report
    assert (out / "grid_bf16.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(json.loads((out / "grid_runs.json").read_text())) == {"bf16/drpo/seed0", "bf16/ppo/seed0"}


def test_a_failing_run_is_recorded_and_does_not_stop_the_others(tmp_path):
    grid_path = write_grid(tmp_path, objectives={"broken": {"model.objective": "no_such_objective"},
                                                 "ok": {"model.objective": "ppo"}})
    grid = load_grid(grid_path)
    counts = run_grid(grid, jobs=1, echo=lambda _: None)
    assert counts == {"skipped": 0, "done": 1, "failed": 1}
    broken = grid.runs[0]
    assert broken.state() == "failed"
    failure = json.loads(broken.failed_path.read_text())
    assert failure["returncode"] == 2 and "no_such_objective" in failure["log_tail"]
    assert main(["status", "--grid", str(grid_path)]) == 0
    # the next run tries the failed one again (and only it)
    assert run_grid(load_grid(grid_path), jobs=1, echo=lambda _: None) == {"skipped": 1, "done": 0, "failed": 1}


FAKE_FIT = """
import pathlib, sys
folder = pathlib.Path(sys.argv[-1]).parent  # the run's config.yaml
(folder / "logs" / "version_0").mkdir(parents=True)
rows = int(sys.argv[1])
(folder / "logs" / "version_0" / "metrics.csv").write_text("step,reward\\n" + "".join(f"{i},0.5\\n" for i in range(rows)))
print("held-out accuracy before training (mean@1): 0.250")
"""


def fake_fit(rows: int) -> list[str]:
    """A stand-in for `drpo fit` that exits 0 after logging ``rows`` rollout steps."""
    return [sys.executable, "-c", FAKE_FIT, str(rows)]


def test_a_run_stopped_early_with_exit_code_0_is_not_a_result(tmp_path):
    # `drpo fit` exits 0 after SIGTERM (it saves and stops cleanly): 1 of the 2 rollouts is not a finished run.
    grid = load_grid(write_grid(tmp_path, objectives={"ppo": {"model.objective": "ppo"}}))
    assert run_grid(grid, command=fake_fit(1), echo=lambda _: None) == {"skipped": 0, "done": 0, "failed": 1}
    assert json.loads(grid.runs[0].failed_path.read_text())["reason"] == "stopped after 1 of 2 rollouts"
    assert run_grid(grid, command=fake_fit(2), echo=lambda _: None) == {"skipped": 0, "done": 1, "failed": 0}
    result = json.loads(grid.runs[0].result_path.read_text())
    assert result["val_accuracy_before"] == 0.25 and result["metrics"]["reward"] == [[0, 0.5], [1, 0.5]]


def test_editing_the_grid_makes_finished_runs_stale_and_reruns_them(tmp_path):
    path = write_grid(tmp_path, objectives={"ppo": {"model.objective": "ppo"}})
    grid = load_grid(path)
    assert run_grid(grid, command=fake_fit(2), echo=lambda _: None)["done"] == 1
    assert grid.runs[0].state() == "done"
    spec = yaml.safe_load(path.read_text())
    spec["overrides"]["model.optimizer.init_args.lr"] = 3.0e-4
    path.write_text(yaml.safe_dump(spec))
    edited = load_grid(path)
    assert edited.runs[0].state() == "stale"  # its result came from the old config: not reported, rerun
    messages: list[str] = []
    assert run_grid(edited, command=fake_fit(2), echo=messages.append)["done"] == 1
    assert "finished with an older config: rerun" in messages[0]
    assert edited.runs[0].state() == "done"


def test_a_second_sweep_on_the_same_folder_is_refused(tmp_path):
    grid = load_grid(write_grid(tmp_path))
    grid.out_dir.mkdir(parents=True)
    with (grid.out_dir / ".sweep.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="another `drpo sweep run` .* is writing to"):
            run_grid(grid, command=fake_fit(2), echo=lambda _: None)
    with pytest.raises(ConfigError, match="--only '\\(' is not a regular expression"):
        run_grid(grid, only="(", command=fake_fit(2), echo=lambda _: None)


def test_run_summary_definitions():
    result = {
        "val_accuracy_before": 0.2,
        "seconds": 10,
        "metrics": {
            "val/accuracy": [[10, 0.6], [20, 0.25], [30, 0.35]],
            "reward": [[0, 0.1], [1, 0.3]],
            "train/abs_prob_diff": [[0, 0.01], [1, 0.03]],
            "ppo/clip_frac_low": [[0, 0.1], [1, 0.2]],
            "ppo/clip_frac_high": [[0, 0.05], [1, 0.0]],
        },
    }
    s = run_summary(result)
    assert s["before"] == 0.2 and s["best"] == 0.6
    assert s["final"] == pytest.approx(0.30)  # mean of the last two evaluations
    assert s["auc_accuracy"] == pytest.approx((0.2 + 0.6 + 0.25 + 0.35) / 4)
    assert s["auc_reward"] == pytest.approx(0.2)
    assert s["collapsed"] == 1.0  # 0.25 < 0.6 / 2 after the best
    assert s["abs_prob_diff"] == pytest.approx(0.02)
    assert trust_region_series(result["metrics"]) == [[0, pytest.approx(0.15)], [1, pytest.approx(0.2)]]
    assert s["trust_frac"] == pytest.approx(0.175)
    result["metrics"]["val/accuracy"][1][1] = 0.31
    assert run_summary(result)["collapsed"] == 0.0


def test_paired_t_test():
    # diffs +0.10, +0.12, +0.08: mean 0.10, sd 0.02, se 0.02/sqrt(3) -> t = 8.66 > 4.30 (2 df)
    t, significant = paired_test(0.10, 0.02 / 3**0.5, 3)
    assert t == pytest.approx(8.660254) and significant
    assert paired_test(0.10, 0.05, 3) == (pytest.approx(2.0), False)
    assert paired_test(0.10, float("nan"), 1)[1] is False
    # every seed lost by exactly the same amount: no spread, a certain (negative) difference
    assert paired_test(-0.05, 0.0, 4) == (float("-inf"), True) and paired_test(0.0, 0.0, 4) == (0.0, False)


ORPHAN_FIT = """
import os, sys, time
from pathlib import Path
tmp = Path(sys.argv[1])
(tmp / "started.tmp").write_text(str(os.getpid()))
os.replace(tmp / "started.tmp", tmp / "started")
deadline = time.monotonic() + 60
while not (tmp / "release").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
"""

KILLED_SWEEP = """
import sys
from drpo_lightning.sweep import load_grid, run_grid
run_grid(load_grid(sys.argv[1]), command=[sys.executable, "-c", sys.argv[2], sys.argv[3]], echo=lambda _: None)
"""


def _within(seconds: float, condition) -> bool:
    """Poll ``condition()`` every 50 ms until it holds (True) or ``seconds`` pass (False)."""
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _lock_is_free(path: Path) -> bool:
    with path.open("w") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released again when the probe closes
        except BlockingIOError:
            return False
        return True


def test_a_killed_sweeps_running_child_keeps_the_folder_locked(tmp_path):
    # SIGKILL the sweep while its `drpo fit` runs: a new sweep must not clear and rerun that run's folder while
    # the orphan still writes to it, so the child holds the lock until it ends.
    import signal
    import subprocess

    path = write_grid(tmp_path, objectives={"ppo": {"model.objective": "ppo"}}, jobs=1)
    parent = subprocess.Popen([sys.executable, "-c", KILLED_SWEEP, str(path), ORPHAN_FIT, str(tmp_path)])
    try:
        assert _within(60, (tmp_path / "started").exists), "the sweep never started its run"
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        with pytest.raises(ConfigError, match="still running after it was killed"):
            run_grid(load_grid(path), command=fake_fit(2), echo=lambda _: None)
        (tmp_path / "release").touch()
        lock = tmp_path / "out" / ".sweep.lock"
        assert _within(30, lambda: _lock_is_free(lock)), "the lock was never released after the child ended"
        assert run_grid(load_grid(path), command=fake_fit(2), echo=lambda _: None)["done"] == 1
    finally:
        # The orphan ends by itself within 0.05 s of the release file (or after its own 60 s deadline); it
        # is not killed by PID, which may already belong to another process.
        (tmp_path / "release").touch()
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=30)


def test_sweep_and_study_do_not_import_each_other():
    """The grid runner knows nothing of reports; the report reads the runner's grid (no import circle)."""
    import ast

    import drpo_lightning.study as study
    import drpo_lightning.sweep as sweep_module

    def imported(module) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}

    assert "drpo_lightning.study" not in imported(sweep_module)
    assert "drpo_lightning.sweep_cli" not in imported(study) | imported(sweep_module)


def test_a_cell_that_ignores_every_setting_runs_once_and_its_result_is_copied(tmp_path):
    """An arm that overrides what every setting sets (here the rollout precision) trains the same thing in
    each setting: it runs once, the other cells get its result (marked ``copied_from``); arms that differ
    between settings run in each."""
    grid = load_grid(write_grid(
        tmp_path,
        settings={"bf16": {"model.rollout.init_args.precision": "bf16"},
                  "fp16": {"model.rollout.init_args.precision": "fp16"}},
        objectives={"drpo": {"model.objective.init_args.delta": 0.3},
                    "onpolicy": {"model.objective": "ppo", "model.rollout.init_args.precision": "fp32"}}))
    messages: list[str] = []
    assert run_grid(grid, jobs=1, command=fake_fit(2), echo=messages.append) == {"skipped": 0, "done": 4, "failed": 0}
    copied = [m for m in messages if "its result is copied" in m]
    assert copied == ["sweep: done   fp16/onpolicy/seed0 (the same run as bf16/onpolicy/seed0: its result is copied)"]
    runs = {r.name: r for r in grid.runs}
    original = json.loads(runs["bf16/onpolicy/seed0"].result_path.read_text())
    twin = json.loads(runs["fp16/onpolicy/seed0"].result_path.read_text())
    assert twin.pop("copied_from") == "bf16/onpolicy/seed0" and "copied_from" not in original
    assert twin["setting"] == "fp16" and twin["metrics"] == original["metrics"]
    assert all(r.state() == "done" for r in grid.runs)  # a rerun of the sweep skips all four


def test_readme_study_v2_commands_run_every_cell_of_the_shipped_grid(tmp_path):
    """The README's commands for configs/study/stability_v2.yaml as written, shortened only by --set (a few
    updates, a small data set) and --only seed 0: every arm runs in both conditions (the async one with its
    worker process), the on-policy reference once, and the report is written from the results."""
    shorten = []
    for item in ("trainer.max_steps=4", "trainer.val_check_interval=1", "data.task_size=64", "data.val_size=8",
                 "data.batch_size=4", "data.val_batch_size=8", "model.val_num_samples=1"):
        shorten += ["--set", item]
    out_dir = str(tmp_path / "runs")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    grid = str(ROOT / "configs" / "study" / "stability_v2.yaml")
    ran = subprocess.run([sys.executable, "-m", "drpo_lightning.cli", "sweep", "run", "--grid", grid,
                          "--out-dir", out_dir, "--only", "seed0$", *shorten],
                         capture_output=True, text=True, env=env, timeout=900)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "sweep: 14 done, 0 failed" in ran.stdout  # 13 runs + the reference's copy
    assert ran.stdout.count("its result is copied") == 1
    report = subprocess.run([sys.executable, "-m", "drpo_lightning.cli", "sweep", "report", "--grid", grid,
                             "--out-dir", out_dir, "--out", str(tmp_path / "report"), *shorten],
                            capture_output=True, text=True, env=env, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    text = (tmp_path / "report" / "stability_v2.md").read_text()
    for arm in ("drpo_0.2", "drpo_adaptive", "drpo_authors", "dppo_tv", "dppo_kl", "ppo_clip_higher", "grpo_onpolicy"):
        assert text.count(f"| {arm} |") >= 2, arm  # a row in each condition's table
    results = [json.loads(p.read_text()) for p in Path(out_dir).glob("*/*/seed0/result.json")]
    assert len(results) == 14
    fp8 = next(r for r in results if r["name"] == "fp8/drpo_adaptive/seed0")["metrics"]
    assert fp8["rollout/mismatch_mean"] and fp8["drpo/delta"]
    stale = next(r for r in results if r["name"] == "async/drpo_0.2/seed0")["metrics"]
    assert max(v for _, v in stale["rollout/staleness_max"]) >= 1
