"""RLOO advantage: REINFORCE with a leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024,
arXiv 2402.14740).

``A_i = r_i - mean_{j in g, j != i} r_j``, which equals ``n / (n - 1) * (r_i - mean_g)`` for a group of
size ``n``. A group of size 1 has no other member and gets 0; a group of all-equal rewards gets exactly 0.
"""

from __future__ import annotations

import torch

from drpo_lightning.advantages.base import AdvantageEstimator
from drpo_lightning.advantages.grpo import check_inputs, group_stats, output_dtype


class RLOOAdvantage(AdvantageEstimator):
    """``r - (mean of the other members of the group)``."""

    min_group_size = 2  # a lone completion has no group to compare with: its advantage is 0

    def __call__(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        check_inputs(rewards, group_ids)
        stats = group_stats(rewards, group_ids)
        n = stats.count
        scale = torch.where(n > 1, n / (n - 1).clamp(min=1), torch.zeros_like(n))
        return (scale * stats.centered).to(output_dtype(rewards))

    def __repr__(self) -> str:
        return "RLOOAdvantage()"
