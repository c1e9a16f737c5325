"""REINFORCE++-baseline advantage (Hu et al. 2025, "REINFORCE++", arXiv 2501.03262).

REINFORCE++ normalises advantages over the whole batch instead of per prompt ("global advantage
normalisation"). With several samples per prompt the *REINFORCE++-baseline* variant first subtracts the group
(same-prompt) mean reward, then whitens the result over every completion token of the batch::

    A'_i = r_i - b_g          b_g = mean reward of the group, or 0 for a group of one sample
    mu   = sum_i L_i A'_i / sum_i L_i                          (token-weighted mean)
    var  = sum_i L_i (A'_i - mu)^2 / (sum_i L_i - 1)           (token-weighted, unbiased)
    A_i  = (A'_i - mu) / (sqrt(var) + epsilon)

where ``L_i`` is the number of completion tokens of sample ``i``. Each token carries its sequence's advantage,
so these are the mean and standard deviation over the batch's tokens, as the reference implementations
(verl's ``compute_reinforce_plus_plus_baseline_outcome_advantage`` and OpenRLHF) whiten them: a long completion
weighs more than a short one. Called without ``lengths`` every sample weighs 1 (the sequence-level version).

Consequences worth knowing:

- A sample alone in its group has no group mean to subtract: its baseline is 0, as in the reference, so
  ``num_generations: 1`` trains (plain REINFORCE++ with batch whitening). Such a sample's advantage depends on
  its raw reward, not only on how it compares with other samples of its prompt.
- Subtracting ``mu`` shifts every sample by the same amount. With groups of two or more and equal lengths
  ``mu`` is 0 (each group's deviations sum to 0), but with token weights it is the batch's length/reward
  covariance, so a group of all-equal rewards then gets ``-mu / std`` rather than exactly 0, as in the
  reference; if every ``A'`` is equal (e.g. every group constant) the result is exactly 0.

The "batch" is whatever this call receives, i.e. the local rollout batch; it is not all-gathered across ranks.
The paper also folds a token-level KL penalty into the reward; here that belongs to the objective
(``kl_beta``), not to the advantage.
"""

from __future__ import annotations

import torch

from drpo_lightning.advantages.base import AdvantageEstimator
from drpo_lightning.advantages.grpo import check_epsilon, check_inputs, group_stats, output_dtype


class ReinforcePlusPlusAdvantage(AdvantageEstimator):
    """``(r - group baseline - token mean) / (token std + epsilon)`` over the batch.

    Args:
        epsilon: added to the batch std before dividing (>= 0). If every ``A'`` is equal the result is 0.
    """

    uses_lengths = True

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = check_epsilon(epsilon)

    def __call__(
        self, rewards: torch.Tensor, group_ids: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``lengths`` ``[N]``: completion tokens per sample (token weights); None weighs every sample 1."""
        check_inputs(rewards, group_ids)
        stats = group_stats(rewards, group_ids)
        centered = torch.where(stats.count > 1, stats.centered, stats.rewards)
        weights = torch.ones_like(centered) if lengths is None else _check_lengths(lengths, rewards)
        total = weights.sum()
        counted = centered[weights > 0]
        # All-equal values: their weighted mean need not equal them bit for bit, and dividing that rounding
        # error by an equally tiny std would give O(1) advantages. They carry no signal: exactly 0.
        if total <= 1 or not bool(counted.max() > counted.min()):
            return torch.zeros_like(centered).to(output_dtype(rewards))
        mean = (weights * centered).sum() / total
        deviation = centered - mean
        std = ((weights * deviation.square()).sum() / (total - 1)).sqrt()
        return (deviation / (std + self.epsilon)).to(output_dtype(rewards))

    def __repr__(self) -> str:
        return f"ReinforcePlusPlusAdvantage(epsilon={self.epsilon})"


def _check_lengths(lengths: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """``lengths`` as float64 token weights, after checking shape and values."""
    if not isinstance(lengths, torch.Tensor) or lengths.shape != rewards.shape:
        raise ValueError(
            f"lengths must be a tensor of shape {tuple(rewards.shape)} (one token count per sample), got "
            f"{getattr(lengths, 'shape', type(lengths).__name__)}"
        )
    weights = lengths.to(device=rewards.device, dtype=torch.float64)
    if weights.numel() and not bool((torch.isfinite(weights) & (weights >= 0)).all()):
        raise ValueError(f"lengths must be finite token counts >= 0, got {lengths.tolist()}")
    return weights
