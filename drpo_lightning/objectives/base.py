"""The objective interface and the loss aggregation shared by every objective.

An objective turns per-token log-probs into a scalar loss. The public call, which third-party objectives
implement too, is::

    out = objective(logprobs=z, old_logprobs=y, advantages=A, mask=m)   # z, y, m: [B, T]; A: [B] or [B, T]
    out.loss.backward(); out.metrics["clip_frac"]

``old_logprobs`` is the trust-region anchor: the behaviour policy mu's log-probs as reported by the rollout
engine (DRPO/DPPO default) or a recomputed pi_old (classic PPO). A subclass writes only
:meth:`Objective.token_loss`; validation, aggregation and the shared metrics live here, once.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Literal, get_args

import torch

from drpo_lightning.types import ObjectiveOutput

LossAggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
"""How token losses become one scalar (the config validates the name, and ``--help`` lists the four)."""
AGG_MODES: tuple[str, ...] = get_args(LossAggMode)


LOG_RATIO_CLAMP = 20.0
"""Objectives clamp the log-ratio ``z - y`` to ``[-20, 20]`` before ``exp`` (ratio within ``[2e-9, 4.9e8]``).

Without it ``exp`` (and DRPO's ``r**2``) overflows float32 for large log-prob gaps, so one token with a tiny
anchor probability (a train/rollout mismatch, or garbage on a padded position) would turn the whole loss into
inf/NaN. Inside the clamp loss and gradient are exact; beyond it a token's loss is constant, so it carries no
gradient (verl applies the same safety to PPO's ratio).
"""


def clamped_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """``exp(clamp(z - y, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))``, differentiable w.r.t. ``logprobs``."""
    return (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()


def check_finite(name: str, value: float | None, hint: str = "") -> None:
    """NaN fails every comparison, so a range check written as ``not value > 0`` catches it only by luck, and
    inf passes ``> 0``: refuse both by name before the range checks."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}{hint}")


def check_positive(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def aggregation_count(mask: torch.Tensor, loss_agg_mode: str) -> torch.Tensor:
    """The denominator ``mode`` divides by for this mask: valid tokens (``token-mean``) or non-empty
    sequences (the ``seq-mean-*`` modes). Sum it over every minibatch and rank to get the *global* count.
    """
    if loss_agg_mode == "token-mean":
        return mask.sum()
    return (mask.sum(-1) > 0).sum().to(mask.dtype)


def aggregate(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    *,
    global_count: float | torch.Tensor | None = None,
    horizon: int | None = None,
) -> torch.Tensor:
    """Reduce a ``[B, T]`` token loss to a scalar.

    - ``token-mean``: sum(l * m) / sum(m)
    - ``seq-mean-token-sum``: mean over sequences of sum_t(l * m)
    - ``seq-mean-token-mean``: mean over sequences of sum_t(l * m) / sum_t(m)
    - ``seq-mean-token-sum-norm``: mean over sequences of sum_t(l * m) / horizon (Dr. GRPO); ``horizon``
      defaults to ``T`` and should be the fixed ``max_new_tokens`` so it does not vary between batches.

    With ``global_count`` (from :func:`aggregation_count` summed over every minibatch and rank) the result is
    a *sum* divided by that global count, so the losses of the pieces of a split batch add up to the loss of
    the whole batch: gradients do not depend on how the batch was split.
    """
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {loss_agg_mode!r}")
    # where, not multiply: a non-finite value on a padded position must not turn the loss into NaN.
    masked = torch.where(mask > 0, token_loss * mask, torch.zeros_like(token_loss))  # [B, T]
    if loss_agg_mode == "token-mean":
        numerator = masked.sum()
    else:
        per_seq = masked.sum(-1)  # [B]
        if loss_agg_mode == "seq-mean-token-mean":
            per_seq = per_seq / mask.sum(-1).clamp(min=1)
        elif loss_agg_mode == "seq-mean-token-sum-norm":
            per_seq = per_seq / float(horizon if horizon is not None else mask.shape[-1])
        numerator = per_seq.sum()
    if global_count is None:
        global_count = aggregation_count(mask, loss_agg_mode)
    denominator = torch.as_tensor(global_count, dtype=numerator.dtype, device=numerator.device)
    # An all-padding minibatch contributes exactly zero, never 0/0.
    return numerator / denominator.clamp(min=1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    values = torch.where(mask > 0, values, torch.zeros_like(values))
    return (values * mask).sum() / mask.sum().clamp(min=1)


class Objective(ABC):
    """Base class of every objective plugin.

    Args:
        loss_agg_mode: how token losses become one scalar: ``token-mean``, ``seq-mean-token-sum``,
            ``seq-mean-token-mean`` or ``seq-mean-token-sum-norm``.
        loss_agg_horizon: the fixed length ``seq-mean-token-sum-norm`` divides by (default: the
            completion length ``T`` of the batch, which the trainer keeps at ``max_new_tokens``).
    """

    requires_topk: int = 0
    """How many of the anchor's top log-probs per position this objective needs (0: none)."""

    def __init__(self, loss_agg_mode: LossAggMode = "token-mean", loss_agg_horizon: int | None = None) -> None:
        if loss_agg_mode not in AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {loss_agg_mode!r}")
        check_positive("loss_agg_horizon", loss_agg_horizon, allow_none=True)
        self.loss_agg_mode = loss_agg_mode
        self.loss_agg_horizon = loss_agg_horizon

    @abstractmethod
    def token_loss(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        **extras: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-token loss ``[B, T]`` and the objective's own metrics (detached scalars, means over valid
        tokens). ``advantages`` arrives broadcast to ``[B, T]``."""

    def end_rollout(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Called by the trainer once after all updates on a rollout (every epoch and minibatch), on every
        rank. An objective that adapts between rollouts (DRPO's ``target_divergence``) does it here and
        returns metrics to log; ``reduce_sum`` sums a tensor over ranks (identity on one process) so every
        rank takes the same decision. Default: nothing."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State that changes during training and must survive a resume (saved in every checkpoint). A
        stateless objective returns ``{}`` and its configuration alone rebuilds it."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (optional hook, not abstract)
        """Restore what :meth:`state_dict` returned."""

    def count(self, mask: torch.Tensor) -> torch.Tensor:
        """This objective's aggregation denominator for ``mask`` (see :func:`aggregation_count`)."""
        return aggregation_count(mask, self.loss_agg_mode)

    def __call__(
        self,
        *,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        global_count: float | torch.Tensor | None = None,
        **extras: torch.Tensor,
    ) -> ObjectiveOutput:
        """Loss and metrics for one (mini)batch.

        Args:
            logprobs: ``[B, T]`` log pi_theta of the sampled tokens (requires grad).
            old_logprobs: ``[B, T]`` anchor log-probs (behaviour mu or recomputed pi_old); no gradient flows.
            advantages: ``[B]`` per completion or ``[B, T]`` per token.
            mask: ``[B, T]`` 1 on completion tokens that count, 0 on padding.
            global_count: denominator shared by all minibatches and ranks of one update (see
                :func:`aggregate`); the local count when None.
            extras: objective-specific inputs, e.g. ``topk_logprobs``/``old_topk_logprobs`` ``[B, T, K]``.
        """
        advantages = validate_inputs(logprobs, old_logprobs, advantages, mask)
        mask = mask.to(logprobs.dtype)
        old_logprobs = old_logprobs.detach().to(logprobs.dtype)
        token_loss, metrics = self.token_loss(logprobs, old_logprobs, advantages, mask, **extras)
        loss = aggregate(
            token_loss, mask, self.loss_agg_mode, global_count=global_count, horizon=self.loss_agg_horizon
        )
        with torch.no_grad():
            log_ratio = logprobs.detach() - old_logprobs
            ratio = log_ratio.exp()
            metrics = {k: v.detach() for k, v in metrics.items()}
            metrics["abs_prob_diff"] = masked_mean((logprobs.detach().exp() - old_logprobs.exp()).abs(), mask)
            # k3 estimator of KL(mu || pi) from tokens sampled under mu: E_mu[r - 1 - log r] >= 0.
            metrics["kl_k3"] = masked_mean(ratio - 1 - log_ratio, mask)
            metrics["ratio_mean"] = masked_mean(ratio, mask)
        return ObjectiveOutput(loss, metrics)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def validate_inputs(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Check the public call's shapes and mask; return advantages broadcast to ``[B, T]``."""
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    for name, tensor in (("old_logprobs", old_logprobs), ("mask", mask)):
        if tensor.shape != logprobs.shape:
            raise ValueError(
                f"{name} must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(tensor.shape)}"
            )
    if advantages.dim() == 1 and advantages.shape[0] == logprobs.shape[0]:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)
    elif advantages.shape != logprobs.shape:
        raise ValueError(
            f"advantages must be [B]={logprobs.shape[0]} or [B, T]={tuple(logprobs.shape)}, "
            f"got {tuple(advantages.shape)}"
        )
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ValueError(f"mask must hold only 0 and 1, got a value {bad!r}")
    return advantages.detach().to(logprobs.dtype)
