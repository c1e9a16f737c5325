"""Math answer verification with the ``math-verify`` package (Hugging Face).

``math_verify`` enforces its own timeouts with ``signal.alarm``, which only works on the main thread. This
plugin turns those off (``parsing_timeout=None``, ``timeout_seconds=None``) and enforces ``timeout_seconds``
itself by running each completion's parse-and-verify in a daemon worker thread
(:func:`~drpo_lightning.rewards.combine.call_with_timeout`), so it is safe to call from any thread. A
completion that times out cannot be scored (None); its worker thread cannot be killed and finishes in the
background.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from drpo_lightning.rewards.base import RewardFunction
from drpo_lightning.rewards.combine import call_with_timeout
from drpo_lightning.rewards.exact_match import missing_column_error


class _DropTimeoutNotice(logging.Filter):
    """math_verify warns once that its timeouts are off; this plugin provides one, so drop the notice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


def _import_math_verify():
    try:
        import math_verify
    except ImportError as err:
        from drpo_lightning.models import missing_package

        raise missing_package("reward 'math_verify' (model.rewards)", "math-verify", "math") from err
    for logger in ("math_verify.parser", "math_verify.grader"):
        log = logging.getLogger(logger)
        if not any(isinstance(f, _DropTimeoutNotice) for f in log.filters):
            log.addFilter(_DropTimeoutNotice())
    return math_verify


class MathVerify(RewardFunction):
    """1.0 when the completion's final answer is mathematically equal to the dataset's answer, else 0.0.

    The answer column holds the gold answer as a number or LaTeX (``"46"``, ``"\\frac{1}{2}"``,
    ``"$\\sqrt{2}$"``); a gold answer that does not parse even when wrapped in ``$...$`` cannot be scored
    (None). A completion from which no answer can be extracted scores 0.0.

    Args:
        answer_column: dataset column holding the gold answers.
        timeout_seconds: most seconds spent on one completion (parse + verify); None for no limit. A
            completion that takes longer scores None (the reward policy decides what happens then).
    """

    def __init__(self, answer_column: str = "answer", timeout_seconds: float | None = 5.0) -> None:
        if timeout_seconds is not None and not timeout_seconds > 0:
            raise ValueError(f"timeout_seconds must be > 0 or None, got {timeout_seconds}")
        _import_math_verify()  # fail at construction, before any model loads
        self.answer_column = answer_column
        self.timeout_seconds = timeout_seconds
        self._gold_cache: dict[str, list[Any]] = {}

    def _parse_gold(self, mv: Any, gold: str) -> list[Any]:
        if gold not in self._gold_cache:
            parsed = mv.parse(gold, parsing_timeout=None)
            if not parsed and "$" not in gold:
                parsed = mv.parse(f"${gold}$", parsing_timeout=None)
            if len(self._gold_cache) > 10_000:
                self._gold_cache.clear()
            self._gold_cache[gold] = parsed
        return self._gold_cache[gold]

    def _score(self, completion: str, answer: Any) -> float | None:
        mv = _import_math_verify()
        if answer is None:
            return None
        gold = self._parse_gold(mv, str(answer))
        if not gold:
            return None
        pred = mv.parse(completion, parsing_timeout=None)
        if not pred:
            return 0.0
        return float(mv.verify(gold, pred, timeout_seconds=None))

    def __call__(
        self, *, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]
    ) -> list[float | None]:
        if self.answer_column not in columns:
            raise missing_column_error(self.name, self.answer_column, columns)
        scores: list[float | None] = []
        for completion, answer in zip(completions, columns[self.answer_column]):
            try:
                scores.append(call_with_timeout(self._score, self.timeout_seconds, completion, answer))
            except TimeoutError:
                scores.append(None)
        return scores

    @property
    def required_columns(self) -> tuple[str, ...]:
        return (self.answer_column,)

    def __repr__(self) -> str:
        return f"MathVerify(answer_column={self.answer_column!r}, timeout_seconds={self.timeout_seconds})"
