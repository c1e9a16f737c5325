"""kill -9 at random points of a short run, resume from ``last``, again and again: it always resumes, every
checkpoint on disk always loads, and the run ends with the weights of a run that was never killed.

The run (``rel_kill_run.py``) saves a checkpoint after every optimizer step plus ``last``, and each save
lingers 30 ms between writing and publishing, so kills often land inside a save. The short form for CI: 3
kills at seeded random moments (2-3 steps after the run (re)started, then a random fraction of a step), then
a run to the end.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

DRIVER = Path(__file__).with_name("rel_kill_run.py")
ROOT = Path(__file__).resolve().parents[2]
STEPS = 14
PROMPTS = 24  # 6 steps per epoch: the run crosses two epoch boundaries
KILLS = 3


def launch(model_dir: str, ckpt: Path, out: Path) -> tuple[subprocess.Popen, queue.Queue]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = ["--model-dir", model_dir, "--out", str(out), "--ckpt-dir", str(ckpt), "--steps", str(STEPS),
            "--engine", "deterministic", "--num-prompts", str(PROMPTS), "--batch-size", "4", "--lr", "3e-3"]
    proc = subprocess.Popen([sys.executable, str(DRIVER), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put((time.monotonic(), line))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def wait_for_step(lines: queue.Queue, step: int, log: list[str], timeout: float = 120.0) -> list[tuple[int, float]]:
    """Read the run's output until it reports optimizer step ``step``; (step, time) of each step it reported."""
    seen: list[tuple[int, float]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if got is None:
            break
        at, line = got
        log.append(line)
        if line.startswith("STEP "):
            seen.append((int(line.split()[1]), at))
            if seen[-1][0] >= step:
                return seen
    raise AssertionError(f"the run never reported step {step}:\n{''.join(log[-40:])}")


def check_every_checkpoint_loads(ckpt: Path) -> int:
    """Load every visible checkpoint the way resume does (``weights_only=True``); the step of ``last``."""
    steps = {}
    for path in sorted(ckpt.iterdir()):
        if path.name.startswith("."):
            continue  # hidden *.partial* leftovers of a kill inside a save: never picked by ckpt_path=last
        saved = torch.load(path, weights_only=True, map_location="cpu")  # raises on a torn or foreign file
        assert {"state_dict", "optimizer_states", "loops", "drpo_rng_states"} <= saved.keys(), path.name
        steps[path.name] = saved["global_step"]
        if path.name != "last.ckpt":
            # A step redone after a kill between its own file and `last` is saved again as ...-v1.ckpt.
            name = rf"epoch={saved['epoch']}-step={saved['global_step']}(-v\d+)?\.ckpt"
            assert re.fullmatch(name, path.name), path.name
    numbered = max((s for name, s in steps.items() if name != "last.ckpt"), default=0)
    # `last` is written right after the numbered file of its step: a kill in between leaves it one behind
    # (or absent after a kill inside the very first save: the next run then starts from scratch).
    last = steps.get("last.ckpt", 0)
    assert last in (numbered, numbered - 1), steps
    return last


def test_kill_9_at_random_points_then_resume_from_last_repeatedly(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    rng = random.Random(20260601)
    resumed_from = 0
    log: list[str] = []
    for kill in range(KILLS):
        proc, lines = launch(model_dir, ckpt, out)
        try:
            target = resumed_from + rng.randint(2, 3)
            seen = wait_for_step(lines, target, log)
            # Resumed from `last`: the first step this process made is the one after the checkpoint.
            assert seen[0][0] == resumed_from + 1, (kill, resumed_from, seen)
            # A random point of the next step or its save: up to one step's duration after the marker.
            step_seconds = seen[-1][1] - seen[-2][1]
            time.sleep(max(0.0, seen[-1][1] + rng.uniform(0.0, step_seconds) - time.monotonic()))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL, ''.join(log[-40:])
        assert not (out / "done").exists()
        last = check_every_checkpoint_loads(ckpt)
        # Progress: the step before `target` was reported only after its save had finished.
        assert resumed_from + 1 <= target - 1 <= last
        resumed_from = last
    assert 0 < resumed_from < STEPS

    proc, lines = launch(model_dir, ckpt, out)
    try:
        seen = wait_for_step(lines, STEPS, log)
        assert seen[0][0] == resumed_from + 1
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(log[-40:])
    assert json.loads((out / "done").read_text()) == {"global_step": STEPS}
    assert check_every_checkpoint_loads(ckpt) == STEPS
    numbered = {int(re.match(r"epoch=\d+-step=(\d+)", p.name).group(1)) for p in ckpt.glob("epoch=*.ckpt")}
    assert numbered == set(range(1, STEPS + 1))

    # The killed-and-resumed run ends where an uninterrupted one does (same weights; 1e-5 as the uninterrupted
    # run is in this process, see tests/test_resume.py).
    reference = uninterrupted_params(model_dir, tmp_path / "straight")
    resumed = torch.load(out / "params.pt", weights_only=True)
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, atol=1e-5, rtol=0)
    moved = max(float((reference[k] - initial).abs().max()) for k, initial in initial_params(model_dir).items())
    assert moved > 1e-3  # the comparison is not between two untrained models


def uninterrupted_params(model_dir: str, out: Path) -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from rl_helpers import namespace, run
    finally:
        sys.path.remove(str(ROOT / "tests"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed runs (OMP_NUM_THREADS=1): the same CPU kernels
    try:
        result = run(namespace(model_dir=model_dir, out=out, engine="deterministic", num_prompts=PROMPTS,
                               batch_size=4, lr=3e-3, steps=STEPS))
    finally:
        torch.set_num_threads(threads)
    assert result["global_step"] == STEPS
    return result["params"]


def initial_params(model_dir: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).state_dict()
