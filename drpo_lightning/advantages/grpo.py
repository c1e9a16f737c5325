"""GRPO advantage: rewards standardised within each group (Shao et al. 2024, arXiv 2402.03300).

``A_i = (r_i - mean_g) / (std_g + epsilon)`` where ``g`` is the group (the completions of one prompt) of
sample ``i``.

Std convention: by default the *unbiased* (Bessel-corrected, divide by ``n - 1``) standard deviation, the
convention of ``torch.std`` and of common GRPO implementations. ``std_unbiased=False`` uses the population
standard deviation (divide by ``n``). A group of size 1 and a group whose rewards are all equal get exactly 0.

This module also holds the vectorised group helpers the other built-in estimators share.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from drpo_lightning.advantages.base import AdvantageEstimator


def check_epsilon(epsilon: float) -> float:
    """``epsilon`` as a float; a :class:`ValueError` naming it when negative or not finite."""
    epsilon = float(epsilon)
    if not (epsilon >= 0 and epsilon != float("inf")):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon}")
    return epsilon


def check_inputs(rewards: torch.Tensor, group_ids: torch.Tensor) -> None:
    """Validate the ``(rewards [N], group_ids [N])`` pair every estimator receives."""
    if not isinstance(rewards, torch.Tensor) or not isinstance(group_ids, torch.Tensor):
        raise TypeError(
            f"rewards and group_ids must be tensors, got {type(rewards).__name__} and "
            f"{type(group_ids).__name__}"
        )
    if rewards.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(
            f"rewards and group_ids must both have shape [N], got {tuple(rewards.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    if rewards.is_complex():
        raise ValueError(f"rewards must be real, got dtype {rewards.dtype}")
    if rewards.numel() and not bool(torch.isfinite(rewards).all()):
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(
            f"rewards must be finite; got {rewards[bad[0]].item()} at index {bad[0]} "
            f"({len(bad)} non-finite in all); fix or drop them before computing advantages"
        )


def output_dtype(rewards: torch.Tensor) -> torch.dtype:
    """Floating rewards keep their dtype; integer/bool rewards give the default float dtype."""
    return rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()


class GroupStats(NamedTuple):
    """Per-sample statistics of each sample's group, all ``[N]`` float64."""

    rewards: torch.Tensor
    """The rewards in float64."""
    count: torch.Tensor
    """Size of the sample's group."""
    mean: torch.Tensor
    """Mean reward of the sample's group."""
    centered: torch.Tensor
    """``reward - group mean``, exactly 0 in a group whose rewards are all equal."""
    constant: torch.Tensor
    """bool, True where the sample's group has all-equal rewards (groups of size 1 included)."""
    inverse: torch.Tensor
    """long, the sample's group as an index ``0 .. num_groups - 1``."""
    num_groups: int


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> GroupStats:
    """Vectorised group statistics (no Python loop over groups), computed in float64.

    ``group_ids`` may be any integers, not necessarily contiguous or sorted.
    """
    r = rewards.to(torch.float64)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    count = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(
        0, inverse, torch.ones_like(r)
    )
    total = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, inverse, r)
    gmax = torch.full((num_groups,), -torch.inf, dtype=torch.float64, device=r.device)
    gmax = gmax.scatter_reduce(0, inverse, r, reduce="amax")
    gmin = torch.full((num_groups,), torch.inf, dtype=torch.float64, device=r.device)
    gmin = gmin.scatter_reduce(0, inverse, r, reduce="amin")
    mean = (total / count)[inverse]
    constant = (gmax == gmin)[inverse]
    # A mean of equal floats need not equal them bit for bit (0.1 + 0.1 + 0.1 != 0.3): force exact zeros.
    centered = torch.where(constant, torch.zeros_like(r), r - mean)
    return GroupStats(r, count[inverse], mean, centered, constant, inverse, num_groups)


def group_std(stats: GroupStats, unbiased: bool) -> torch.Tensor:
    """Per-sample standard deviation of the sample's group (``[N]`` float64; 0 for a group of size 1)."""
    sq = torch.zeros(stats.num_groups, dtype=torch.float64, device=stats.rewards.device)
    sq = sq.index_add_(0, stats.inverse, stats.centered * stats.centered)[stats.inverse]
    dof = stats.count - 1 if unbiased else stats.count
    return torch.where(dof > 0, sq / dof.clamp(min=1), torch.zeros_like(sq)).sqrt()


class GRPOAdvantage(AdvantageEstimator):
    """``(r - group mean) / (group std + epsilon)``.

    Args:
        epsilon: added to the group std before dividing (>= 0). Groups whose rewards are all equal give 0
            whatever ``epsilon`` is, 0 included.
        std_unbiased: True (default) divides the squared deviations by ``n - 1`` (Bessel), False by ``n``.
    """

    min_group_size = 2  # a lone completion has no group to compare with: its advantage is 0

    def __init__(self, epsilon: float = 1e-6, std_unbiased: bool = True) -> None:
        self.epsilon = check_epsilon(epsilon)
        self.std_unbiased = bool(std_unbiased)

    def __call__(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        check_inputs(rewards, group_ids)
        stats = group_stats(rewards, group_ids)
        std = group_std(stats, self.std_unbiased)
        adv = torch.where(stats.constant, torch.zeros_like(std), stats.centered / (std + self.epsilon))
        return adv.to(output_dtype(rewards))

    def __repr__(self) -> str:
        return f"GRPOAdvantage(epsilon={self.epsilon}, std_unbiased={self.std_unbiased})"
