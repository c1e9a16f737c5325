"""Bounded staleness: which weights each batch is sampled with, and how stale the trainer's batches were.

With ``max_staleness`` k, batch t (0-based) is generated with the weights after ``max(0, t - k)`` syncs, one
sync per trained batch. The schedule depends on nothing but t and k, never on timing, so a seeded run samples
the same tokens run to run at any k. k = 0 is synchronous: batch t sees every update of batches 0 .. t-1.

Two rules make the schedule hold whatever the speeds of producer (the rollout worker) and consumer (the
trainer):

- the producer may start batch t only once it holds sync ``max(0, t - k)`` (it never runs ahead of its
  weights) and must not have applied a later one (it never samples with weights newer than the schedule);
- the consumer must hand the producer batch t's prompts before it sends sync ``max(0, t - k) + 1``, that is
  it prefetches the prompts of batch t + k while it trains on batch t.

Staleness is counted in syncs (trained batches): the trainer consumes batch t holding sync t, so its
staleness is ``t - max(0, t - k) = min(t, k)``. The reported ``policy_version`` of a batch is whatever version
number the trainer attached to that sync (e.g. its optimizer-update count).
"""

from __future__ import annotations

from collections import deque
from typing import Any

__all__ = ["ProducerQueue", "StalenessMeter", "batch_seed", "check_admission", "weights_for_batch"]


def weights_for_batch(t: int, max_staleness: int) -> int:
    """The sync index (trained batches included) that batch ``t`` must be sampled with."""
    if t < 0 or max_staleness < 0:
        raise ValueError(f"batch index and max_staleness must be >= 0, got t={t}, k={max_staleness}")
    return max(0, t - max_staleness)


def check_admission(t: int, max_staleness: int, synced: int) -> bool:
    """May the producer, holding sync ``synced``, sample batch ``t`` now?

    False: it must wait for more syncs. Raises when it already holds newer weights than the schedule allows,
    which only happens when the consumer submitted batch t too late (after sync ``max(0, t - k) + 1``).
    """
    need = weights_for_batch(t, max_staleness)
    if synced > need:
        raise RuntimeError(
            f"batch {t} must be sampled with sync {need} (max_staleness={max_staleness}) but sync {synced} "
            f"was already applied: submit batch t before sending the weights after batch t - k"
        )
    return synced == need


def batch_seed(run_seed: int, t: int) -> int:
    """The sampling seed of batch ``t``: a fixed function of the run's seed and t, not of timing or worker."""
    # A large odd multiplier keeps (seed, t) pairs apart for any realistic seed and step count.
    return (int(run_seed) * 0x9E3779B1 + int(t)) % (2**63 - 1)


class ProducerQueue:
    """The producer's half of the schedule: requests and weights, each in arrival order, in; what to do
    next out. Weights are applied only when the head request needs them (or when no request is waiting,
    since every request that needs older weights was submitted before them), and a request runs only when
    :func:`check_admission` allows it. Timing never changes which weights a batch is sampled with."""

    def __init__(self, max_staleness: int) -> None:
        self.k = int(max_staleness)
        self.synced = -1  # no weights yet: the producer must not sample before sync 0 arrives
        self.requests: deque[tuple[int, Any]] = deque()
        self.staged: deque[tuple[int, Any]] = deque()

    def add_request(self, t: int, item: Any) -> None:
        self.requests.append((int(t), item))

    def add_weights(self, index: int, item: Any) -> None:
        self.staged.append((int(index), item))

    def _apply(self) -> tuple[str, int, Any]:
        index, item = self.staged.popleft()
        if index != self.synced + 1:
            raise RuntimeError(f"weights of sync {index} arrived after sync {self.synced}")
        self.synced = index
        return "apply", index, item

    def next(self) -> tuple[str, int, Any] | None:
        """``("apply", sync index, weights)``, ``("generate", t, request)`` or None (wait for a message)."""
        if not self.requests:
            return self._apply() if self.staged else None
        t, item = self.requests[0]
        if self.staged and self.synced < weights_for_batch(t, self.k):
            return self._apply()
        if not check_admission(t, self.k, self.synced):
            return None
        self.requests.popleft()
        return "generate", t, item


class StalenessMeter:
    """What the trainer logs about its rollouts: staleness of each batch it takes, time spent waiting for
    batches, time spent sending weights. ``summary()`` returns the values since the previous call."""

    def __init__(self) -> None:
        self._staleness: list[int] = []
        self._wait_s = 0.0
        self._sync_s = 0.0
        self.max_seen = 0

    def record_batch(self, sampled_with: int, trainer_at: int, wait_s: float) -> int:
        """A batch sampled with sync ``sampled_with`` is taken by a trainer holding sync ``trainer_at``."""
        staleness = int(trainer_at) - int(sampled_with)
        if staleness < 0:
            raise RuntimeError(f"a batch sampled with sync {sampled_with} reached a trainer at sync "
                               f"{trainer_at}")
        self._staleness.append(staleness)
        self.max_seen = max(self.max_seen, staleness)
        self._wait_s += wait_s
        return staleness

    def record_sync(self, seconds: float) -> None:
        self._sync_s += seconds

    def summary(self) -> dict[str, float]:
        values = self._staleness or [0]
        out = {
            "rollout/staleness_mean": sum(values) / len(values),
            "rollout/staleness_max": float(max(values)),
            "rollout/wait_s": self._wait_s,
            "rollout/sync_s": self._sync_s,
        }
        self._staleness, self._wait_s, self._sync_s = [], 0.0, 0.0
        return out
