"""DRPO: Divergence Regularized Policy Optimization (Yao et al., 2026, https://arxiv.org/abs/2606.09821)."""

from __future__ import annotations

import torch

from drpo_lightning.objectives.base import LossAggMode, Objective, check_finite, check_positive, clamped_ratio


class DRPO(Objective):
    r"""Divergence Regularized Policy Optimization: a policy-gradient loss with a smooth, quadratic trust
    region around the behaviour policy instead of a hard clip or mask.

    Per sampled token, with ``z = log pi_theta``, ``y = log mu`` (anchor, constant), ``r = exp(z - y)``,
    ``pi = exp(z)``, ``mu = exp(y)`` and advantage ``A``:

    .. math::

        \ell = -A\,r + |A|\,\mu\,\frac{(r - 1)^2}{2\delta}
             = -A\,r + |A|\,\frac{(\pi - \mu)^2}{2\delta\,\mu}

    whose gradient w.r.t. ``z`` is ``-A * r * w`` with

    .. math::

        w = 1 - \operatorname{sign}(A\,(r - 1))\,\frac{|\pi - \mu|}{\delta}.

    ``w`` is continuous and bounded in ``[1 - 1/delta, 1 + 1/delta]``. It is 1 on-policy, shrinks as the
    token moves away from ``mu`` in the direction the advantage pushes it, reaches 0 exactly at DPPO-TV's
    boundary ``|pi - mu| = delta``, turns negative (pulls the token back) beyond it, and exceeds 1 when the
    token is on its way back toward ``mu``. So DRPO keeps a gradient everywhere where DPPO/PPO would drop it.

    What ``delta`` does:

    - ``delta = 12.5`` (the default; the authors' released configuration) is weak regularisation: ``w``
      stays within ``1 +/- 0.08``, nearly the plain importance-weighted policy gradient.
    - ``delta`` in ``0.1 - 0.5`` puts the zero-crossing ``|pi - mu| = delta`` inside ``[0, 1]``: tokens that
      moved far enough get a corrective (negative-weight) gradient, a soft counterpart of DPPO-TV's mask.

    The log-ratio is clamped to ``[-20, 20]`` (see :data:`~drpo_lightning.objectives.base.LOG_RATIO_CLAMP`):
    without it ``r**2`` overflows float32 once ``z - y`` passes ~44. Loss and gradient stay finite in float32
    for any finite input and are exact inside the clamp; a token beyond it carries no gradient.

    Metrics (detached means over valid tokens, computed from the unclamped ``w`` above):

    - ``drpo/weight_mean``: mean of ``w``.
    - ``drpo/corrective_frac``: fraction of tokens with ``w < 0``.
    - ``drpo/beyond_boundary_frac``: fraction that moved away from ``mu`` in the advantage's direction
      (``sign(A (r - 1)) > 0``) by more than ``delta``, i.e. past DPPO-TV's boundary. Since ``|pi - mu| <= 1``
      this is exactly the set with ``w < 0``, so the two fractions are equal (both nonzero only for
      ``delta < 1``); both names are kept, one for each way of reading the number.

    Args:
        delta: trust-region size ``delta > 0`` (in probability units), finite.
        loss_agg_mode: how token losses become one scalar: token-mean (every valid token of the batch
            weighs the same), seq-mean-token-sum, seq-mean-token-mean or seq-mean-token-sum-norm.
        loss_agg_horizon: the fixed length seq-mean-token-sum-norm divides by (null: the completion
            length of the batch, which the trainer keeps at the rollout's max_new_tokens).
    """

    def __init__(
        self,
        delta: float = 12.5,
        loss_agg_mode: LossAggMode = "token-mean",
        loss_agg_horizon: int | None = None,
    ) -> None:
        super().__init__(loss_agg_mode=loss_agg_mode, loss_agg_horizon=loss_agg_horizon)
        check_finite("delta", delta)
        check_positive("delta", delta)
        self.delta = float(delta)

    def token_loss(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        **extras: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Extras (e.g. top-k log-probs meant for DPPO) are ignored, so a trainer may pass the same inputs
        # to every objective.
        ratio = clamped_ratio(logprobs, old_logprobs)  # [B, T]
        with torch.no_grad():
            mu = old_logprobs.exp()  # [B, T]
            # |A| mu / (2 delta) is a constant of the token: building it outside autograd keeps the graph
            # (and the backward pass) as short as PPO's.
            quad_coef = advantages.abs().mul_(mu).mul_(0.5 / self.delta)  # [B, T]
        token_loss = quad_coef * (ratio - 1).square() - advantages * ratio  # [B, T]

        with torch.no_grad():
            metrics = self._metrics(logprobs.detach(), old_logprobs, mu, advantages, mask)
        return token_loss, metrics

    def _metrics(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        mu: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        # sign(A (r - 1)) |pi - mu| = sign(A) (pi - mu), since r - 1 and pi - mu share their sign: one signed
        # "distance moved in the advantage's direction" gives w = 1 - moved / delta in a few passes.
        # In-place ops: on CPU, fresh [B, T] buffers (page faults) cost more than the arithmetic.
        moved = logprobs.exp().sub_(mu).mul_(torch.sign(advantages))  # [B, T]
        moved.masked_fill_(mask == 0, 0.0)  # padding may hold any anchor (NaN, inf): keep it out of the dot
        beyond = (moved > self.delta).to(mask.dtype)  # [B, T] exactly the tokens with w < 0
        flat_mask = mask.reshape(-1)
        n = flat_mask.sum()
        valid = n.clamp(min=1)
        beyond_frac = torch.dot(beyond.reshape(-1), flat_mask) / valid
        return {
            "drpo/weight_mean": (n - torch.dot(moved.reshape(-1), flat_mask) / self.delta) / valid,
            "drpo/corrective_frac": beyond_frac,
            "drpo/beyond_boundary_frac": beyond_frac.clone(),
        }
