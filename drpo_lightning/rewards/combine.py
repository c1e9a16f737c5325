"""Run several reward functions and combine their scores into one reward per completion.

The failure policy lives here so that reward plugins can stay simple. A reward function *fails* for a
completion when it

- raises (all completions of the call fail),
- runs longer than ``timeout`` seconds (all completions fail),
- returns something that is not a sequence of ``N`` values (all completions fail), or
- returns ``None``, NaN, ±inf or a non-number for that completion (only that completion fails), or
- returns a score that, times its weight, does not fit in float32 (beyond ±3.4e38: only that completion fails).

Rewards are kept in float32, so a weighted sum of several functions that overflows float32 fails too: it is
charged to the function with the largest weighted score of that completion (replaced by the fallback under
``on_error="fallback"``, until the sum fits).

``on_error="raise"`` turns the first failure into a :class:`RewardError` whose one-line message names the
plugin, what went wrong, and the first offending sample index with a short repr of its completion.
``on_error="fallback"`` scores failed completions with ``fallback`` instead and counts them in
:attr:`RewardResult.num_fallbacks`.

Timeouts run the function in a daemon worker thread and stop *waiting* after ``timeout`` seconds. Python
cannot kill a thread: a hung function keeps running (and holding whatever it holds) in the background
until it returns on its own; its result is then discarded. Being a daemon thread, it does not keep the
process alive at exit. Reward functions that may hang for good (external services, solvers) should enforce
their own timeout too.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, TypeVar

import torch

T = TypeVar("T")

FLOAT32_MAX = torch.finfo(torch.float32).max

_REPR_CHARS = 60


class RewardError(RuntimeError):
    """A reward function failed and the policy is ``on_error="raise"``."""


class RewardResult(NamedTuple):
    """Combined rewards of ``N`` completions."""

    total: torch.Tensor
    """``[N]`` float32, ``sum_k weight_k * per_function[k]``."""
    per_function: dict[str, torch.Tensor]
    """Reward function name -> ``[N]`` float32, the unweighted scores used (fallbacks included)."""
    num_fallbacks: dict[str, int]
    """Reward function name -> how many of its ``N`` scores were replaced by the fallback value."""


def call_with_timeout(fn: Callable[..., T], timeout: float | None, /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, raising :class:`TimeoutError` if it takes longer than ``timeout`` seconds.

    ``timeout=None`` calls ``fn`` directly in this thread. Otherwise ``fn`` runs in a new daemon thread
    (so it works off the main thread, unlike ``signal.alarm``). On timeout the thread is abandoned, not
    killed: it runs on in the background and its result is dropped. Exceptions raised by ``fn`` propagate.
    """
    if timeout is None:
        return fn(*args, **kwargs)
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err
        finally:
            done.set()

    name = getattr(fn, "__name__", type(fn).__name__)
    threading.Thread(target=target, name=f"drpo-timeout-{name}", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError(f"did not finish within {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def short_repr(text: Any, limit: int = _REPR_CHARS) -> str:
    """A one-line repr of ``text`` cut to about ``limit`` characters."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def function_names(functions: Sequence[Any]) -> list[str]:
    """Metric names of ``functions``: each one's ``name``; repeats get ``_1``, ``_2``, ... suffixes."""
    names: list[str] = []
    seen: dict[str, int] = {}
    taken: set[str] = set()
    for fn in functions:
        base = getattr(fn, "name", None)
        if not isinstance(base, str) or not base:
            base = getattr(fn, "__name__", None) or type(fn).__name__
        name = base
        while name in taken:
            seen[base] = seen.get(base, 0) + 1
            name = f"{base}_{seen[base]}"
        taken.add(name)
        names.append(name)
    return names


def _as_score(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is not one."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if not isinstance(value, numbers.Real):
        try:  # numpy scalars and other number-likes
            value = float(value)
        except (TypeError, ValueError):
            return None
    value = float(value)
    return value if math.isfinite(value) else None


def _as_list(values: Any) -> list[Any] | None:
    if isinstance(values, torch.Tensor):
        return values.flatten().tolist() if values.dim() == 1 else None
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        return None
    try:
        return list(values)
    except TypeError:
        return None


def compute_rewards(
    functions: Sequence[Callable[..., Sequence[float | None]]],
    weights: Sequence[float] | None,
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: dict[str, Sequence[Any]] | None = None,
    *,
    on_error: Literal["raise", "fallback"] = "raise",
    fallback: float = 0.0,
    timeout: float | None = None,
) -> RewardResult:
    """Score ``completions`` with every function in ``functions`` and sum the weighted scores.

    Args:
        functions: reward functions (usually :class:`~drpo_lightning.rewards.base.RewardFunction`), each
            called as ``fn(prompts=..., completions=..., **columns)``; run one after another.
        weights: one weight per function (``reward_weights`` in the config); None means 1 each.
        prompts, completions: ``N`` strings each.
        columns: extra dataset columns, each ``N`` values aligned with ``completions``.
        on_error: ``"raise"`` (default) or ``"fallback"``, see the module docstring.
        fallback: score of a failed completion when ``on_error="fallback"``.
        timeout: seconds each function may take per call; None waits forever.
    """
    columns = dict(columns or {})
    if not functions:
        raise ValueError("compute_rewards needs at least one reward function")
    if weights is None:
        weights = [1.0] * len(functions)
    weights = [float(w) for w in weights]
    if len(weights) != len(functions):
        raise ValueError(
            f"reward_weights has {len(weights)} entries but there are {len(functions)} reward functions; "
            "give one weight per reward function"
        )
    if not all(math.isfinite(w) and abs(w) <= FLOAT32_MAX for w in weights):
        raise ValueError(f"reward_weights must be finite numbers within float32's range (+-3.4e38), got {weights}")
    if on_error not in ("raise", "fallback"):
        raise ValueError(f"on_error must be 'raise' or 'fallback', got {on_error!r}")
    fallback = float(fallback)
    if not (math.isfinite(fallback) and abs(fallback) <= FLOAT32_MAX):
        raise ValueError(f"fallback must be a finite number within float32's range (+-3.4e38), got {fallback}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts for {n} completions; repeat each prompt per sample")
    for key in ("prompts", "completions"):
        if key in columns:
            raise ValueError(f"dataset column {key!r} clashes with the reward-function argument of that name")
    for key, col in columns.items():
        if len(col) != n:
            raise ValueError(f"dataset column {key!r} has {len(col)} values for {n} completions")

    names = function_names(functions)
    used_scores: dict[str, torch.Tensor] = {}  # float64, fallbacks included
    num_fallbacks: dict[str, int] = {}

    def fail(name: str, what: str, index: int | None, cause: BaseException | None = None) -> None:
        if index is None:
            where = f"(all {n} completions; first: {short_repr(completions[0])})" if n else ""
        else:
            where = f"at sample {index} (completion {short_repr(completions[index])})"
        # Chained to the plugin's own exception, so `drpo fit --debug` shows where the plugin failed.
        raise RewardError(_one_line(f"reward function {name!r} {what} {where}")) from cause

    for fn, weight, name in zip(functions, weights, names):
        scores: list[float | None]
        whole_failure: str | None = None
        cause: BaseException | None = None
        try:
            raw = call_with_timeout(fn, timeout, prompts=prompts, completions=completions, **columns)
        except TimeoutError:
            whole_failure = f"timed out after {timeout:g} s (its thread keeps running in the background)"
        except Exception as err:
            whole_failure = f"raised {type(err).__name__}: {err}"
            cause = err
        else:
            values = _as_list(raw)
            if values is None:
                whole_failure = f"returned {type(raw).__name__}, expected a sequence of {n} floats"
            elif len(values) != n:
                whole_failure = f"returned {len(values)} scores for {n} completions"
        if whole_failure is not None:
            if on_error == "raise":
                fail(name, whole_failure, None, cause)
            scores = [None] * n
        else:
            scores = [_as_score(v) for v in values]
            for i, s in enumerate(scores):
                if s is None:
                    what = "(not a finite number)"
                elif abs(s) > FLOAT32_MAX or abs(weight * s) > FLOAT32_MAX:
                    what = f"(times its weight {weight:g}: beyond float32's range, +-3.4e38)"
                    scores[i] = None
                else:
                    continue
                if on_error == "raise":
                    fail(name, f"returned {short_repr(values[i], 30)} {what}", i)
        used_scores[name] = torch.tensor([fallback if s is None else s for s in scores], dtype=torch.float64)
        num_fallbacks[name] = sum(s is None for s in scores)

    def weighted_total() -> torch.Tensor:
        return sum(w * used_scores[name] for w, name in zip(weights, names))

    total = weighted_total()
    # Each weighted score fits float32, but their sum may not.
    for i in torch.nonzero(total.abs() > FLOAT32_MAX).flatten().tolist():
        overflow = (f"the weighted sum of the rewards ({', '.join(names)}) is {total[i].item():.3g} at sample {i} "
                    f"(completion {short_repr(completions[i])}), beyond float32's range (+-3.4e38); lower "
                    "model.reward_weights or the scores")
        if on_error == "raise":
            raise RewardError(_one_line(overflow))
        candidates = dict(zip(names, weights))
        while abs(total[i].item()) > FLOAT32_MAX:
            if not candidates:  # even the fallback scores, weighted, overflow
                raise RewardError(_one_line(overflow + " (and model.reward_fallback too)"))
            culprit = max(candidates, key=lambda name: abs(candidates[name] * used_scores[name][i].item()))
            del candidates[culprit]
            used_scores[culprit][i] = fallback
            num_fallbacks[culprit] += 1
            total = weighted_total()
    per_function = {name: used.to(torch.float32) for name, used in used_scores.items()}
    return RewardResult(total.to(torch.float32), per_function, num_fallbacks)
