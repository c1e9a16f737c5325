"""RLModule fed by a rollout worker (the ``worker`` rollout plugin): k = 0 equals the in-process loop, seeded runs
at k = 1 repeat exactly, resume, a killed worker or trainer, and the shipped async quickstart.

Every test that trains spawns one worker process on the tiny model (a few seconds each); every process a test
starts is gone when it ends.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from rl_helpers import DigitReward

from drpo_lightning.checkpoint import RLCheckpoint
from drpo_lightning.data import PromptDataModule
from drpo_lightning.errors import ConfigError
from drpo_lightning.models import LoRA
from drpo_lightning.module import RLModule
from drpo_lightning.objectives.drpo import DRPO
from drpo_lightning.rollouts.hf import HFRollout
from drpo_lightning.rollouts.worker import InProcessRolloutSource, RolloutWorkerError
from drpo_lightning.rollouts.worker_engine import WorkerRollout

ROOT = Path(__file__).resolve().parents[1]


def worker(k: int, **kwargs) -> WorkerRollout:
    return WorkerRollout(HFRollout(max_new_tokens=4), max_staleness=k, threads=1,
                         **{"timeout": 30.0, "start_timeout": 120.0, **kwargs})


def module_for(model_dir: str, rollout, **kwargs) -> RLModule:
    return RLModule(model_name_or_path=model_dir, objective=DRPO(delta=0.2), rollout=rollout,
                    rewards=[DigitReward()], num_generations=4, export_dir="",
                    optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), **kwargs)


class Recorder(pl.Callback):
    """What the loop trained on (prompts and rollouts, from ``feed.take``) and logged, step by step."""

    def __init__(self, seed_in_process: int | None = None, on_batch=None) -> None:
        self.taken: list[tuple[dict, object]] = []
        self.logged: list[dict[str, float]] = []
        self.seed_in_process = seed_in_process
        self.on_batch = on_batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        feed = pl_module.feed
        if not hasattr(feed, "_recorded"):
            feed._recorded = True
            if self.seed_in_process is not None:
                # Sample batch t in-process with batch_seed(seed, t), as the worker does, not the trainer's RNG.
                assert isinstance(feed.source, InProcessRolloutSource)
                feed.source.seed = self.seed_in_process
            take = feed.take

            def recording(prompts):
                out = take(prompts)
                if out is not None:
                    self.taken.append(out)
                return out

            feed.take = recording
        if self.on_batch is not None:
            self.on_batch(trainer, pl_module, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items()
                            if k.startswith(("rollout/", "reward", "drpo/"))})


def fit(module: RLModule, steps: int, root: Path, *, seed: int = 3, ckpt_path=None, callbacks=(),
        recorder: Recorder | None = None) -> Recorder:
    pl.seed_everything(seed, verbose=False)
    recorder = recorder or Recorder()
    data = PromptDataModule(task="arithmetic", task_size=40, val_size=0, batch_size=4, val_batch_size=4, seed=0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                         enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[recorder, *callbacks], default_root_dir=root)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    assert module.feed is None or module.feed.source is None  # closed at the end of the fit
    return recorder


def params(module: RLModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}


def test_k0_through_the_worker_gives_the_in_process_update(tiny_model_dir, tmp_path):
    via_worker = module_for(tiny_model_dir, worker(0))
    seen_worker = fit(via_worker, 3, tmp_path / "w")
    in_process = module_for(tiny_model_dir, HFRollout(max_new_tokens=4))
    seen_local = fit(in_process, 3, tmp_path / "p", recorder=Recorder(seed_in_process=3))
    assert len(seen_worker.taken) == len(seen_local.taken) == 3
    for (_, a), (_, b) in zip(seen_worker.taken, seen_local.taken):
        assert torch.equal(a.completion_ids, b.completion_ids)  # the same samples, from the same weights
        torch.testing.assert_close(a.behavior_logprobs, b.behavior_logprobs, atol=1e-6, rtol=0)
    assert [int(b.policy_version[0]) for _, b in seen_worker.taken] == [0, 1, 2]  # k = 0: always current
    moved = 0.0
    start = module_for(tiny_model_dir, HFRollout(max_new_tokens=4))
    start.configure_model()
    for key, value in params(via_worker).items():
        torch.testing.assert_close(value, params(in_process)[key], atol=1e-5, rtol=0)
        moved = max(moved, float((value - start.policy.state_dict()[key]).abs().max()))
    assert moved > 1e-3  # three updates at lr 1e-2 moved the weights: the comparison is not vacuous
    assert max(s["rollout/staleness_max"] for s in seen_worker.logged) == 0


def test_two_seeded_runs_at_k1_give_identical_parameters_and_log_staleness(tiny_model_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        module = module_for(tiny_model_dir, worker(1))
        seen = fit(module, 3, tmp_path / name)
        runs.append((params(module), seen))
    (first, seen), (second, _) = runs
    assert all(torch.equal(first[k], second[k]) for k in first)
    # Step 0 only fills the pipeline; batch t is then sampled with the weights after update max(0, t - 1).
    assert len(seen.taken) == 3 and len(seen.logged) == 4
    assert [int(b.policy_version[0]) for _, b in seen.taken] == [0, 0, 1]
    assert [s.get("rollout/staleness_max") for s in seen.logged] == [None, 0.0, 1.0, 1.0]
    different_seed = module_for(tiny_model_dir, worker(1))
    fit(different_seed, 3, tmp_path / "c", seed=4)
    assert not all(torch.equal(first[k], v) for k, v in params(different_seed).items())


def _ckpt(path: Path) -> RLCheckpoint:
    return RLCheckpoint(dirpath=path, every_n_train_steps=2, save_last=True, save_top_k=-1)


def test_resume_at_k0_through_the_worker_is_exact(tiny_model_dir, tmp_path):
    straight = module_for(tiny_model_dir, worker(0))
    fit(straight, 4, tmp_path / "s")
    first = module_for(tiny_model_dir, worker(0))
    fit(first, 2, tmp_path / "f", callbacks=[_ckpt(tmp_path / "ckpt")])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["drpo_rollout"] == {"policy_version": 2, "next_index": 2, "pending": [], "max_staleness": 0}
    resumed = module_for(tiny_model_dir, worker(0))
    fit(resumed, 4, tmp_path / "r", ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    expected = params(straight)
    for key, value in params(resumed).items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0)


def test_resume_at_k1_samples_the_in_flight_batch_again_from_the_restored_weights(tiny_model_dir, tmp_path):
    first = module_for(tiny_model_dir, worker(1))
    fit(first, 2, tmp_path / "f", callbacks=[_ckpt(tmp_path / "ckpt")])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["drpo_rollout"]
    # 3 prompt batches read (one filled the pipeline), 2 trained: batch 2 was in flight.
    assert (saved["policy_version"], saved["next_index"]) == (2, 3)
    assert [i for i, _ in saved["pending"]] == [2] and len(saved["pending"][0][1]["prompt"]) == 4
    resumed = module_for(tiny_model_dir, worker(1))
    seen = fit(resumed, 4, tmp_path / "r", ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    # No fill step after a resume: batch 2 (the saved prompts) is trained first, sampled again with the
    # restored weights (version 2; the uninterrupted run sampled it with version 1), then batch 3 on schedule.
    assert [b["prompt"] for b, _ in seen.taken][0] == saved["pending"][0][1]["prompt"]
    assert [int(r.policy_version[0]) for _, r in seen.taken] == [2, 2]
    assert [s["rollout/staleness_max"] for s in seen.logged] == [0.0, 1.0]


def test_a_worker_checkpoint_does_not_resume_with_a_smaller_staleness(tiny_model_dir, tmp_path):
    first = module_for(tiny_model_dir, worker(1))
    fit(first, 2, tmp_path / "f", callbacks=[_ckpt(tmp_path / "ckpt")])
    with pytest.raises(ConfigError, match="1 prompt batches in flight .saved with max_staleness 1.*max_staleness >= 1"):
        fit(module_for(tiny_model_dir, HFRollout(max_new_tokens=4)), 4, tmp_path / "r",
            ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))


@pytest.mark.parametrize("when", ["waiting-for-a-batch", "sending-weights"])
def test_a_killed_worker_ends_the_fit_with_one_line_within_its_timeout(when, tiny_model_dir, tmp_path):
    pids = []

    def kill(pl_module):
        process = pl_module.feed.source.process
        pids.append(process.pid)
        process.kill()

    def at_step_2(trainer, pl_module, batch_idx):
        if batch_idx != 2:
            return
        if when == "waiting-for-a-batch":  # k = 0: the trainer then waits for the batch the worker never sends
            kill(pl_module)
        else:  # the batch already arrived; the worker dies before the weights after it are sent
            feed, sync = pl_module.feed, pl_module.feed.sync
            feed.sync = lambda: (kill(pl_module), sync())

    module = module_for(tiny_model_dir, worker(0 if when == "waiting-for-a-batch" else 1, timeout=20.0))
    start = time.monotonic()
    with pytest.raises(RolloutWorkerError) as info:
        fit(module, 6, tmp_path, recorder=Recorder(on_batch=at_step_2))
    assert time.monotonic() - start < 60  # start-up + 2 steps + detection; a hang would take the timeout or more
    message = str(info.value)
    # (announcing or receiving the weights, depending on when the connection reset reaches the trainer)
    doing = "the trainer waited for batch 2" if when == "waiting-for-a-batch" else "weights v2"
    assert "\n" not in message and "rollout worker 1 (pid" in message and "exited with code -9" in message
    assert doing in message, message
    assert module.feed.source is None  # closed by the feed as the error went through it
    assert len(pids) == 1 and _zombie(pids[0])


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True


TRAINER_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import lightning.pytorch as pl
from test_async_loop import fit, module_for, worker, Recorder

def report(trainer, pl_module, batch_idx):
    if batch_idx == 1:
        print("WORKER", pl_module.feed.source.process.pid, flush=True)
        time.sleep(600)

fit(module_for({model!r}, worker(1)), 4, {root!r}, recorder=Recorder(on_batch=report))
"""


def test_a_killed_trainer_leaves_no_worker_behind(tiny_model_dir, tmp_path):
    script = TRAINER_SCRIPT.format(tests=str(ROOT / "tests"), model=tiny_model_dir, root=str(tmp_path))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    trainer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while not line.startswith("WORKER") and time.monotonic() < deadline:
            line = trainer.stdout.readline() or line
        assert line.startswith("WORKER"), "the trainer never reached its second step"
        pid = int(line.split()[1])
        assert not _zombie(pid)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        deadline = time.monotonic() + 10
        while not _zombie(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _zombie(pid), "the rollout worker outlived its killed trainer"
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_staleness": -1}, "max_staleness must be an integer >= 0"),
        ({"timeout": 0}, "rollout.init_args.timeout must be a finite number of seconds > 0"),
        ({"engine": WorkerRollout(HFRollout())}, "a worker cannot run another worker"),
        ({"device": "gpu7"}, "rollout.init_args.device"),
        ({"trainer_threads": 0}, "rollout.init_args.trainer_threads must be an integer >= 1 or null, got 0"),
    ],
    ids=["negative-staleness", "zero-timeout", "nested-worker", "bad-device", "zero-threads"],
)
def test_bad_worker_settings_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        WorkerRollout(**settings)


def test_a_worker_with_lora_is_refused_before_anything_loads(tiny_model_dir):
    with pytest.raises(ConfigError, match="rollout worker .* does not support model.lora"):
        module_for(tiny_model_dir, worker(1), lora=LoRA(r=2))


def test_the_worker_plugin_rebuilds_its_engine_from_its_settings():
    engine = HFRollout(max_new_tokens=7, temperature=0.7, top_k=5, precision="bf16", share_prompt=False)
    wrapped = WorkerRollout(engine, max_staleness=2)
    assert wrapped.worker_options()["engine"] == {
        "max_new_tokens": 7, "temperature": 0.7, "top_p": 1.0, "top_k": 5, "min_new_tokens": 0,
        "precision": "bf16", "use_cache": True, "share_prompt": False}
    assert repr(HFRollout(**wrapped.worker_options()["engine"])) == repr(engine)
    # The trainer reads the engine's contract through the wrapper (temperature for its log-probs, the budget).
    assert RLModule(rollout=wrapped)._rollout_temperature() == 0.7 and wrapped.max_new_tokens == 7


def test_quickstart_async_as_shipped_trains_with_a_worker_and_logs_staleness(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "drpo_lightning.cli", "fit", "--config", str(ROOT / "configs/quickstart_async.yaml"),
         "--trainer.max_steps=4"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "runs/quickstart_async/drpo/version_0/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    staleness = [float(r["rollout/staleness_max"]) for r in rows if r.get("rollout/staleness_max")]
    # 2 updates per rollout step: step 0 fills the pipeline, steps 1 and 2 train (batches 0 and 1).
    assert staleness == [0.0, 1.0]


@pytest.mark.parametrize(("worker", "trainer", "world", "backend"), [
    ("cpu", "cpu", 1, "gloo"),
    ("cuda:1", "cuda:0", 1, "nccl"),   # its own GPU: NCCL, GPU to GPU
    ("cuda:0", "cuda:0", 1, "gloo"),   # the trainer's GPU: NCCL would refuse the duplicate device
    ("cuda:1", "cuda:0", 2, "gloo"),   # a worker per rank: two of them, or one and a rank, share a GPU
    ("cuda:1", "cpu", 1, "gloo"),      # a CPU trainer stages through the CPU anyway
])
def test_weight_sync_uses_nccl_only_between_different_gpus(worker, trainer, world, backend, monkeypatch):
    from drpo_lightning.loop.feed import weight_sync_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the rule, on a machine without a GPU
    assert weight_sync_backend(worker, torch.device(trainer), world) == backend


def test_weight_sync_backend_without_cuda_is_gloo(monkeypatch):
    from drpo_lightning.loop.feed import weight_sync_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert weight_sync_backend("cuda", torch.device("cpu"), 1) == "gloo"
