"""The ``reasoning_gym`` task: prompt rows from any reasoning-gym procedural dataset."""

from __future__ import annotations

import json
import warnings
from typing import Any

from drpo_lightning.tasks import MissingDependencyError, Task, TaskError

Row = dict[str, Any]


def import_reasoning_gym() -> Any:
    """``reasoning_gym``, imported on first use (it takes ~2 s, and ``drpo plugins`` imports this module)."""
    try:
        import reasoning_gym
    except ImportError as err:
        raise MissingDependencyError(
            "the reasoning_gym plugin needs the reasoning-gym package: pip install reasoning-gym"
        ) from err
    return reasoning_gym


def dataset_names(rg: Any) -> list[str]:
    factory = getattr(rg, "factory", None)
    return sorted(getattr(factory, "DATASETS", {}) or {})


class ReasoningGymTask(Task):
    """Rows of the reasoning-gym procedural dataset ``dataset`` (``data.task: reasoning_gym:<dataset>``).

    Generated with ``reasoning_gym.create_dataset(dataset, size=..., seed=..., **config)``: the training rows
    from ``seed``, the validation rows from other seeds, dropping any validation question that also occurs
    among the training questions (so the two are disjoint as text). A problem space too small for that gives
    fewer validation rows (with a warning), or an error when none is left.

    Each row is ``{"prompt", "answer", "metadata", "task"}``: ``prompt`` is the entry's question, ``answer``
    its reference answer (for some datasets, e.g. ``countdown``, just one of several valid answers: grade
    with the ``reasoning_gym`` reward, not exact match), ``metadata`` the entry's metadata as a JSON string and
    ``task`` the dataset name.

    Args:
        dataset: the reasoning-gym dataset name, e.g. ``"chain_sum"``, ``"basic_arithmetic"``, ``"countdown"``
            (the part after ``reasoning_gym:`` in ``data.task``).
        **config: options of that dataset (``data.task_kwargs``, e.g. ``min_terms`` for ``chain_sum``).
    """

    def __init__(self, dataset: str, **config: Any) -> None:
        self.dataset = dataset
        self.config = config
        rg = import_reasoning_gym()
        names = dataset_names(rg)
        if names and dataset not in names:
            raise TaskError(
                f"data.task: unknown reasoning_gym dataset {dataset!r}; available: {', '.join(names)}"
            )
        self._generate(1, 0)  # check the options now, before anything else is built

    def _generate(self, size: int, seed: int) -> list[Row]:
        rg = import_reasoning_gym()
        try:
            data = rg.create_dataset(self.dataset, size=size, seed=seed, **self.config)
        except (ValueError, KeyError, TypeError, AssertionError) as err:
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TaskError(
                f"data.task_kwargs: reasoning_gym:{self.dataset} rejected its options: {detail}"
            ) from err
        rows = []
        for i in range(len(data)):
            entry = data[i]
            answer = entry.get("answer")
            rows.append(
                {
                    "prompt": str(entry["question"]),
                    "answer": "" if answer is None else str(answer),
                    "metadata": json.dumps(entry.get("metadata", {}), default=str),
                    "task": self.dataset,
                }
            )
        return rows

    def build(self, train_size: int, val_size: int, seed: int = 0) -> tuple[list[Row], list[Row]]:
        train = self._generate(train_size, seed) if train_size > 0 else []
        train_questions = {r["prompt"] for r in train}
        val: list[Row] = []
        val_questions: set[str] = set()
        for attempt in range(1, 6):
            if len(val) >= val_size:
                break
            # Seeds far from the training seed; each attempt asks for more than is still missing.
            for r in self._generate(2 * (val_size - len(val)) + 16, seed + 1_000_003 * attempt):
                if r["prompt"] not in train_questions and r["prompt"] not in val_questions:
                    val_questions.add(r["prompt"])
                    val.append(r)
                    if len(val) >= val_size:
                        break
        if val_size > 0 and not val:
            raise TaskError(
                f"reasoning_gym:{self.dataset}: every generated validation question also occurs in the training "
                "rows (the problem space is too small); lower data.task_size or widen the task's options"
            )
        if len(val) < val_size:
            warnings.warn(
                f"reasoning_gym:{self.dataset}: only {len(val)} validation questions not seen in training "
                f"(data.val_size={val_size})",
                stacklevel=2,
            )
        return train, val

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.config.items())
        return f"ReasoningGymTask({self.dataset!r}{options})"
