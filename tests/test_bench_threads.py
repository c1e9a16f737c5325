"""The whole-machine mode of the TRL benchmark (``bench_vs_trl.py --threads 2``) runs end to end on a tiny model
and prints its ratio lines with numbers that agree with each other and with its JSON.

The benchmark's contenders include TRL's GRPOTrainer, so the test is skipped without the ``bench`` extra. It runs
the smoke path in a subprocess (~60 s on 2 cores: 7 contenders, three of them starting a rollout worker process
per round), hence ``slow``.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="needs the bench extra: pip install -e '.[bench]'")

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"(-?\d+\.\d+)"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[str, list[dict]]:
    out = tmp_path_factory.mktemp("bench_threads") / "result.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_vs_trl.py"), "--smoke", "--threads", "2", "--json",
         str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def one(pattern: str, text: str) -> re.Match:
    found = list(re.finditer(pattern, text, re.MULTILINE))
    assert len(found) == 1, f"{pattern!r} matched {len(found)} lines in:\n{text[-4000:]}"
    return found[0]


@pytest.mark.slow
def test_threads_mode_prints_every_ratio(smoke):
    text, (result,) = smoke
    timing = result["timing"]
    assert set(timing) == {"bare", "trl", "sync", "sync_trainer", "async0", "async1", "async2"}
    mode = result["threads_mode"]
    assert (mode["threads"], mode["trainer_threads"], mode["worker_threads"]) == (2, 1, 1)

    for k in (0, 1, 2):
        m = one(rf"^drpo-lightning async k={k} \(1\+1 cores\) / sync \(1 core\) step time: {NUMBER}x", text)
        expected = timing[f"async{k}"]["median_s"] / timing["sync_trainer"]["median_s"]
        assert float(m.group(1)) == pytest.approx(expected, abs=0.005)

    modes = {"sync": "sync (2 threads)", **{f"async{k}": f"async k={k} (1+1 cores)" for k in (0, 1, 2)}}
    ratios = {}
    for key, label in modes.items():
        m = one(rf"^  drpo-lightning {re.escape(label)} / TRL tokens/s: {NUMBER}x \(per round", text)
        ratios[key] = float(m.group(1))
        expected = timing[key]["tokens_per_s"] / timing["trl"]["tokens_per_s"]
        assert ratios[key] == pytest.approx(expected, abs=0.005)
    best = one(rf"^drpo-lightning best / TRL tokens/s: {NUMBER}x \((.+)\); goal >= 1\.30x: (MET|NOT MET)$", text)
    assert float(best.group(1)) == max(ratios.values())
    assert best.group(2) == modes[result["best_mode"]]
    assert (best.group(3) == "MET") == (float(best.group(1)) >= 1.3)

    base = timing["sync_trainer"]["perf/rollout_s"]
    for k in (0, 1, 2):
        m = one(rf"^rollout hidden per step, async k={k}: {NUMBER} ms of the sync \(1 core\) rollout's {NUMBER} ms "
                rf"\((-?\d+)%\)", text)
        hidden = result["hidden"][f"async{k}"]
        assert hidden["hidden_s"] == pytest.approx(base - timing[f"async{k}"]["perf/rollout_s"], abs=1e-12)
        assert float(m.group(1)) == pytest.approx(1000 * hidden["hidden_s"], abs=0.051)
        assert float(m.group(2)) == pytest.approx(1000 * base, abs=0.051)
        assert all(math.isfinite(hidden[key]) for key in ("wait_s", "weight_sync_s"))


@pytest.mark.slow
def test_threads_mode_counts_only_trained_steps_of_a_full_pipeline(smoke):
    _, (result,) = smoke
    timing = result["timing"]
    for key, s in timing.items():
        # --smoke: 1 round of 3 counted steps; the first step of the round and k filling steps not counted
        assert s["steps"] == 3, key
        assert s["median_s"] > 0 and s["tokens_per_s"] == pytest.approx(32 / s["median_s"])
    # The counted steps of async k train on batches sampled k syncs back (batch 1 at k=2: 1 sync back):
    # the logged staleness shows the pipeline really was k deep and the filling steps were left out.
    for k in (0, 1, 2):
        assert timing[f"async{k}"]["rollout/staleness_max"] == k
    assert timing["sync"]["rollout/staleness_max"] == 0
    assert timing["sync"]["rollout/sync_s"] == 0.0  # in-process: no weights travel
    assert timing["async1"]["rollout/sync_s"] > 0.0
