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

    **Adaptive delta** (``target_divergence``, off by default). A fixed ``delta`` suits one learning phase:
    early updates move tokens far and need a tight region, late ones barely move and are slowed by it for
    nothing. With ``target_divergence = d*`` the trainer calls :meth:`end_rollout` after each rollout's
    updates; it takes the measured mean ``|pi - mu|`` over the valid tokens of those updates (``d``, each
    minibatch measured at its forward, summed over ranks) and moves ``delta`` multiplicatively, as PPO's
    adaptive KL coefficient does (Schulman et al., 2017, section 4), within ``[delta_min, delta_max]``:

    .. math::

        \delta \leftarrow \begin{cases} \max(\delta / 2,\ \delta_{min}) & d > 1.5\, d^* \\
                                       \min(2 \delta,\ \delta_{max}) & d < d^* / 1.5 \\
                                       \delta & \text{otherwise} \end{cases}

    A smaller ``delta`` pulls tokens back sooner, so the next rollout's divergence shrinks. ``delta`` is
    the starting value, logged every step as ``drpo/delta`` and saved in every checkpoint, so a resumed run
    continues with the delta it had. A divergence the updates do not cause (a rollout engine's numerical
    mismatch is there before the first update) cannot be steered: ``delta`` then settles at a bound.

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
        target_divergence: adapt delta after each rollout to keep the mean |pi - mu| of the updates near
            this value (probability units, > 0); null keeps delta fixed.
        delta_min: smallest delta the adaptation may reach (> 0).
        delta_max: largest delta the adaptation may reach (>= delta_min).
    """

    def __init__(
        self,
        delta: float = 12.5,
        loss_agg_mode: LossAggMode = "token-mean",
        loss_agg_horizon: int | None = None,
        target_divergence: float | None = None,
        delta_min: float = 0.01,
        delta_max: float = 12.5,
    ) -> None:
        super().__init__(loss_agg_mode=loss_agg_mode, loss_agg_horizon=loss_agg_horizon)
        for name, value in (("delta", delta), ("target_divergence", target_divergence),
                            ("delta_min", delta_min), ("delta_max", delta_max)):
            check_finite(name, value)
            check_positive(name, value, allow_none=name == "target_divergence")
        if delta_min > delta_max:
            raise ValueError(f"DRPO: delta_min = {delta_min} must be <= delta_max = {delta_max}")
        if target_divergence is not None and not delta_min <= delta <= delta_max:
            raise ValueError(
                f"DRPO: delta = {delta} must lie within [delta_min, delta_max] = [{delta_min}, {delta_max}] "
                "when target_divergence is set"
            )
        self.delta = float(delta)
        self.target_divergence = None if target_divergence is None else float(target_divergence)
        self.delta_min = float(delta_min)
        self.delta_max = float(delta_max)
        # sum of |pi - mu| over valid tokens and their count since the last end_rollout (adaptive only)
        self._divergence_sum = 0.0
        self._divergence_count = 0.0

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
            metrics["drpo/delta"] = torch.tensor(self.delta)
            if self.target_divergence is not None:
                shift = (logprobs.detach().exp() - mu).abs()  # [B, T]
                # a non-finite token (its update is skipped anyway) must not turn the measure into NaN
                counted = (mask > 0) & torch.isfinite(shift)  # [B, T]
                # tensors, not floats: no host sync per minibatch on a GPU
                self._divergence_sum = self._divergence_sum + torch.where(counted, shift, 0.0).sum().double()
                self._divergence_count = self._divergence_count + counted.sum().double()
        return token_loss, metrics

    def end_rollout(self, reduce_sum=None) -> dict[str, torch.Tensor]:
        """Adapt ``delta`` to the divergence measured since the last call (see the class docstring)."""
        if self.target_divergence is None:
            return {}
        if isinstance(self._divergence_count, float):  # no token reached token_loss on this rank
            totals = torch.zeros(2, dtype=torch.float64)
        else:
            totals = torch.stack([self._divergence_sum, self._divergence_count])
        if reduce_sum is not None:
            totals = reduce_sum(totals)
        self._divergence_sum = self._divergence_count = 0.0
        total, count = (float(v) for v in totals)
        if count == 0:  # no valid, finite token was measured: no evidence, no move
            return {}
        measured = total / count
        if measured > 1.5 * self.target_divergence:
            self.delta = max(self.delta / 2, self.delta_min)
        elif measured < self.target_divergence / 1.5:
            self.delta = min(self.delta * 2, self.delta_max)
        return {"drpo/measured_divergence": torch.tensor(measured, dtype=torch.float64)}

    def state_dict(self) -> dict[str, float]:
        return {} if self.target_divergence is None else {"delta": self.delta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Take the checkpoint's adapted delta (the config's ``delta`` is only the starting value), within
        this config's ``[delta_min, delta_max]``."""
        if self.target_divergence is not None and "delta" in state:
            self.delta = min(max(float(state["delta"]), self.delta_min), self.delta_max)

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
