"""DPPO: trust-region policy optimisation by a divergence mask (Qi et al., https://arxiv.org/abs/2602.04879)."""

from __future__ import annotations

import torch

from drpo_lightning.objectives.base import Objective, check_positive, clamped_ratio, masked_mean

DIVERGENCES = ("tv", "kl", "topk")
TOPK_EXTRAS = ("topk_logprobs", "old_topk_logprobs", "topk_ids", "token_ids")


class DPPO(Objective):
    r"""Divergence-masked policy gradient: PPO's ratio clip replaced by a mask on how far each token's
    probability has moved from the behaviour policy ``mu``.

    Per sampled token, with ``z = log pi_theta``, ``y = log mu`` (anchor, constant), ``r = exp(z - y)``,
    ``pi = exp(z)``, ``mu = exp(y)`` and advantage ``A``, the gradient w.r.t. ``z`` is

    .. math::

        -A\,r\,M, \qquad \ell = -A\,r\,\operatorname{sg}(M)

    (``sg``: stop-gradient; the surrogate's *value* has no meaning of its own). ``M = 0`` only when the
    token moved *away* from ``mu`` in the advantage's direction *and* the divergence ``D`` exceeds the
    threshold of that side; moving back toward ``mu`` is never masked:

    - ``A > 0``: masked iff ``pi > mu`` and ``D > delta_high``;
    - ``A <= 0``: masked iff ``pi < mu`` and ``D > delta_low``.

    Divergences ``D``:

    - ``"tv"`` (Binary-TV): ``|pi - mu|``.
    - ``"kl"`` (Binary-KL): ``mu ln(mu/pi) + (1 - mu) ln((1 - mu)/(1 - pi))``, the KL between the two
      Bernoulli distributions "this token / any other token".
    - ``"topk"`` (Top-K TV): ``0.5 * sum |pi_i - mu_i|`` over ``mu``'s top-K tokens, the sampled token (when
      it is not among them) and one "other" bucket holding the remaining mass ``1 - sum(rest)``. It needs
      four extra inputs to the call:

      - ``old_topk_logprobs`` ``[B, T, K]``: ``mu``'s K largest log-probs (from the rollout engine),
      - ``topk_ids`` ``[B, T, K]``: their token ids,
      - ``topk_logprobs`` ``[B, T, K]``: the current policy's log-probs at those same ids,
      - ``token_ids`` ``[B, T]``: the sampled tokens.

      Whether the sampled token is in the top-K is decided by comparing ids, not log-prob values (ties and
      the rollout engine's rounding make value matching unreliable). When it is in the top-K, its entry in
      the top-K tensors is used and the token is not counted a second time.

    With ``ratio_cap = C`` the importance ratio is truncated at ``C`` (gradient ``-A min(r, C) M``) through
    ``l = -A sg(min(r, C)/r) r sg(M)``.

    The log-ratio is clamped to ``[-20, 20]`` (see :data:`~drpo_lightning.objectives.base.LOG_RATIO_CLAMP`);
    the divergences are computed in a form that stays finite for ``pi`` or ``mu`` at 0 or 1.

    Published thresholds: TV 0.15-0.2, KL 0.05.

    Metrics (detached, over valid tokens): ``dppo/masked_frac`` (fraction of tokens whose gradient is
    masked) and ``dppo/divergence_mean`` (mean ``D``).

    Args:
        divergence: ``"tv"``, ``"kl"`` or ``"topk"``.
        delta_low: threshold for tokens with ``A <= 0`` (> 0).
        delta_high: threshold for tokens with ``A > 0`` (> 0).
        ratio_cap: truncate the importance ratio at this value (> 0); None: no truncation.
        topk: how many of ``mu``'s top log-probs the rollout must return (used by ``"topk"`` only).
        loss_agg_mode: see :class:`~drpo_lightning.objectives.base.Objective`.
        loss_agg_horizon: see :class:`~drpo_lightning.objectives.base.Objective`.
    """

    def __init__(
        self,
        divergence: str = "tv",
        delta_low: float = 0.15,
        delta_high: float = 0.15,
        ratio_cap: float | None = None,
        topk: int = 20,
        loss_agg_mode: str = "token-mean",
        loss_agg_horizon: int | None = None,
    ) -> None:
        super().__init__(loss_agg_mode=loss_agg_mode, loss_agg_horizon=loss_agg_horizon)
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        check_positive("delta_low", delta_low)
        check_positive("delta_high", delta_high)
        check_positive("ratio_cap", ratio_cap, allow_none=True)
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be an integer >= 1, got {topk!r}")
        self.divergence = divergence
        self.delta_low = float(delta_low)
        self.delta_high = float(delta_high)
        self.ratio_cap = None if ratio_cap is None else float(ratio_cap)
        self.topk = topk
        # Only the top-K divergence makes the rollout engine return mu's top log-probs.
        self.requires_topk = topk if divergence == "topk" else 0

    def token_loss(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        **extras: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ratio = clamped_ratio(logprobs, old_logprobs)  # [B, T]
        with torch.no_grad():
            z = logprobs.detach()
            pi, mu = z.exp(), old_logprobs.exp()  # [B, T]
            if self.divergence == "tv":
                div = (pi - mu).abs()
            elif self.divergence == "kl":
                div = binary_kl(z, old_logprobs)
            else:
                div = self._topk_tv(pi, mu, extras)
            # The direction is read in log space: pi > mu <=> z > y, exact even where pi - mu rounds to 0.
            masked = torch.where(
                advantages > 0,
                (z > old_logprobs) & (div > self.delta_high),
                (z < old_logprobs) & (div > self.delta_low),
            )  # [B, T]
            # -A * sg(M) (* sg(min(r, C)/r)) is a per-token constant; the loss is linear in r through it.
            coef = torch.where(masked, 0.0, -advantages)  # [B, T]
            if self.ratio_cap is not None:
                coef = coef * (self.ratio_cap / ratio.detach()).clamp(max=1)
            n = mask.sum().clamp(min=1)
            metrics = {
                "dppo/masked_frac": (masked * mask).sum() / n,
                "dppo/divergence_mean": masked_mean(div, mask),  # selects valid tokens: padding may be NaN
            }
        return coef * ratio, metrics

    def _topk_tv(self, pi: torch.Tensor, mu: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [k for k in TOPK_EXTRAS if extras.get(k) is None]
        if missing:
            raise ValueError(
                f"DPPO(divergence='topk') needs the call arguments {list(TOPK_EXTRAS)}; missing {missing} "
                f"(got extras {sorted(extras)}). The rollout must return mu's top-{self.topk} log-probs "
                f"and ids (requires_topk={self.requires_topk})."
            )
        topk_logprobs = extras["topk_logprobs"].detach()
        old_topk_logprobs = extras["old_topk_logprobs"].detach()
        topk_ids, token_ids = extras["topk_ids"], extras["token_ids"]
        shape = tuple(pi.shape)
        if topk_logprobs.dim() != 3 or tuple(topk_logprobs.shape[:2]) != shape:
            raise ValueError(
                f"topk_logprobs must be [B, T, K] with [B, T]={shape}, got {tuple(topk_logprobs.shape)}"
            )
        for name, tensor in (("old_topk_logprobs", old_topk_logprobs), ("topk_ids", topk_ids)):
            if tensor.shape != topk_logprobs.shape:
                raise ValueError(
                    f"{name} must have the shape of topk_logprobs {tuple(topk_logprobs.shape)}, "
                    f"got {tuple(tensor.shape)}"
                )
        if tuple(token_ids.shape) != shape:
            raise ValueError(f"token_ids must be [B, T]={shape}, got {tuple(token_ids.shape)}")
        return topk_tv(
            pi,
            mu,
            topk_logprobs.to(pi.dtype).exp(),
            old_topk_logprobs.to(pi.dtype).exp(),
            in_topk=(topk_ids == token_ids.unsqueeze(-1)).any(-1),
        )


def binary_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(mu) || Bernoulli(pi)) from log-probs, finite for pi or mu at 0 or 1.

    ``1 - p`` comes from ``-expm1(log p)`` (exact near p = 1, where ``1 - exp`` cancels); ``xlogy`` makes
    ``0 log 0 = 0`` when mu = 1; ``1 - pi`` is floored at the dtype's smallest normal so that pi = 1
    gives a large finite divergence (-> masked) instead of inf.
    """
    tiny = torch.finfo(logprobs.dtype).tiny
    mu = old_logprobs.exp()
    not_pi = (-torch.expm1(logprobs)).clamp(min=tiny)  # [B, T] 1 - pi
    not_mu = (-torch.expm1(old_logprobs)).clamp(min=0)  # [B, T] 1 - mu
    return mu * (old_logprobs - logprobs) + torch.xlogy(not_mu, not_mu) - torch.xlogy(not_mu, not_pi)


def topk_tv(
    pi: torch.Tensor,
    mu: torch.Tensor,
    pi_topk: torch.Tensor,
    mu_topk: torch.Tensor,
    in_topk: torch.Tensor,
) -> torch.Tensor:
    """Total variation over mu's top-K tokens, the sampled token and an "other" bucket.

    Args:
        pi, mu: ``[B, T]`` probabilities of the sampled token.
        pi_topk, mu_topk: ``[B, T, K]`` probabilities at mu's top-K token ids.
        in_topk: ``[B, T]`` bool, the sampled token is one of the top-K ids (then it is counted once).
    """
    outside = (~in_topk).to(pi.dtype)  # [B, T]
    pi_set = pi_topk.sum(-1) + outside * pi  # [B, T]
    mu_set = mu_topk.sum(-1) + outside * mu
    # Rounding can push a set's mass past 1; the other bucket holds the rest, never negative mass.
    pi_other = (1 - pi_set).clamp(min=0)
    mu_other = (1 - mu_set).clamp(min=0)
    return 0.5 * ((pi_topk - mu_topk).abs().sum(-1) + outside * (pi - mu).abs() + (pi_other - mu_other).abs())
