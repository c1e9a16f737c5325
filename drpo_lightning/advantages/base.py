"""The advantage-estimator interface."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class AdvantageEstimator(ABC):
    """Base class of every advantage plugin.

    Maps one scalar reward per completion to one advantage per completion. Estimators that normalise within
    a group see whole groups: the trainer never splits a group across ranks or minibatches before calling.
    A group whose rewards are all equal must give zero advantage, never NaN.
    """

    @abstractmethod
    def __call__(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """``rewards`` ``[N]`` float, ``group_ids`` ``[N]`` long -> advantages ``[N]`` float."""
