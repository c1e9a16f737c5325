"""The advantage-estimator interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class AdvantageEstimator(ABC):
    """Base class of every advantage plugin.

    Maps one scalar reward per completion to one advantage per completion. Estimators that normalise within
    a group see whole groups: the trainer never splits a group across ranks or minibatches before calling.
    A group of two or more completions whose rewards are all equal must give zero advantage, never NaN.

    Class attributes an estimator may set:

    - ``min_group_size``: the smallest ``model.num_generations`` it can learn from. Estimators that compare
      the completions of one prompt give every completion 0 when it is alone, so they declare 2 and the
      trainer refuses ``num_generations: 1`` before the model loads instead of training nothing.
    - ``uses_lengths``: when True the trainer also passes ``lengths=`` (``[N]``, the number of completion
      tokens of each sample) for estimators that weight statistics by tokens.
    """

    min_group_size: ClassVar[int] = 1
    uses_lengths: ClassVar[bool] = False

    @abstractmethod
    def __call__(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """``rewards`` ``[N]`` float, ``group_ids`` ``[N]`` long -> advantages ``[N]`` float."""
