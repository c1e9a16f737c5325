"""REINFORCE++-baseline advantage (Hu et al. 2025, "REINFORCE++", arXiv 2501.03262).

REINFORCE++ normalises advantages over the whole batch instead of per prompt ("global advantage
normalisation"). With several samples per prompt the paper's *REINFORCE++-baseline* variant first subtracts
the group (same-prompt) mean reward and then normalises by the batch::

    A'_i = r_i - mean_g            (group-mean baseline)
    A_i  = A'_i / (std_batch(A') + epsilon)

The batch mean of ``A'`` is 0 by construction (each group's deviations sum to 0), so it is not subtracted
again: this keeps a group of all-equal rewards at exactly 0, as every advantage estimator must. The batch
std is the unbiased one (divide by ``N - 1``). The "batch" is whatever this call receives, i.e. the local
rollout batch; it is not all-gathered across ranks. The paper also folds a token-level KL penalty into the
reward; here that belongs to the objective (``kl_coef``), not to the advantage.

The variant without a group baseline (``(r - mean_batch) / std_batch``) is not offered: it gives non-zero
advantages to groups whose rewards are all equal.
"""

from __future__ import annotations

import torch

from drpo_lightning.advantages.base import AdvantageEstimator
from drpo_lightning.advantages.grpo import check_epsilon, check_inputs, group_stats, output_dtype


class ReinforcePlusPlusAdvantage(AdvantageEstimator):
    """``(r - group mean) / (batch std of (r - group mean) + epsilon)``.

    Args:
        epsilon: added to the batch std before dividing (>= 0). If every group is constant the result is 0.
    """

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = check_epsilon(epsilon)

    def __call__(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        check_inputs(rewards, group_ids)
        centered = group_stats(rewards, group_ids).centered
        n = centered.numel()
        if n < 2:
            return torch.zeros_like(centered).to(output_dtype(rewards))
        mean = centered.mean()
        std = ((centered - mean).square().sum() / (n - 1)).sqrt()
        if std == 0:
            return torch.zeros_like(centered).to(output_dtype(rewards))
        return (centered / (std + self.epsilon)).to(output_dtype(rewards))

    def __repr__(self) -> str:
        return f"ReinforcePlusPlusAdvantage(epsilon={self.epsilon})"
