"""scripts/gpu_check.sh (issue 14 item 8) without a GPU: its CPU dry run goes through every step and writes a
consistent markdown block and JSON; its offline work-arounds (package metadata from pyproject.toml, local
wheels), its time budget, its skip lines and its tokens/s and MFU arithmetic.

The dry run starts five ``drpo fit`` subprocesses (one with a rollout worker): ~60 s on 2 cores, hence ``slow``.
No GPU figure is produced or checked here.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def _has(module: str) -> bool:
    return gpu_check.importable(module)


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step_and_writes_the_results(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert {p.name for p in tmp_path.iterdir()} == {"gpu_check.log", "gpu_check.md", "gpu_check.json",
                                                   "gpu_check_runs.log"}
    block = (tmp_path / "gpu_check.md").read_text()
    assert block in proc.stdout  # the same block on stdout
    assert "CPU DRY RUN" in block and "(a) model: smoke" in block
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["gpu"] is False
    runs = {r["key"]: r for r in result["runs"]}
    quant_ok = _has("bitsandbytes") and _has("peft")
    assert set(runs) == {"b", "c", "e1", "e2", "e3"}
    for key, run in runs.items():
        if key.startswith("e") and not quant_ok:
            assert run["status"] == "skipped" and "not installed" in run["note"]
            continue
        assert run["status"] == "ok", run
        n = run["numbers"]
        steps = 2 if key.startswith("e") else 3  # --quant-steps 2, dry-run --steps 3
        assert n["trained_steps"] == steps and n["timed_steps"] == steps - 1
        # (d): completion tokens / median step; 2 prompts x 8 samples x exactly 4 tokens (min = max new tokens)
        assert n["rows"] == 16 and n["completion_tokens"] == 4.0
        assert n["tokens_per_s"] == pytest.approx(16 * 4 / n["step_s"])
        assert "mfu" not in n  # no peak FLOP/s for a CPU: no MFU is claimed
        assert n["peak"]["rss_mib"] > 0 and "cuda_allocated_mib" not in n["peak"]
        row = next(line for line in block.splitlines() if line.startswith(f"| ({key})"))
        assert f"| ok | {steps - 1} | {n['step_s']:.3f} |" in row
    # (c) really ran a worker one batch ahead: one step only filled the pipeline, staleness 1, weights sent
    assert runs["c"]["numbers"]["filling_steps"] == 1 and runs["b"]["numbers"]["filling_steps"] == 0
    assert runs["c"]["numbers"]["rollout/staleness_max"] == 1.0
    assert runs["c"]["numbers"]["rollout/sync_s"] > 0 and runs["b"]["numbers"]["rollout/sync_s"] == 0
    log = (tmp_path / "gpu_check_runs.log").read_text()
    assert "-m drpo_lightning.cli fit --config configs/drpo_fsdp.yaml --config" in log


def test_missing_bitsandbytes_and_peft_give_skip_lines(tmp_path, monkeypatch, capsys):
    real = gpu_check.importable
    monkeypatch.setattr(gpu_check, "importable", lambda m: m not in ("bitsandbytes", "peft") and real(m))
    code = gpu_check.main(["--cpu-smoke", "--only", "e", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("drpo_8bit.yaml", "drpo_int8_lora.yaml", "drpo_qlora.yaml"):
        assert f"{name}: skipped: bitsandbytes not installed" in out
    runs = json.loads((tmp_path / "gpu_check.json").read_text())["runs"]
    assert [(r["key"], r["status"], r["note"]) for r in runs] == [
        (f"e{i}", "skipped", "bitsandbytes not installed") for i in (1, 2, 3)]


def test_no_time_left_skips_runs_instead_of_overrunning(capsys):
    code = gpu_check.main(["--cpu-smoke", "--only", "b,c", "--budget-s", "20"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("| skipped |") == 2 and "out of time budget" in out


def test_without_a_gpu_the_real_check_refuses_with_one_line(capsys):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_check.main([]) == 2
    assert "no CUDA device here" in capsys.readouterr().out


def test_metadata_shim_declares_every_entry_point_of_pyproject(tmp_path):
    folder = gpu_check.write_metadata_shim(ROOT / "pyproject.toml", tmp_path)
    dist = importlib.metadata.PathDistribution(folder)
    assert dist.metadata["Name"] == "drpo-lightning"
    found = {(ep.group, ep.name): ep.value for ep in dist.entry_points}
    assert found[("drpo_lightning.rollouts", "worker")] == "drpo_lightning.rollouts.worker_engine:WorkerRollout"
    assert found[("drpo_lightning.rewards", "exact_match")] == "drpo_lightning.rewards.exact_match:ExactMatch"
    assert found[("console_scripts", "drpo")] == "drpo_lightning.cli:main"
    installed = {(ep.group, ep.name) for ep in importlib.metadata.distribution("drpo-lightning").entry_points}
    assert set(found) == installed  # the same plugins as the installed package


def test_local_wheels_folder_missing_is_reported_not_fetched(tmp_path):
    env: dict[str, str] = {}
    assert gpu_check.install_local_wheels(tmp_path / "nowhere", tmp_path / "site", env) == \
        f"no wheels in {tmp_path / 'nowhere'}"
    assert env == {}


def test_tokens_per_second_and_mfu_skip_filling_and_first_steps():
    def step(t, trained, length=10.0):
        s = {"t": t, "trained": trained, "prompts": 4, "num_generations": 2, "prompt_tokens": 4 * 6}
        if trained:
            s.update({"completion/length_mean": length, "rollout/staleness_max": 1.0})
        return s

    # a filling step, then trained steps ending at 1.0, 3.0, 4.0, 5.5 s: counted intervals 2.0, 1.0, 1.5
    probe = {"steps": [step(0.2, False), step(1.0, True, 99.0), step(3.0, True), step(4.0, True),
                       step(5.5, True)], "peak": {"rss_mib": 1.0}}
    n = gpu_check.measure(probe, n_params=1000, peak_flops=1e6)
    assert (n["filling_steps"], n["trained_steps"], n["timed_steps"]) == (1, 4, 3)
    assert n["step_s"] == 1.5
    assert n["completion_tokens"] == 10.0  # the first trained step's 99 is not counted
    assert n["tokens_per_s"] == pytest.approx(8 * 10 / 1.5)
    assert n["mfu"] == pytest.approx(8 * 1000 * 8 * (6 + 10) / 1.5 / 1e6)
    assert n["rollout/staleness_max"] == 1.0
