"""DPPO: trust-region policy optimisation by a divergence mask (Qi et al., https://arxiv.org/abs/2602.04879)."""

from __future__ import annotations

import torch

from drpo_lightning.objectives.base import (
    LossAggMode,
    Objective,
    check_finite,
    check_positive,
    clamped_ratio,
    masked_mean,
)

DIVERGENCES = ("tv", "kl", "topk", "topk_kl")
TOPK_DIVERGENCES = ("topk", "topk_kl")
TOPK_EXTRAS = ("topk_logprobs", "old_topk_logprobs")
SAMPLED_BUCKET_EXTRAS = ("topk_ids", "token_ids")
DEFAULT_RATIO_CAP = 20.0


class DPPO(Objective):
    r"""Divergence-masked policy gradient: PPO's ratio clip replaced by a mask on how far each token's
    probability has moved from the behaviour policy ``mu``.

    Per sampled token, with ``z = log pi_theta``, ``y = log mu`` (anchor, constant), ``r = exp(z - y)``,
    ``pi = exp(z)``, ``mu = exp(y)`` and advantage ``A``, the gradient w.r.t. ``z`` is

    .. math::

        -A\,\min(r, C)\,M, \qquad \ell = -A\,\operatorname{sg}(\min(r, C)/r)\,r\,\operatorname{sg}(M)

    (``sg``: stop-gradient; the surrogate's *value* has no meaning of its own). ``M = 0`` only when the
    token moved *away* from ``mu`` in the advantage's direction *and* the divergence ``D`` exceeds the
    threshold of that side; moving back toward ``mu`` is never masked:

    - ``A > 0``: masked iff ``pi > mu`` and ``D > delta_high``;
    - ``A <= 0``: masked iff ``pi < mu`` and ``D > delta_low``.

    **Ratio cap** ``C`` (``ratio_cap``, default 20): truncated importance sampling. The weight of *every*
    kept token is ``min(r, C)``, whatever the sign of ``A``: a hard cap on the weight, not PPO's dual clip
    (which drops the gradient of ``A < 0`` tokens past ``c``). Without it a token with a tiny ``mu`` whose
    probability rose carries a weight up to ``e^20`` (the log-ratio clamp): a rise from 1e-4 to 1e-2 moves
    TV and KL by less than any published threshold, so the mask keeps it, and for ``A < 0`` moving up is
    "moving back", never masked however far. Both reference implementations truncate this way: verl's
    ``dppo_tv``/``dppo_kl`` at ``clip_ratio_c`` (20 unless set; its code cites the paper's section 5.4 for a
    *large* threshold, since truncation biases the gradient) and the authors' Stable-RL code at 10. The
    default is verl's 20, the larger of the two: it removes the e^20 weights while biasing the fewest
    tokens. ``ratio_cap=None`` turns truncation off (the paper's untruncated estimator); ``ratio_cap=10``
    matches Stable-RL. One difference remains: beyond the log-ratio clamp (``r > e^20``) a token carries no
    gradient here, where both references keep the weight ``C``.

    Divergences ``D``:

    - ``"tv"`` (Binary-TV): ``|pi - mu|``.
    - ``"kl"`` (Binary-KL): ``mu ln(mu/pi) + (1 - mu) ln((1 - mu)/(1 - pi))``, the KL between the two
      Bernoulli distributions "this token / any other token".
    - ``"topk"`` (Top-K TV) and ``"topk_kl"`` (Top-K KL, ``KL(mu || pi)``): the divergence between ``pi``
      and ``mu`` with the vocabulary collapsed into buckets: one per token of ``mu``'s top-K and one
      "rest" bucket holding the remaining mass ``1 - sum(top-K)``. This is Stable-RL's form (its
      ``compute_topk_kl``) and the default. With ``topk_sampled_bucket=True`` the sampled token gets a
      bucket of its own when it is not among the top-K (taken out of "rest"): a finer partition, so ``D``
      is never smaller and more tokens are masked; that is this project's earlier form.

      Inputs the call then needs (from the rollout engine and the training forward):

      - ``old_topk_logprobs`` ``[B, T, K]``: ``mu``'s K largest log-probs,
      - ``topk_logprobs`` ``[B, T, K]``: the current policy's log-probs at those same ids,
      - with ``topk_sampled_bucket`` also ``topk_ids`` ``[B, T, K]`` (the top-K ids) and ``token_ids``
        ``[B, T]`` (the sampled tokens). Whether the sampled token is in the top-K is decided by comparing
        ids, not log-prob values (ties and the engine's rounding make value matching unreliable).

      The direction of the rule above is still that of the sampled token (``pi > mu``), as in Stable-RL.

    The log-ratio is clamped to ``[-20, 20]`` (see :data:`~drpo_lightning.objectives.base.LOG_RATIO_CLAMP`);
    the divergences are computed in a form that stays finite for ``pi`` or ``mu`` at 0 or 1. (The references
    add 1e-8 inside Binary-KL's logarithms and floor Top-K bucket masses at 1e-12; the values here are exact
    and differ from theirs only for probabilities within about 1e-8 of 0 or 1.)

    Published thresholds: TV 0.15-0.2, KL 0.05.

    Metrics (detached, over valid tokens): ``dppo/masked_frac`` (fraction of tokens whose gradient is
    masked), ``dppo/divergence_mean`` (mean ``D``) and ``dppo/capped_frac`` (fraction of kept tokens whose
    ratio the cap truncated).

    Args:
        divergence: ``"tv"``, ``"kl"``, ``"topk"`` (Top-K TV) or ``"topk_kl"``.
        delta_low: threshold for tokens with ``A <= 0`` (> 0).
        delta_high: threshold for tokens with ``A > 0`` (> 0).
        ratio_cap: truncate the importance ratio at this value (> 0, finite); None: no truncation.
        topk: how many of ``mu``'s top log-probs the rollout must return (Top-K divergences only).
        topk_sampled_bucket: give the sampled token its own bucket when it is outside the top-K.
        loss_agg_mode: how token losses become one scalar: token-mean (every valid token of the batch
            weighs the same), seq-mean-token-sum, seq-mean-token-mean or seq-mean-token-sum-norm.
        loss_agg_horizon: the fixed length seq-mean-token-sum-norm divides by (null: the completion
            length of the batch, which the trainer keeps at the rollout's max_new_tokens).
    """

    def __init__(
        self,
        divergence: str = "tv",
        delta_low: float = 0.15,
        delta_high: float = 0.15,
        ratio_cap: float | None = DEFAULT_RATIO_CAP,
        topk: int = 20,
        topk_sampled_bucket: bool = False,
        loss_agg_mode: LossAggMode = "token-mean",
        loss_agg_horizon: int | None = None,
    ) -> None:
        super().__init__(loss_agg_mode=loss_agg_mode, loss_agg_horizon=loss_agg_horizon)
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        check_finite("delta_low", delta_low)
        check_finite("delta_high", delta_high)
        check_finite("ratio_cap", ratio_cap, hint=" (ratio_cap: null turns truncation off)")
        check_positive("delta_low", delta_low)
        check_positive("delta_high", delta_high)
        check_positive("ratio_cap", ratio_cap, allow_none=True)
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be an integer >= 1, got {topk!r}")
        if not isinstance(topk_sampled_bucket, bool):
            raise ValueError(f"topk_sampled_bucket must be true or false, got {topk_sampled_bucket!r}")
        self.divergence = divergence
        self.delta_low = float(delta_low)
        self.delta_high = float(delta_high)
        self.ratio_cap = None if ratio_cap is None else float(ratio_cap)
        self.topk = topk
        self.topk_sampled_bucket = topk_sampled_bucket
        # Only the top-K divergences make the rollout engine return mu's top log-probs.
        self.requires_topk = topk if divergence in TOPK_DIVERGENCES else 0

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
            if self.divergence == "tv":
                div = (z.exp() - old_logprobs.exp()).abs()
            elif self.divergence == "kl":
                div = binary_kl(z, old_logprobs)
            else:
                div = self._topk_divergence(z, old_logprobs, extras)
            # The direction is read in log space: pi > mu <=> z > y, exact even where pi - mu rounds to 0.
            masked = torch.where(
                advantages > 0,
                (z > old_logprobs) & (div > self.delta_high),
                (z < old_logprobs) & (div > self.delta_low),
            )  # [B, T]
            # -A * sg(M) (* sg(min(r, C)/r)) is a per-token constant; the loss is linear in r through it.
            coef = torch.where(masked, 0.0, -advantages)  # [B, T]
            capped = torch.zeros_like(masked)
            if self.ratio_cap is not None:
                coef = coef * (self.ratio_cap / ratio.detach()).clamp(max=1)
                capped = ~masked & (ratio.detach() > self.ratio_cap)
            n = mask.sum().clamp(min=1)
            metrics = {
                "dppo/masked_frac": (masked * mask).sum() / n,
                "dppo/divergence_mean": masked_mean(div, mask),  # selects valid tokens: padding may be NaN
                "dppo/capped_frac": (capped * mask).sum() / n,
            }
        return coef * ratio, metrics

    def _topk_divergence(
        self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, extras: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        needed = TOPK_EXTRAS + (SAMPLED_BUCKET_EXTRAS if self.topk_sampled_bucket else ())
        missing = [k for k in needed if extras.get(k) is None]
        if missing:
            raise ValueError(
                f"DPPO(divergence={self.divergence!r}, topk_sampled_bucket={self.topk_sampled_bucket}) needs "
                f"the call arguments {list(needed)}; missing {missing} (got extras {sorted(extras)}). The "
                f"rollout must return mu's top-{self.topk} log-probs and ids "
                f"(requires_topk={self.requires_topk})."
            )
        shape = tuple(logprobs.shape)
        topk_logprobs = extras["topk_logprobs"].detach()
        if topk_logprobs.dim() != 3 or tuple(topk_logprobs.shape[:2]) != shape:
            raise ValueError(
                f"topk_logprobs must be [B, T, K] with [B, T]={shape}, got {tuple(topk_logprobs.shape)}"
            )
        for name in needed[1:]:
            expected = shape if name == "token_ids" else tuple(topk_logprobs.shape)
            if tuple(extras[name].shape) != expected:
                what = f"[B, T]={shape}" if name == "token_ids" else f"the shape of topk_logprobs {expected}"
                raise ValueError(f"{name} must be {what}, got {tuple(extras[name].shape)}")
        if self.topk_sampled_bucket:
            own_bucket = ~(extras["topk_ids"] == extras["token_ids"].unsqueeze(-1)).any(-1)  # [B, T]
        else:
            own_bucket = torch.zeros(shape, dtype=torch.bool, device=logprobs.device)
        return topk_divergence(
            "kl" if self.divergence == "topk_kl" else "tv",
            logprobs,
            old_logprobs,
            topk_logprobs.to(logprobs.dtype),
            extras["old_topk_logprobs"].detach().to(logprobs.dtype),
            own_bucket,
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


def topk_divergence(
    kind: str,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    topk_logprobs: torch.Tensor,
    old_topk_logprobs: torch.Tensor,
    own_bucket: torch.Tensor,
) -> torch.Tensor:
    """TV (``kind="tv"``) or KL(mu || pi) (``"kl"``) between pi and mu collapsed into buckets: mu's top-K
    tokens, the sampled token where ``own_bucket``, and the rest.

    Args:
        logprobs, old_logprobs: ``[B, T]`` log pi and log mu of the sampled token.
        topk_logprobs, old_topk_logprobs: ``[B, T, K]`` log pi and log mu at mu's top-K token ids.
        own_bucket: ``[B, T]`` bool, the sampled token has a bucket of its own (it is outside the top-K and
            the sampled-bucket form is used); elsewhere it is counted in the top-K or in the rest.
    """
    own = own_bucket.to(logprobs.dtype)  # [B, T]
    pi_top, mu_top = topk_logprobs.exp(), old_topk_logprobs.exp()  # [B, T, K]
    # Rounding can push the named buckets' mass past 1; the rest bucket never holds negative mass.
    pi_rest = (1 - pi_top.sum(-1) - own * logprobs.exp()).clamp(min=0)  # [B, T]
    mu_rest = (1 - mu_top.sum(-1) - own * old_logprobs.exp()).clamp(min=0)
    if kind == "tv":
        sampled = torch.where(own_bucket, (logprobs.exp() - old_logprobs.exp()).abs(), 0.0)
        return 0.5 * ((pi_top - mu_top).abs().sum(-1) + sampled + (pi_rest - mu_rest).abs())
    # mu log(mu / pi) per bucket, 0 where mu = 0 (an engine may report -inf for a zero-probability token);
    # pi_rest is floored at the smallest normal so that an emptied rest bucket gives a large finite KL.
    top = torch.where(mu_top > 0, mu_top * (old_topk_logprobs - topk_logprobs), 0.0).sum(-1)
    sampled = torch.where(own_bucket, old_logprobs.exp() * (old_logprobs - logprobs), 0.0)
    tiny = torch.finfo(logprobs.dtype).tiny
    return top + sampled + torch.xlogy(mu_rest, mu_rest) - torch.xlogy(mu_rest, pi_rest.clamp(min=tiny))
