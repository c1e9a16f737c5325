"""Format reward: a fixed reward when a completion matches a regular expression."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from drpo_lightning.rewards.base import RewardFunction


class FormatReward(RewardFunction):
    """``reward`` when the completion matches ``pattern``, else 0.0.

    The pattern is compiled with :data:`re.DOTALL` (``.`` also matches newlines, so patterns such as
    ``<think>.*</think>\\s*<answer>.*</answer>`` span lines).

    Args:
        pattern: regular expression (Python :mod:`re` syntax). The default accepts a bare integer with
            optional surrounding whitespace.
        reward: score of a matching completion.
        match: ``"fullmatch"`` (default; the whole completion must match, :func:`re.fullmatch`) or
            ``"search"`` (any substring may match, :func:`re.search`).
    """

    def __init__(
        self,
        pattern: str = r"\s*-?\d+\s*",
        reward: float = 1.0,
        match: Literal["fullmatch", "search"] = "fullmatch",
    ) -> None:
        if match not in ("fullmatch", "search"):
            raise ValueError(f"match must be 'fullmatch' or 'search', got {match!r}")
        try:
            self._regex = re.compile(pattern, re.DOTALL)
        except (re.error, TypeError) as err:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {err}") from None
        self.pattern = pattern
        self.reward = float(reward)
        self.match = match

    def __call__(
        self, *, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]
    ) -> list[float]:
        test = self._regex.fullmatch if self.match == "fullmatch" else self._regex.search
        return [self.reward if test(c) is not None else 0.0 for c in completions]

    def __repr__(self) -> str:
        return f"FormatReward(pattern={self.pattern!r}, reward={self.reward}, match={self.match!r})"
