"""The reward-function interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any


class RewardFunction(ABC):
    """Base class of every reward plugin.

    A reward function scores completions. It is called with keyword arguments only: ``prompts`` and
    ``completions`` (lists of ``N`` strings) plus every extra column of the prompt dataset, each a list of
    ``N`` values aligned with the completions (a prompt's columns are repeated for each of its G samples).
    Accept ``**columns`` so that columns you do not use are ignored.

    Return one float per completion. ``None`` means "cannot score this one"; the trainer's reward policy
    decides what happens then (see :mod:`drpo_lightning.rewards.combine`).

    Declare the dataset columns the function cannot work without in :attr:`required_columns`: the data
    module then checks every row for them before training starts.
    """

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Dataset columns every row must have for this function to score it (none by default)."""
        return ()

    @abstractmethod
    def __call__(
        self, *, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]
    ) -> Sequence[float | None]:
        """Scores for ``completions``, one per completion."""

    @property
    def name(self) -> str:
        """Name used in metrics (``reward/<name>``) and error messages."""
        from drpo_lightning.registry import REWARDS

        return REWARDS.name_of(type(self)) or type(self).__name__
