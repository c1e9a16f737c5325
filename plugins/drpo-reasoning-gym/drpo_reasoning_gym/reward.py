"""The ``reasoning_gym`` reward: each completion graded by its reasoning-gym dataset's own scorer."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

from drpo_lightning.rewards.base import RewardFunction
from drpo_lightning.rewards.exact_match import MissingColumnError
from drpo_reasoning_gym.task import import_reasoning_gym

EXTRACT_MODES = ("full", "last_line", "answer_tag", "regex")
ANSWER_TAG = r"<answer>(.*?)</answer>"


class ReasoningGymReward(RewardFunction):
    """Scores each completion with ``reasoning_gym.get_score_answer_fn(task)(answer, entry)``.

    ``entry`` is rebuilt from the row's columns as the ``reasoning_gym`` task wrote them: ``{"question":
    prompt, "answer": answer, "metadata": metadata}``, and ``task`` names the dataset (so one run may mix
    several datasets). Scores are the scorer's values, usually in [0, 1] (partial credit for some datasets).

    Which part of the completion is the answer (``extract``):

    - ``"full"`` (default): the whole completion, stripped;
    - ``"last_line"``: its last non-empty line, stripped;
    - ``"answer_tag"``: the text inside the last ``<answer>...</answer>`` (spanning lines), stripped;
    - ``"regex"``: the last match of ``pattern`` (Python :mod:`re`, with ``re.DOTALL``): its first group if
      the pattern has groups, else the whole match.

    A completion where nothing can be extracted scores 0.0. A scorer that raises gives None (cannot score;
    the trainer's ``reward_on_error`` policy decides), with a warning.

    Args:
        extract: ``"full"``, ``"last_line"``, ``"answer_tag"`` or ``"regex"``.
        pattern: the regular expression of ``extract="regex"``.
        task: the dataset name to use for every row; default: the ``task_column`` of each row.
        task_column: dataset column naming each row's reasoning-gym dataset.
        metadata_column: dataset column holding each row's metadata (a JSON string or a dict).
        answer_column: dataset column holding the reference answers (may be absent: some scorers use the
            metadata only).
    """

    def __init__(
        self,
        extract: Literal["full", "last_line", "answer_tag", "regex"] = "full",
        pattern: str | None = None,
        task: str | None = None,
        task_column: str = "task",
        metadata_column: str = "metadata",
        answer_column: str = "answer",
    ) -> None:
        if extract not in EXTRACT_MODES:
            raise ValueError(f"extract must be one of {', '.join(EXTRACT_MODES)}; got {extract!r}")
        if (extract == "regex") != (pattern is not None):
            raise ValueError("pattern is required with extract='regex', and only used with it")
        if extract == "answer_tag":
            pattern = ANSWER_TAG
        try:
            self._regex = re.compile(pattern, re.DOTALL) if pattern is not None else None
        except re.error as err:
            raise ValueError(f"pattern is not a valid regular expression: {err}") from err
        self.extract = extract
        self.pattern = pattern
        self.task = task
        self.task_column = task_column
        self.metadata_column = metadata_column
        self.answer_column = answer_column
        self._scorers: dict[str, Callable[..., float]] = {}

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Each row's metadata, and its dataset name unless ``task`` names one for all rows."""
        return (self.metadata_column,) if self.task is not None else (self.metadata_column, self.task_column)

    def extract_answer(self, completion: str) -> str | None:
        """The answer part of ``completion`` (None when there is none)."""
        if self.extract == "full":
            return completion.strip()
        if self.extract == "last_line":
            lines = [line.strip() for line in completion.splitlines() if line.strip()]
            return lines[-1] if lines else None
        assert self._regex is not None
        matches = list(self._regex.finditer(completion))
        if not matches:
            return None
        last = matches[-1]
        return (last.group(1) if self._regex.groups else last.group(0)).strip()

    def _scorer(self, task: str) -> Callable[..., float]:
        if task not in self._scorers:
            self._scorers[task] = import_reasoning_gym().get_score_answer_fn(task)
        return self._scorers[task]

    def __call__(
        self, *, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]
    ) -> list[float | None]:
        n = len(completions)
        if self.metadata_column not in columns:
            raise self._missing(self.metadata_column, "metadata_column", columns)
        if self.task is None and self.task_column not in columns:
            raise self._missing(self.task_column, "task_column, or set task", columns)
        tasks = [self.task] * n if self.task is not None else columns[self.task_column]
        answers = columns.get(self.answer_column, [None] * n)
        scores: list[float | None] = []
        for prompt, completion, task, answer, metadata in zip(
            prompts, completions, tasks, answers, columns[self.metadata_column]
        ):
            extracted = self.extract_answer(completion)
            if extracted is None:
                scores.append(0.0)
                continue
            meta = json.loads(metadata) if isinstance(metadata, str) else dict(metadata or {})
            entry = {"question": prompt, "answer": answer, "metadata": meta}
            try:
                scores.append(float(self._scorer(str(task))(extracted, entry)))
            except Exception as err:  # a scorer crash is "cannot score", not a crashed run
                warnings.warn(f"reward {self.name!r}: the {task} scorer raised {err!r}", stacklevel=2)
                scores.append(None)
        return scores

    def _missing(self, column: str, option: str, columns: dict[str, Any]) -> MissingColumnError:
        available = ", ".join(sorted(columns)) or "none"
        return MissingColumnError(
            f"reward {self.name!r} needs dataset column {column!r} (set {option}; rows of the reasoning_gym "
            f"task have it); available columns: {available}"
        )

    def __repr__(self) -> str:
        return (
            f"ReasoningGymReward(extract={self.extract!r}, pattern={self.pattern!r}, task={self.task!r}, "
            f"task_column={self.task_column!r}, metadata_column={self.metadata_column!r}, "
            f"answer_column={self.answer_column!r})"
        )
