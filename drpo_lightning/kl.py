"""Per-token estimators of KL(pi_theta || pi_ref) from tokens sampled by the policy.

With ``d = log pi_ref(y_t) - log pi_theta(y_t)`` (Schulman, "Approximating KL divergence", 2020):

- ``k1 = -d``: unbiased, high variance, can be negative.
- ``k2 = d**2 / 2``: biased, low variance, always >= 0.
- ``k3 = exp(d) - d - 1``: unbiased and always >= 0 (the GRPO default).

``d`` is clamped to [-20, 20] before ``exp`` so a far-drifted token gives a large finite penalty, not inf.

Used as a *loss* (``model.kl_beta > 0``), the estimate is differentiated through ``log pi_theta(y_t)`` only, with
the tokens fixed; in expectation over ``y_t ~ pi_theta`` the gradients are:

- k1: ``E[grad log pi] = 0``. Zero in expectation: it adds noise, no pull toward the reference. Good as a
  metric of KL(pi || ref), not as a penalty (``RLModule`` warns when it is one).
- k2: ``E[(log pi - log ref) grad log pi] = grad KL(pi || ref)``, the reverse KL the metric estimates.
- k3: ``E[(1 - ref/pi) grad log pi] = -E_ref[grad log pi] = grad KL(ref || pi)``, the forward KL, although
  its value estimates KL(pi || ref) (the GRPO choice).

(On the policy's own samples; with ``ppo_epochs > 1`` or a stale rollout the tokens come from an older policy
and these hold approximately.)
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate ``[B, T]``; gradient flows through ``logprobs`` only."""
    d = ref_logprobs.detach() - logprobs  # [B, T]
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        d = d.clamp(-20.0, 20.0)
        return d.exp() - d - 1
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
