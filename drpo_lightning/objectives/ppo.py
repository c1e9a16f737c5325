"""PPO/GRPO clipped surrogate (Schulman et al., 2017, https://arxiv.org/abs/1707.06347), with clip-higher
(DAPO, https://arxiv.org/abs/2503.14476) and dual-clip (Ye et al., 2020, https://arxiv.org/abs/1912.09729)."""

from __future__ import annotations

import torch

from drpo_lightning.objectives.base import LossAggMode, Objective, check_finite, check_positive, clamped_ratio


class PPO(Objective):
    r"""Clipped importance-weighted policy gradient (PPO; GRPO when paired with group advantages).

    Per sampled token, with ``r = exp(z - y)`` (``z = log pi_theta``, ``y`` the anchor log-prob) and
    advantage ``A``:

    .. math::

        \ell = \max\big(-A\,r,\; -A\,\operatorname{clip}(r, 1 - \epsilon_{low}, 1 + \epsilon_{high})\big)

    and, with dual-clip ``c > 1``, for ``A < 0`` only: ``l = min(l, -A c)``, which bounds the loss of a
    token whose ratio ran far above 1 against a negative advantage.

    The gradient is ``-A r`` where the unclipped term is active and 0 where the clip is:

    - low side: ``A < 0`` and ``r < 1 - clip_low``;
    - high side: ``A > 0`` and ``r > 1 + clip_high``;
    - dual clip: ``A < 0`` and ``r > c``.

    ``clip_high > clip_low`` (e.g. 0.28 vs 0.2) is DAPO's clip-higher. The log-ratio is clamped to
    ``[-20, 20]`` (see :data:`~drpo_lightning.objectives.base.LOG_RATIO_CLAMP`).

    Metrics (detached fractions of valid tokens whose gradient the respective clip zeroes):
    ``ppo/clip_frac_low``, ``ppo/clip_frac_high``, ``ppo/dual_clip_frac``.

    Args:
        clip_low: ``epsilon_low`` in ``(0, 1)``.
        clip_high: ``epsilon_high > 0``.
        dual_clip: ``c > 1``; None turns dual-clip off. (NaN and inf are refused for all three.)
        loss_agg_mode: how token losses become one scalar: token-mean (every valid token of the batch
            weighs the same), seq-mean-token-sum, seq-mean-token-mean or seq-mean-token-sum-norm.
        loss_agg_horizon: the fixed length seq-mean-token-sum-norm divides by (null: the completion
            length of the batch, which the trainer keeps at the rollout's max_new_tokens).
    """

    def __init__(
        self,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        dual_clip: float | None = None,
        loss_agg_mode: LossAggMode = "token-mean",
        loss_agg_horizon: int | None = None,
    ) -> None:
        super().__init__(loss_agg_mode=loss_agg_mode, loss_agg_horizon=loss_agg_horizon)
        for name, value in (("clip_low", clip_low), ("clip_high", clip_high), ("dual_clip", dual_clip)):
            check_finite(name, value)
        if clip_low is None or not 0 < clip_low < 1:
            raise ValueError(f"clip_low must be in (0, 1), got {clip_low!r}")
        check_positive("clip_high", clip_high)
        if dual_clip is not None and not dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip!r}")
        self.clip_low = float(clip_low)
        self.clip_high = float(clip_high)
        self.dual_clip = None if dual_clip is None else float(dual_clip)

    def token_loss(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        **extras: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ratio = clamped_ratio(logprobs, old_logprobs)  # [B, T]
        low, high = 1 - self.clip_low, 1 + self.clip_high
        unclipped = -advantages * ratio  # [B, T]
        clipped = -advantages * ratio.clamp(low, high)  # [B, T]
        token_loss = torch.maximum(unclipped, clipped)
        if self.dual_clip is not None:
            # Only A < 0 is bounded: for A > 0 the bound -A c would sit below the loss and clip nothing.
            bound = torch.where(advantages < 0, -advantages * self.dual_clip, torch.inf)  # [B, T]
            token_loss = torch.minimum(token_loss, bound)

        with torch.no_grad():
            r = ratio.detach()
            n = mask.sum().clamp(min=1)
            negative = advantages < 0
            clip_low = negative & (r < low)
            clip_high = (advantages > 0) & (r > high)
            metrics = {
                "ppo/clip_frac_low": (clip_low * mask).sum() / n,
                "ppo/clip_frac_high": (clip_high * mask).sum() / n,
            }
            if self.dual_clip is not None:
                metrics["ppo/dual_clip_frac"] = ((negative & (r > self.dual_clip)) * mask).sum() / n
            else:
                metrics["ppo/dual_clip_frac"] = torch.zeros((), dtype=mask.dtype, device=mask.device)
        return token_loss, metrics
