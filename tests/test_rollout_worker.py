"""Decoupled rollouts: the staleness schedule, the weight-sync group and the rollout worker process.

Worker tests spawn real workers (``python -m drpo_lightning.rollouts.worker``, one or two per test) on the
tiny model; every process a test starts is stopped before it ends.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drpo_lightning.errors import ConfigError, UserError
from drpo_lightning.logprobs import policy_token_stats
from drpo_lightning.models import disable_dropout, load_causal_lm
from drpo_lightning.objectives.drpo import DRPO
from drpo_lightning.rollouts.hf import HFRollout
from drpo_lightning.rollouts.staleness import (
    ProducerQueue,
    StalenessMeter,
    batch_seed,
    check_admission,
    weights_for_batch,
)
from drpo_lightning.rollouts.weight_sync import WeightReceiver, WeightSender, WeightSyncError, layout_of
from drpo_lightning.rollouts.worker import (
    KEY_ENV,
    InProcessRolloutSource,
    RolloutWorkerError,
    WorkerRolloutSource,
)

EOS_ID, PAD_ID, G = 2, 0, 2
ENGINE = {"max_new_tokens": 4}


def prompts(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded digit prompts that differ from batch to batch (char tokenizer: digits are 4..13)."""
    a, b = 4 + t % 10, 4 + (3 * t + 5) % 10
    ids = torch.tensor([[1, a, b, a], [PAD_ID, 1, b, 7]])
    return ids, (ids != PAD_ID).long()


def policy_of(model_dir: str) -> torch.nn.Module:
    policy = load_causal_lm(model_dir)
    disable_dropout(policy)
    return policy


def worker_source(model_dir: str, policy: torch.nn.Module, **kwargs) -> WorkerRolloutSource:
    kwargs = {"max_staleness": 0, "seed": 7, "timeout": 30.0, "start_timeout": 120.0, "threads": 1, **kwargs}
    return WorkerRolloutSource(ENGINE, model_dir, policy.state_dict(), eos_token_id=EOS_ID,
                               pad_token_id=PAD_ID, **kwargs)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a reparented worker may wait for a reaper that never comes)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return not alive(pid)


def train(source, policy: torch.nn.Module, steps: int, k: int, pause=lambda t: None) -> list:
    """The loop the trainer runs: prefetch k batches ahead, take batch t, one DRPO update, sync its weights.

    ``pause(t)`` runs after each update (random delays in the reproducibility test)."""
    objective = DRPO()
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    for t in range(min(k + 1, steps)):
        source.submit(t, *prompts(t), G)
    batches = []
    for t in range(steps):
        batch = source.get(t)
        batches.append(batch)
        ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
        attention = torch.cat([batch.prompt_mask, batch.completion_mask.long()], 1)
        stats = policy_token_stats(policy, ids, attention, batch.prompt_ids.shape[1])
        mask = batch.completion_mask
        rewards = (batch.completion_ids == 4 + 7).float().sum(-1)  # how many "7"s
        advantages = (rewards - rewards.mean()).unsqueeze(-1).expand_as(mask)
        out = objective(logprobs=stats.logprobs, old_logprobs=batch.behavior_logprobs, advantages=advantages,
                        mask=mask, global_count=objective.count(mask).float())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        pause(t)
        source.sync({k_: v.detach() for k_, v in policy.state_dict().items()}, t + 1)
        if t + k + 1 < steps:
            source.submit(t + k + 1, *prompts(t + k + 1), G)
    return batches


# ------------------------------------------------------------------------------------------- the schedule


def test_schedule_and_admission():
    assert [weights_for_batch(t, 2) for t in range(6)] == [0, 0, 0, 1, 2, 3]
    assert [weights_for_batch(t, 0) for t in range(4)] == [0, 1, 2, 3]
    assert check_admission(3, 2, 1) and not check_admission(3, 2, 0)
    with pytest.raises(RuntimeError, match="batch 3 must be sampled with sync 1"):
        check_admission(3, 2, 2)  # holding newer weights than the schedule allows
    assert batch_seed(0, 5) != batch_seed(0, 6) and batch_seed(0, 5) != batch_seed(1, 5)
    assert batch_seed(3, 9) == batch_seed(3, 9)


@settings(max_examples=60, deadline=None)
@given(k=st.integers(0, 3), steps=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_staleness_never_exceeds_k_whatever_the_timing(k, steps, seed):
    """Producer (worker loop) and consumer (trainer loop) interleave at random: at every point either side
    may be the one that moves, as with random generation and training delays. Each batch is still sampled
    with exactly the weights the schedule names, and no batch reaches the trainer more than k syncs old."""
    rng = random.Random(seed)
    queue, meter = ProducerQueue(k), StalenessMeter()
    produced: dict[int, int] = {}  # t -> sync it was sampled with
    queue.add_weights(0, None)
    for t in range(min(k + 1, steps)):
        queue.add_request(t, None)
    t = 0
    while t < steps:
        action = None if t in produced and rng.random() < 0.5 else queue.next()
        if action is not None:  # the producer moves: applies weights or samples a batch
            kind, index, _ = action
            if kind == "generate":
                produced[index] = queue.synced
            continue
        assert t in produced, f"deadlock: the trainer waits for batch {t}, which the producer cannot start"
        staleness = meter.record_batch(produced[t], t, 0.0)  # the trainer holds sync t when it takes batch t
        assert produced[t] == weights_for_batch(t, k) and 0 <= staleness <= k
        queue.add_weights(t + 1, None)  # trained on batch t: sync its weights, then prefetch batch t + k + 1
        if t + k + 1 < steps:
            queue.add_request(t + k + 1, None)
        t += 1
    summary = meter.summary()
    assert summary["rollout/staleness_max"] == min(k, steps - 1)
    assert summary["rollout/staleness_mean"] <= k


def test_in_process_source_refuses_staleness_and_tags_versions(tiny_model_dir):
    with pytest.raises(ConfigError, match="max_staleness = 1 needs a rollout worker"):
        InProcessRolloutSource(lambda *a: None, max_staleness=1)
    policy = policy_of(tiny_model_dir)
    engine = HFRollout(**ENGINE)

    def generate(ids, mask, n, topk):
        return engine.generate(policy, ids, mask, num_generations=n, eos_token_id=EOS_ID, pad_token_id=PAD_ID)

    source = InProcessRolloutSource(generate, seed=7, version=3)
    source.submit(0, *prompts(0), G)
    first = source.get(0)
    source.sync(None, 11)
    source.submit(1, *prompts(0), G)
    torch.manual_seed(12345)  # the ambient RNG does not matter with a seed: batch t draws from batch_seed
    again = source.get(1)
    assert first.policy_version.tolist() == [3] * 4 and again.policy_version.tolist() == [11] * 4
    torch.manual_seed(batch_seed(7, 0))
    expected = generate(*prompts(0), G, 0)
    assert torch.equal(first.completion_ids, expected.completion_ids)
    assert source.metrics()["rollout/staleness_max"] == 0.0


# ------------------------------------------------------------------------------------------- weight sync


def _sync_pair(state: dict[str, torch.Tensor], version: int, **kwargs):
    """Rank 0 and rank 1 of a weight-sync group in two threads of this process; returns what rank 1 got."""
    sender = WeightSender(1, timeout=10.0, **kwargs)
    got: dict = {}

    def worker():
        receiver = WeightReceiver(sender.address, 1, 2, timeout=10.0, **kwargs)
        receiver.connect()
        got["state"] = receiver.receive(layout_of(state), version)
        receiver.close()

    thread = threading.Thread(target=worker)
    thread.start()
    sender.connect()
    sender.send(state, version)
    thread.join(30)
    sender.close()
    return got["state"]


def test_weight_sync_is_bitwise_for_every_dtype_shape_and_bucket():
    gen = torch.Generator().manual_seed(0)
    state = {
        "odd_bf16": torch.randn(3, generator=gen).bfloat16(),  # 6 bytes: the next tensor starts misaligned
        "w": torch.randn(5, 7, generator=gen),
        "nan_and_inf": torch.tensor([float("nan"), float("inf"), -0.0, 1e-45]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "half": torch.randn(4, 1, generator=gen).half(),
        "flags": torch.tensor([True, False, True]),
        "count": torch.tensor([2**40 + 1]),
        "empty": torch.zeros(0, 3),
        "transposed": torch.randn(4, 6, generator=gen).t(),  # not contiguous
    }
    got = _sync_pair(state, 9, bucket_bytes=40)  # tiny buckets: tensors split across many broadcasts
    assert list(got) == list(state)
    for name, tensor in state.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        a = tensor.contiguous().reshape(-1).view(torch.uint8)
        b = got[name].contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(a, b), name  # bitwise: NaN payloads and -0.0 included


def test_weight_sync_join_timeout_names_the_worker():
    sender = WeightSender(1, timeout=2.0, names=["rollout worker 1 (gpu box)"])
    start = time.monotonic()
    with pytest.raises(WeightSyncError) as info:
        sender.connect()  # nobody joins
    elapsed = time.monotonic() - start
    sender.close()
    message = str(info.value)
    assert "\n" not in message and "rollout worker 1 (gpu box)" in message and "within 2 s" in message
    assert elapsed < 10, elapsed


# ------------------------------------------------------------------------------------------- the worker


def test_worker_weights_equal_rank0_bitwise_after_each_sync(tiny_model_dir):
    policy = policy_of(tiny_model_dir)
    with torch.no_grad():  # the trainer's weights are not the folder's: the worker must take them
        for p in policy.parameters():
            p.mul_(1.5).add_(1e-3)
    source = worker_source(tiny_model_dir, policy, max_staleness=1)
    try:
        pid = source.process.pid
        source.submit(0, *prompts(0), G)  # k = 1: batches 0 and 1 are sampled with sync 0
        source.submit(1, *prompts(1), G)
        for version in (0, 4):
            if version:
                with torch.no_grad():
                    for p in policy.parameters():
                        p.add_(torch.randn_like(p) * 1e-3)
                source.sync(policy.state_dict(), version)
            theirs = source.fetch_weights()
            mine = policy.state_dict()
            assert list(theirs) == list(mine)
            for name, tensor in mine.items():
                assert torch.equal(theirs[name].view(torch.uint8), tensor.view(torch.uint8)), (version, name)
        source.sync(policy.state_dict(), 8)
        with pytest.raises(RuntimeError, match="batch 2 submitted after sync 2"):
            source.submit(2, *prompts(2), G)  # too late: batch 2 must see sync 1, and sync 2 was sent
        source.submit(3, *prompts(3), G)
        assert [source.get(t).policy_version.tolist() for t in (0, 1, 3)] == [[0] * 4, [0] * 4, [8] * 4]
        # An error inside the worker comes back as one line naming it; the worker then exits.
        ids, mask = prompts(4)
        source.submit(4, ids.flip(1), mask.flip(1), G)  # right-padded: the engine refuses it
        with pytest.raises(RuntimeError, match="batch 4 is sampled with the weights after sync 3"):
            source.get(4)  # before the trainer sends sync 3: refused at once instead of a hang
        source.sync(policy.state_dict(), 12)
        with pytest.raises(RolloutWorkerError) as info:
            source.get(4)
        assert_one_line(info.value, f"rollout worker 1 (pid {pid}", "prompts must be left-padded")
    finally:
        source.close()
    assert source.process.returncode == 1 and not alive(pid)


def test_a_bad_engine_config_fails_before_any_worker_starts(tiny_model_dir, monkeypatch):
    started = []
    monkeypatch.setattr(WorkerRolloutSource, "_spawn", lambda self, *a: started.append(a))
    with pytest.raises(ConfigError, match="rollout worker engine: .*temperature must be > 0"):
        WorkerRolloutSource({"temperature": 0.0}, tiny_model_dir, {}, eos_token_id=EOS_ID,
                            pad_token_id=PAD_ID)
    with pytest.raises(ConfigError, match="use gloo with cpu or nccl with a cuda device"):
        WorkerRolloutSource(ENGINE, tiny_model_dir, {}, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                            backend="nccl")
    assert started == []


def test_two_seeded_runs_at_k1_give_identical_parameters(tiny_model_dir):
    finals, versions = [], []
    for run in range(2):
        policy = policy_of(tiny_model_dir)
        rng = random.Random(run)  # different training delays per run: the worker's timing differs
        source = worker_source(tiny_model_dir, policy, max_staleness=1)
        try:
            batches = train(source, policy, steps=4, k=1,
                            pause=lambda t, rng=rng: time.sleep(rng.random() * 0.3))
            metrics = source.metrics()
        finally:
            source.close()
        finals.append({k: v.detach().clone() for k, v in policy.state_dict().items()})
        versions.append([int(b.policy_version[0]) for b in batches])
    assert versions == [[0, 0, 1, 2]] * 2  # batch t sampled with the weights after max(0, t - 1) updates
    assert metrics["rollout/staleness_max"] == 1.0 and metrics["rollout/staleness_mean"] == 0.75
    for name in finals[0]:
        assert torch.equal(finals[0][name], finals[1][name]), name
    untrained = policy_of(tiny_model_dir).state_dict()
    assert any(not torch.equal(finals[0][n], untrained[n]) for n in untrained)  # the updates did something


def test_k0_through_the_worker_gives_the_in_process_update(tiny_model_dir):
    engine = HFRollout(**ENGINE)
    in_process = policy_of(tiny_model_dir)

    def generate(ids, mask, n, topk):
        return engine.generate(in_process, ids, mask, num_generations=n, eos_token_id=EOS_ID,
                               pad_token_id=PAD_ID, topk=topk)

    local = train(InProcessRolloutSource(generate, seed=7), in_process, steps=3, k=0)
    through_worker = policy_of(tiny_model_dir)
    source = worker_source(tiny_model_dir, through_worker, max_staleness=0)
    try:
        remote = train(source, through_worker, steps=3, k=0)
    finally:
        source.close()
    for a, b in zip(local, remote):
        assert torch.equal(a.completion_ids, b.completion_ids)
        assert torch.equal(a.completion_mask, b.completion_mask)
        torch.testing.assert_close(b.behavior_logprobs, a.behavior_logprobs, rtol=0, atol=1e-6)
    assert [int(b.policy_version[0]) for b in remote] == [0, 1, 2]
    for (name, p), q in zip(in_process.named_parameters(), through_worker.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


def test_a_hung_then_killed_worker_fails_get_and_sync_with_one_line(tiny_model_dir):
    policy = policy_of(tiny_model_dir)
    source = worker_source(tiny_model_dir, policy, timeout=2.0)
    pid = source.process.pid
    try:
        os.kill(pid, signal.SIGSTOP)  # alive but silent: only the timeout can tell
        source.submit(0, *prompts(0), G)
        start = time.monotonic()
        with pytest.raises(RolloutWorkerError) as info:
            source.get(0)
        assert 1.9 < time.monotonic() - start < 6
        assert_one_line(info.value, f"rollout worker 1 (pid {pid}, 127.0.0.1:",
                        "sent nothing for 2 s while the trainer waited for batch 0")
        source.timeout = 20.0
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RolloutWorkerError) as info:
            source.get(0)
        assert time.monotonic() - start < 5  # noticed at once, not at the 20 s timeout
        assert_one_line(info.value, f"rollout worker 1 (pid {pid}", "exited with code -9")
        with pytest.raises(UserError) as info:
            source.sync(policy.state_dict(), 1)
        assert_one_line(info.value, f"rollout worker 1 (pid {pid}", "exited with code -9 while")
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGCONT)
        source.close()
    assert not alive(pid)


def assert_one_line(err: BaseException, *fragments: str) -> None:
    message = str(err)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


TRAINER_SCRIPT = """
import time, torch
from drpo_lightning.models import load_causal_lm
from drpo_lightning.rollouts.worker import WorkerRolloutSource
policy = load_causal_lm({model!r})
source = WorkerRolloutSource({{"max_new_tokens": 4}}, {model!r}, policy.state_dict(), max_staleness=1,
                             eos_token_id=2, pad_token_id=0, timeout=30, start_timeout=120)
source.submit(0, torch.tensor([[1, 5, 6]]), torch.ones(1, 3, dtype=torch.long), 2)
print(source.process.pid, flush=True)
time.sleep(120)
"""


def test_a_killed_trainer_leaves_no_worker_behind(tiny_model_dir):
    script = TRAINER_SCRIPT.format(model=tiny_model_dir)
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker_pid = None
    try:
        worker_pid = int(trainer.stdout.readline())
        assert alive(worker_pid)
        trainer.kill()  # SIGKILL: no close(), no finalizer, no atexit
        trainer.wait(10)
        assert wait_gone(worker_pid, 5), "the worker outlived its trainer"
    finally:
        trainer.kill()
        trainer.wait()
        if worker_pid is not None and alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_worker_started_by_hand_serves_a_trainer(tiny_model_dir, monkeypatch):
    monkeypatch.setenv(KEY_ENV, os.urandom(32).hex())
    port = _free_port()
    # Started first, as on another host: it waits for the trainer to listen.
    worker = subprocess.Popen([sys.executable, "-m", "drpo_lightning.rollouts.worker",
                               "--trainer", f"127.0.0.1:{port}"], stderr=subprocess.PIPE, text=True)
    try:
        policy = policy_of(tiny_model_dir)
        source = worker_source(tiny_model_dir, policy, spawn=False, port=port)
        try:
            source.submit(0, *prompts(0), G)
            batch = source.get(0)
            assert source.worker_pid == worker.pid and batch.completion_ids.shape == (4, 4)
        finally:
            source.close()
        assert worker.wait(10) == 0
    finally:
        worker.kill()
        worker.wait()


def test_two_trainer_ranks_each_with_a_worker_share_rank0s_broadcast(tiny_model_dir):
    """As under DDP: each rank samples its own prompts in its own worker; only rank 0 sends weights, once, to
    both workers over one group (rank r's sync only announces the version to its worker)."""
    policy = policy_of(tiny_model_dir)
    sender = WeightSender(2, timeout=30.0)
    sources: dict[int, WorkerRolloutSource] = {}
    errors: list[BaseException] = []

    def start(rank: int) -> None:  # the ranks start their sources at the same time, as DDP ranks would
        try:
            if rank == 0:
                sources[0] = worker_source(tiny_model_dir, policy, max_staleness=1, weight_sender=sender)
            else:
                join = (sender.address, rank + 1, 3)
                sources[rank] = worker_source(tiny_model_dir, policy, max_staleness=1, join_group=join)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=start, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    try:
        assert not errors and set(sources) == {0, 1}, errors
        assert sources[1].name == "rollout worker 2" and sources[1].sync_address is None
        for rank, source in sources.items():
            source.submit(0, *prompts(2 * rank), G)
            source.submit(1, *prompts(2 * rank + 1), G)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.01)
        sources[1].sync(policy.state_dict(), 1)  # announces; rank 0's broadcast below delivers
        sources[0].sync(policy.state_dict(), 1)
        for rank, source in sources.items():
            source.submit(2, *prompts(2 * rank + 4), G)
            got = [source.get(t) for t in range(3)]
            assert [int(b.policy_version[0]) for b in got] == [0, 0, 1], rank
            theirs = source.fetch_weights()
            for name, tensor in policy.state_dict().items():
                assert torch.equal(theirs[name], tensor), (rank, name)
        assert sources[0].metrics()["rollout/sync_s"] > 0 and sources[1].metrics()["rollout/sync_s"] == 0
    finally:
        for source in sources.values():
            source.close()
        sender.close()


def test_rollout_worker_command_line_mistakes_are_one_line(monkeypatch, capsys):
    from drpo_lightning.rollouts.worker import main

    monkeypatch.delenv(KEY_ENV, raising=False)
    assert main(["--trainer", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"drpo: error: {KEY_ENV}: not set; give the worker the trainer's key"
    monkeypatch.setenv(KEY_ENV, "00" * 32)
    port = _free_port()  # nobody listens there
    start = time.monotonic()
    assert main(["--trainer", f"127.0.0.1:{port}", "--connect-timeout", "1"]) == 2
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "refused" in err
    assert err.startswith(f"drpo: error: --trainer 127.0.0.1:{port}: ")


def test_an_fp8_engine_in_the_worker_samples_what_it_samples_in_process(tiny_model_dir):
    """precision fp8 in the worker: the same tokens and bitwise the same behaviour log-probs as the same engine
    in the trainer's process, before and after a weight sync (the worker's fp8 copy follows the new weights)."""
    policy = policy_of(tiny_model_dir)
    engine = {**ENGINE, "precision": "fp8"}
    local = HFRollout(**engine)

    def generate(ids, mask, g, topk):
        return local.generate(policy, ids, mask, num_generations=g, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                              topk=topk)

    in_process = InProcessRolloutSource(generate, seed=7)
    source = WorkerRolloutSource(engine, tiny_model_dir, policy.state_dict(), eos_token_id=EOS_ID,
                                 pad_token_id=PAD_ID, max_staleness=0, seed=7, timeout=30.0, start_timeout=120.0,
                                 threads=1)
    try:
        for t in range(2):
            source.submit(t, *prompts(t), G)
            in_process.submit(t, *prompts(t), G)
            theirs, mine = source.get(t), in_process.get(t)
            assert torch.equal(theirs.completion_ids, mine.completion_ids), t
            assert torch.equal(theirs.behavior_logprobs, mine.behavior_logprobs), t
            with torch.no_grad():
                for p in policy.parameters():
                    p.mul_(-1.5)
            source.sync(policy.state_dict(), t + 1)
            in_process.sync(None, t + 1)
    finally:
        source.close()
