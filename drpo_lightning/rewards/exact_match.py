"""Exact-match reward: 1.0 when a completion gives the dataset's answer, else 0.0."""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, Literal

from drpo_lightning.rewards.base import RewardFunction

# A decimal number: optional minus sign (not when it follows a word character or ')', so "5-3" reads as
# 5 and 3), digits with optional thousands separators ("1,234"), optional fraction part.
NUMBER_RE = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")

_MODES = ("exact", "number", "last_number")


def parse_number(text: str) -> Fraction | None:
    """``text`` as an exact number if the whole (stripped) string is one, else None."""
    text = text.strip()
    match = NUMBER_RE.fullmatch(text)
    if match is None:
        return None
    return Fraction(text.replace(",", ""))


def find_numbers(text: str) -> list[Fraction]:
    """Every number in ``text``, left to right."""
    return [Fraction(m.group(0).replace(",", "")) for m in NUMBER_RE.finditer(text)]


class MissingColumnError(KeyError, ValueError):
    """A reward function needs a dataset column that the batch does not have."""

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0]) if self.args else ""


def missing_column_error(plugin: str, column: str, columns: dict[str, Any]) -> MissingColumnError:
    """The one-line error for a missing ``column``, listing the ``columns`` there are."""
    available = ", ".join(sorted(columns)) or "none"
    return MissingColumnError(
        f"reward {plugin!r} needs dataset column {column!r} (set answer_column); "
        f"available columns: {available}"
    )


class ExactMatch(RewardFunction):
    """Compares each completion with the dataset's answer column.

    Modes:

    - ``"number"`` (default): the *first* number in the completion (``" 46."``, ``"46 apples"``)
      compared numerically with the answer (``46 == 46.0``).
    - ``"last_number"``: the *last* number in the completion ("... so the answer is 46").
    - ``"exact"``: string equality of completion and ``str(answer)`` (both stripped when ``strip``).

    Numbers are decimal: an optional ``-``, digits with optional ``,`` thousands separators, an optional
    fraction part (``-1,234.5``); no exponents, no ``.5``. The answer may be an int/float or a string; a
    string answer that is not a number as a whole (e.g. GSM8K's ``"... #### 72"``) is read through its last
    number. A completion without a number scores 0.0; an answer without a number cannot be scored (None).

    Args:
        answer_column: dataset column holding the reference answers.
        mode: ``"number"``, ``"last_number"`` or ``"exact"``.
        strip: strip surrounding whitespace in ``"exact"`` mode.
    """

    def __init__(
        self,
        answer_column: str = "answer",
        mode: Literal["exact", "number", "last_number"] = "number",
        strip: bool = True,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}; got {mode!r}")
        self.answer_column = answer_column
        self.mode = mode
        self.strip = bool(strip)

    def _answer_number(self, answer: Any) -> Fraction | None:
        if isinstance(answer, bool):
            return None
        if isinstance(answer, int):
            return Fraction(answer)
        if isinstance(answer, float):
            return Fraction(answer) if answer == answer and abs(answer) != float("inf") else None
        text = str(answer)
        value = parse_number(text)
        if value is None:
            numbers = find_numbers(text)
            value = numbers[-1] if numbers else None
        return value

    def _score(self, completion: str, answer: Any) -> float | None:
        if answer is None:
            return None
        if self.mode == "exact":
            a, c = str(answer), completion
            if self.strip:
                a, c = a.strip(), c.strip()
            return float(a == c)
        target = self._answer_number(answer)
        if target is None:
            return None
        numbers = find_numbers(completion)
        if not numbers:
            return 0.0
        got = numbers[0] if self.mode == "number" else numbers[-1]
        return float(got == target)

    def __call__(
        self, *, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]
    ) -> list[float | None]:
        if self.answer_column not in columns:
            raise missing_column_error(self.name, self.answer_column, columns)
        answers = columns[self.answer_column]
        return [self._score(c, a) for c, a in zip(completions, answers)]

    @property
    def required_columns(self) -> tuple[str, ...]:
        return (self.answer_column,)

    def __repr__(self) -> str:
        return f"ExactMatch(answer_column={self.answer_column!r}, mode={self.mode!r}, strip={self.strip})"
