"""The contract between rollout, reward, advantage and objective plugins.

Shapes use these letters:

- ``B``: prompts in a batch; ``G``: completions per prompt (the group); ``N = B * G`` completions.
- ``P``: prompt length after left padding; ``T``: completion length after right padding.
- ``K``: how many of the behaviour policy's top log-probs a rollout keeps per position (DPPO-TopK).

Completions of one prompt are stored next to each other: rows ``g * G .. g * G + G - 1`` belong to
prompt ``g`` and share ``group_ids[row] == g``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass
class SamplingParams:
    """How a rollout engine samples completions."""

    max_new_tokens: int = 64
    """Most tokens generated per completion; a completion that reaches it is counted as truncated."""
    min_new_tokens: int = 0
    """Fewest tokens generated per completion (EOS is suppressed before that; used by benchmarks)."""
    temperature: float = 1.0
    """Softmax temperature. Behaviour log-probs come from the temperature-scaled distribution."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 turns it off."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 turns it off."""

    def __post_init__(self) -> None:
        # Checked one by one, types first: a YAML `null` or `.nan` must end in a message naming the field,
        # not in a TypeError from the comparison (and NaN passes every comparison below unnoticed).
        for name in ("max_new_tokens", "min_new_tokens", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


class RolloutBatch(NamedTuple):
    """What a rollout engine returns: N = B * G sampled completions and how they were sampled."""

    prompt_ids: torch.Tensor
    """``[N, P]`` long, left-padded prompt tokens (each prompt repeated G times)."""
    prompt_mask: torch.Tensor
    """``[N, P]`` long, 1 on real prompt tokens, 0 on left padding."""
    completion_ids: torch.Tensor
    """``[N, T]`` long, sampled tokens; positions after the first EOS hold the pad token."""
    completion_mask: torch.Tensor
    """``[N, T]`` float, 1 up to and including the first EOS, 0 after it."""
    behavior_logprobs: torch.Tensor
    """``[N, T]`` float32, log mu(y_t) of each sampled token under the distribution actually sampled
    from (temperature applied, before top-p/top-k truncation), 0 where the mask is 0."""
    truncated: torch.Tensor
    """``[N]`` bool, True where the completion hit ``max_new_tokens`` without emitting EOS."""
    group_ids: torch.Tensor
    """``[N]`` long, index of the prompt each completion answers (within this batch)."""
    topk_logprobs: torch.Tensor | None = None
    """``[N, T, K]`` float32, mu's K largest log-probs per position (None unless asked for)."""
    topk_ids: torch.Tensor | None = None
    """``[N, T, K]`` long, token ids of ``topk_logprobs``."""
    policy_version: torch.Tensor | None = None
    """``[N]`` long, the policy version (optimizer updates applied to the weights) each completion was
    sampled with; None from an engine that samples with the trainer's own, current weights."""


class ObjectiveOutput(NamedTuple):
    """What every objective returns."""

    loss: torch.Tensor
    """Scalar to minimise (differentiable w.r.t. the policy log-probs)."""
    metrics: dict[str, torch.Tensor]
    """Detached scalar tensors explaining what the objective did (clip fractions, weights, ...)."""
