"""Dr. GRPO advantage: the group-mean baseline without std normalisation (Liu et al. 2025, arXiv 2503.20783).

``A_i = r_i - mean_g``. Dividing by the group std biases updates toward prompts that are nearly always
right or nearly always wrong; Dr. GRPO drops that division. A group of all-equal rewards gives exactly 0.
"""

from __future__ import annotations

import torch

from drpo_lightning.advantages.base import AdvantageEstimator
from drpo_lightning.advantages.grpo import check_inputs, group_stats, output_dtype


class DrGRPOAdvantage(AdvantageEstimator):
    """``r - group mean``."""

    min_group_size = 2  # a lone completion has no group to compare with: its advantage is 0

    def __call__(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        check_inputs(rewards, group_ids)
        return group_stats(rewards, group_ids).centered.to(output_dtype(rewards))

    def __repr__(self) -> str:
        return "DrGRPOAdvantage()"
