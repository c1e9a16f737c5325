"""Misbehaving plugins for the reliability tests (importable by class path: ``rel_plugins.FlakyReward``).

pytest puts ``tests/reliability`` on ``sys.path`` (no ``__init__.py``), so the CLI tests can name these classes
in a config, exactly as a user names a plugin of their own.
"""

from __future__ import annotations

import threading
from typing import Literal

import torch

from drpo_lightning.objectives.drpo import DRPO
from drpo_lightning.rewards.base import RewardFunction
from drpo_lightning.rollouts.hf import HFRollout

RELEASE_HANGS = threading.Event()
"""Set by the tests' teardown: lets every hung reward call return so no thread outlives its test."""


class ExplodingReward(RewardFunction):
    """Raises on every call, like a grader with a bug."""

    def __call__(self, *, prompts, completions, **columns):
        raise KeyError("grader lost its answer key")


class NaNAtSample(RewardFunction):
    """0.5 for every completion except ``index``, which gets NaN."""

    def __init__(self, index: int = 1) -> None:
        self.index = index

    def __call__(self, *, prompts, completions, **columns):
        return [float("nan") if i == self.index else 0.5 for i in range(len(completions))]


class BadScoreAtSample(RewardFunction):
    """0.5 for every completion except ``index``, which gets ``value`` (inf, -inf, None, a string...)."""

    def __init__(self, value: object = None, index: int = 1) -> None:
        self.value = value
        self.index = index

    def __call__(self, *, prompts, completions, **columns):
        return [self.value if i == self.index else 0.5 for i in range(len(completions))]


class WrongLengthReward(RewardFunction):
    """One score too few: a grader that silently dropped a sample."""

    def __call__(self, *, prompts, completions, **columns):
        return [1.0] * (len(completions) - 1)


class FlakyReward(RewardFunction):
    """Fails differently on each call, cycling through ``SCHEDULE``; records how many scores it failed."""

    SCHEDULE = ("bad_values", "raise", "hang", "ok")

    def __init__(self, hang_seconds: float = 30.0, start: int = 0) -> None:
        self.hang_seconds = hang_seconds
        self.calls = start
        self.expected_fallbacks: list[int] = []

    def __call__(self, *, prompts, completions, **columns):
        n = len(completions)
        mode = self.SCHEDULE[self.calls % len(self.SCHEDULE)]
        self.calls += 1
        if mode == "bad_values":  # NaN, None, +inf: three bad scores, the rest fine
            self.expected_fallbacks.append(min(n, 3))
            return ([float("nan"), None, float("inf")] + [1.0] * n)[:n]
        if mode == "raise":
            self.expected_fallbacks.append(n)
            raise RuntimeError("scorer crashed")
        if mode == "hang":
            self.expected_fallbacks.append(n)
            RELEASE_HANGS.wait(self.hang_seconds)
            return [1.0] * n
        self.expected_fallbacks.append(0)
        return [1.0 if i % 2 else 0.0 for i in range(n)]


class PoisonedDRPO(DRPO):
    """DRPO whose update number ``k`` (0-based, counting calls) gets a non-finite loss or gradient.

    Args:
        mode: ``loss`` makes the loss NaN; ``grad`` keeps the loss finite and makes its gradient NaN.
        poison_updates: which calls to poison; None poisons every call.
    """

    def __init__(
        self, mode: Literal["loss", "grad"] = "loss", poison_updates: list[int] | None = None, delta: float = 0.2
    ) -> None:
        super().__init__(delta=delta)
        self.mode = mode
        self.poison_updates = poison_updates
        self._calls = 0

    def __call__(self, *, logprobs, **kwargs):
        poison = self.poison_updates is None or self._calls in self.poison_updates
        self._calls += 1
        if poison and self.mode == "grad":
            logprobs.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        out = super().__call__(logprobs=logprobs, **kwargs)
        if poison and self.mode == "loss":
            return out._replace(loss=out.loss * float("nan"))
        return out


class ShiftedRollout(HFRollout):
    """HF sampling whose reported behaviour log-probs are off by ``gap`` nats on some rows: an engine that
    disagrees wildly with the training forward.

    Of every 4 rows, row 1 reports ``y = z - gap`` (ratio ``e^gap``), row 3 ``y = z + gap`` (ratio ``e^-gap``;
    then ``mu = e^y`` is not even a probability, the worst an engine can report) and rows 0 and 2 are left
    alone, so an update still has honest tokens to learn from.
    """

    def __init__(self, gap: float = 50.0, max_new_tokens: int = 3) -> None:
        super().__init__(max_new_tokens=max_new_tokens)
        self.gap = gap

    def generate(self, *args, **kwargs):
        batch = super().generate(*args, **kwargs)
        rows = batch.behavior_logprobs.shape[0]
        sign = torch.tensor([(0.0, -1.0, 0.0, 1.0)[i % 4] for i in range(rows)], device=batch.behavior_logprobs.device)
        shifted = (batch.behavior_logprobs + sign[:, None] * self.gap) * batch.completion_mask
        return batch._replace(behavior_logprobs=shifted)
