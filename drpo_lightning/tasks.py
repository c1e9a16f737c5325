"""Prompt tasks: datasets generated offline and deterministically (no downloads), a plugin kind of their own.

A task is a :class:`Task` subclass whose constructor arguments are the task's options and whose
:meth:`Task.build` turns ``(train_size, val_size, seed)`` into two lists of rows, ``(train, val)``; each row is
a plain dict with at least ``prompt`` (other columns, such as ``answer``, reach the reward functions). Tasks
are registered in the ``drpo_lightning.tasks`` entry-point group, like every other plugin kind, and selected
with ``data.task`` in a config::

    data:
      task: arithmetic            # or "reasoning_gym:chain_sum" with the drpo-reasoning-gym plugin
      task_size: 10000
      val_size: 500
      task_kwargs: {max_operand: 100, operations: ["+", "-"]}

``task`` is a registered name, optionally followed by ``:<arg>``: the part after the colon becomes the task's
first constructor argument (``reasoning_gym:chain_sum`` is ``ReasoningGymTask("chain_sum")``).
``task_kwargs`` are the remaining constructor arguments.

Built-in tasks:

- ``arithmetic``: prompts ``"{a}{op}{b}="`` with answer ``str(a op b)``; see :class:`ArithmeticTask`.

The ``reasoning_gym:<name>`` tasks (any procedural dataset of the ``reasoning-gym`` package) live in the
separate plugin package ``drpo-reasoning-gym`` (``pip install ./plugins/drpo-reasoning-gym``).

:func:`build_task` resolves a name through :data:`TASKS` (with a one-line error listing the available tasks
for an unknown one).
"""

from __future__ import annotations

import inspect
import random
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from drpo_lightning.errors import UserError
from drpo_lightning.registry import TASKS, PluginError
from drpo_lightning.tiny import is_heldout

Row = dict[str, Any]

__all__ = [
    "TASKS",
    "ArithmeticTask",
    "MissingDependencyError",
    "Task",
    "TaskError",
    "arithmetic",
    "available_tasks",
    "build_task",
]

_PLUGIN_HINTS = {
    "reasoning_gym": "the reasoning_gym:<name> tasks come with the drpo-reasoning-gym plugin: "
    "pip install ./plugins/drpo-reasoning-gym",
}


class TaskError(UserError):
    """A task name or task option that cannot work (names the config key)."""


class MissingDependencyError(TaskError, ImportError):
    """A package a task needs is not installed (message says what to ``pip install``)."""


class Task(ABC):
    """Base class of every task plugin: a generator of prompt rows.

    The constructor's arguments are the task's options (``data.task_kwargs`` in a config; with
    ``data.task: name:arg`` the ``arg`` is passed as the first one). Check them in ``__init__`` so that a bad
    option fails before anything is generated. Register a subclass under the entry-point group
    ``drpo_lightning.tasks``::

        [project.entry-points."drpo_lightning.tasks"]
        my_task = "my_pkg.tasks:MyTask"
    """

    @abstractmethod
    def build(self, train_size: int, val_size: int, seed: int = 0) -> tuple[list[Row], list[Row]]:
        """``(train_rows, val_rows)``: ``train_size`` and (up to) ``val_size`` rows, each a dict with a
        ``prompt`` string and any other columns. The same seed must give the same rows, and no validation
        prompt may occur among the training prompts."""


# ----------------------------------------------------------------------------------------------- arithmetic

_OPERATIONS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}
# Problem spaces up to this size are enumerated exactly; larger ones are sampled by rejection.
_ENUMERATE_LIMIT = 250_000


def _is_held_out(a: int, b: int) -> bool:
    """Whether the operand pair ``(a, b)`` is held out; the package's single rule (``tiny.is_heldout``).

    The quickstart policy was warmed up only on pairs outside this set, so its validation prompts are unseen.
    """
    return is_heldout(a, b)


def _parse_operations(operations: str | Sequence[str]) -> list[str]:
    ops = list(operations)  # "+-" and ["+", "-"] both work
    unknown = [op for op in ops if op not in _OPERATIONS]
    if not ops or unknown:
        raise TaskError(
            f"data.task_kwargs.operations: unsupported operation(s) {unknown or ops!r}; "
            f"choose from {list(_OPERATIONS)}"
        )
    return list(dict.fromkeys(ops))  # de-duplicated, order kept


def arithmetic(
    train_size: int,
    val_size: int,
    seed: int = 0,
    *,
    max_operand: int = 100,
    operations: str | Sequence[str] = ("+",),
) -> tuple[list[Row], list[Row]]:
    """Integer arithmetic prompts ``"{a}{op}{b}="`` with answer ``str(a op b)``.

    ``a`` and ``b`` are uniform in ``[0, max_operand)`` and ``op`` is uniform over ``operations``.

    **Train/validation disjointness.** Every operand pair ``(a, b)`` is assigned, by a fixed rule that does not
    depend on the seed (:func:`drpo_lightning.tiny.is_heldout`: ``(a * 7919 + b * 104729) % 20 == 0``, about
    5% of pairs), either to the held-out pool or to the training pool, whatever the operation. Training prompts
    are drawn (with replacement) only from training pairs and validation prompts (without replacement) only
    from held-out pairs, so no validation problem ``(a, op, b)`` is ever trained on, whatever the seed,
    ``train_size`` or ``val_size``; and the quickstart policy, warmed up on training pairs only, has never seen
    one either. The seed chooses which problems are drawn and their order.

    Args:
        train_size: Number of training rows.
        val_size: Number of validation rows; capped (with a warning) at the size of the held-out pool.
        seed: Seed of the draw; the same seed gives the same rows.
        max_operand: Operands are drawn from ``range(max_operand)``.
        operations: Operations to draw from, any of ``"+"``, ``"-"``, ``"*"`` (a list or a string such as
            ``"+-"``).

    Returns:
        ``(train_rows, val_rows)``, each row ``{"prompt": "12+7=", "answer": "19"}``.
    """
    ops = _parse_operations(operations)
    if max_operand < 1:
        raise TaskError(f"data.task_kwargs.max_operand must be >= 1, got {max_operand}")

    def row(a: int, op: str, b: int) -> Row:
        return {"prompt": f"{a}{op}{b}=", "answer": str(_OPERATIONS[op](a, b))}

    train_rng = random.Random(seed)
    val_rng = random.Random(f"arithmetic-validation-{seed}")
    space = len(ops) * max_operand * max_operand

    if space <= _ENUMERATE_LIMIT:
        train_pool: list[tuple[int, str, int]] = []
        val_pool: list[tuple[int, str, int]] = []
        for op in ops:
            for a in range(max_operand):
                for b in range(max_operand):
                    (val_pool if _is_held_out(a, b) else train_pool).append((a, op, b))
        if train_size > 0 and not train_pool:
            raise TaskError(
                f"arithmetic: all {space} problems are held out; raise data.task_kwargs.max_operand"
            )
        train = [row(*p) for p in train_rng.choices(train_pool, k=train_size)] if train_size else []
        if val_size > len(val_pool):
            warnings.warn(
                f"arithmetic: only {len(val_pool)} held-out problems exist (max_operand={max_operand}, "
                f"operations={ops}); using all of them instead of "
                f"data.val_size={val_size}",
                stacklevel=2,
            )
        val = [row(*p) for p in val_rng.sample(val_pool, min(val_size, len(val_pool)))]
        return train, val

    # Large spaces: rejection sampling (about 95% of draws are training problems, 5% held out).
    def draw(rng: random.Random) -> tuple[int, str, int]:
        return rng.randrange(max_operand), rng.choice(ops), rng.randrange(max_operand)

    train = []
    while len(train) < train_size:
        a, op, b = draw(train_rng)
        if not _is_held_out(a, b):
            train.append(row(a, op, b))
    seen: set[tuple[int, str, int]] = set()
    val = []
    attempts = 0
    while len(val) < val_size and attempts < 100 * max(val_size, 1) + 1000:
        attempts += 1
        problem = draw(val_rng)
        if problem not in seen and _is_held_out(problem[0], problem[2]):
            seen.add(problem)
            val.append(row(*problem))
    return train, val


class ArithmeticTask(Task):
    """Integer arithmetic prompts ``"{a}{op}{b}="`` with answer ``str(a op b)``; rows as :func:`arithmetic`.

    Args:
        max_operand: Operands are drawn from ``range(max_operand)``.
        operations: Operations to draw from, any of ``"+"``, ``"-"``, ``"*"`` (a list or a string such as
            ``"+-"``).
    """

    def __init__(self, *, max_operand: int = 100, operations: str | Sequence[str] = ("+",)) -> None:
        self.operations = _parse_operations(operations)
        if isinstance(max_operand, bool) or not isinstance(max_operand, int) or max_operand < 1:
            raise TaskError(f"data.task_kwargs.max_operand must be an integer >= 1, got {max_operand!r}")
        self.max_operand = max_operand

    def build(self, train_size: int, val_size: int, seed: int = 0) -> tuple[list[Row], list[Row]]:
        return arithmetic(
            train_size, val_size, seed, max_operand=self.max_operand, operations=self.operations
        )

    def __repr__(self) -> str:
        return f"ArithmeticTask(max_operand={self.max_operand}, operations={self.operations})"


# ---------------------------------------------------------------------------------------------- registry


def available_tasks() -> list[str]:
    """Registered task names (``drpo_lightning.tasks`` entry points)."""
    return TASKS.names()


def _resolve(task: str, name: str) -> type[Task]:
    try:
        return TASKS.get(name)
    except PluginError as err:
        hint = _PLUGIN_HINTS.get(name.lower())
        if hint is not None and name not in TASKS.errors:
            raise MissingDependencyError(
                f"data.task: unknown task {task!r}: {hint} (available: {TASKS.describe()})"
            ) from err
        raise TaskError(f"data.task: {err}") from err


def build_task(
    task: str, *, train_size: int, val_size: int, seed: int = 0, **options: Any
) -> tuple[list[Row], list[Row]]:
    """Generate ``(train_rows, val_rows)`` for the task called ``task``.

    ``task`` is a registered task name (:data:`TASKS`), or ``"name:arg"`` where ``arg`` is passed as the
    task's first constructor argument (e.g. ``"reasoning_gym:chain_sum"``). ``options`` are the task's other
    constructor arguments (``data.task_kwargs``); unknown ones raise a :class:`TaskError` listing the
    accepted ones.
    """
    name, colon, arg = task.partition(":")
    cls = _resolve(task, name.strip())
    params = list(inspect.signature(cls).parameters.values())  # the constructor's, without self
    args: list[Any] = []
    if colon:
        first = next(
            (p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)),
            None,
        )
        if first is None:
            raise TaskError(f"data.task: task {name!r} takes no ':<arg>' part, got {task!r}")
        if not arg:
            raise TaskError(f"data.task: nothing after the ':' in {task!r} (e.g. reasoning_gym:chain_sum)")
        if first.name in options:
            raise TaskError(
                f"data.task_kwargs.{first.name}: given twice, by data.task={task!r} and by data.task_kwargs"
            )
        args.append(arg)
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise TaskError(
                f"data.task_kwargs: task {task!r} has no option(s) {unknown}; accepted: {accepted}"
            )
    try:
        inspect.signature(cls).bind(*args, **options)
    except TypeError as err:  # e.g. a required option is missing
        raise TaskError(f"data.task: task {task!r} cannot be built from its options: {err}") from err
    return cls(*args, **options).build(train_size, val_size, seed)
