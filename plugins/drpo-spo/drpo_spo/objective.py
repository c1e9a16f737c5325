"""SPO: a policy-gradient loss with a quadratic penalty on the importance ratio, as a drpo-lightning plugin.

Registered in this package's ``pyproject.toml``::

    [project.entry-points."drpo_lightning.objectives"]
    spo = "drpo_spo.objective:SPO"
"""

from __future__ import annotations

import torch

from drpo_lightning.objectives.base import LossAggMode, Objective, check_positive, clamped_ratio


class SPO(Objective):
    r"""Per sampled token, with ``r = exp(z - y)`` (``z = log pi_theta``, ``y`` the anchor log-prob) and
    advantage ``A``:

    .. math::

        \ell = -A\,r + |A|\,\frac{(r - 1)^2}{2\epsilon},
        \qquad \frac{\partial \ell}{\partial z} = -A\,r\,\Big(1 - \operatorname{sign}(A)\,\frac{r - 1}{\epsilon}\Big)

    DRPO without the ``mu`` factor: the trust region is measured in ratio units, so the gradient weight
    ``w = 1 - sign(A) (r - 1) / epsilon`` reaches 0 at ``r = 1 + sign(A) epsilon`` (PPO's clip boundary) and
    turns negative (pulls the token back) beyond it. The log-ratio is clamped like the built-ins do (see
    ``drpo_lightning.objectives.base.LOG_RATIO_CLAMP``), so loss and gradient stay finite for any input.

    Metrics (detached means over valid tokens): ``spo/weight_mean`` (``w``), ``spo/corrective_frac`` (share
    of tokens with ``w < 0``).

    Args:
        epsilon: trust-region size in ratio units (> 0).
        loss_agg_mode: how token losses become one scalar (token-mean, seq-mean-token-sum,
            seq-mean-token-mean or seq-mean-token-sum-norm), as for the built-in objectives.
        loss_agg_horizon: the fixed length seq-mean-token-sum-norm divides by (null: the batch's).
    """

    def __init__(
        self, epsilon: float = 0.2, loss_agg_mode: LossAggMode = "token-mean", loss_agg_horizon: int | None = None
    ) -> None:
        super().__init__(loss_agg_mode=loss_agg_mode, loss_agg_horizon=loss_agg_horizon)
        check_positive("epsilon", epsilon)  # ValueError: "epsilon must be > 0, got ..."
        self.epsilon = float(epsilon)

    def token_loss(self, logprobs, old_logprobs, advantages, mask, **extras):
        ratio = clamped_ratio(logprobs, old_logprobs)  # [B, T]
        token_loss = advantages.abs() * (ratio - 1).square() / (2 * self.epsilon) - advantages * ratio
        with torch.no_grad():
            weight = 1 - torch.sign(advantages) * (ratio - 1) / self.epsilon  # [B, T]
            # where, not multiply: a padded position may hold any anchor (NaN included), and NaN * 0 = NaN.
            weight = torch.where(mask > 0, weight, torch.zeros_like(weight))
            n = mask.sum().clamp(min=1)
            metrics = {
                "spo/weight_mean": weight.sum() / n,
                "spo/corrective_frac": ((weight < 0) & (mask > 0)).sum() / n,
            }
        return token_loss, metrics
