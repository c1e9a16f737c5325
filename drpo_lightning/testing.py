"""Conformance kit for plugin authors: call these from your own tests.

::

    from drpo_lightning.testing import check_advantage, check_objective, check_reward

    def test_my_objective_conforms():
        check_objective(MyObjective(epsilon=0.2))

    def test_my_reward_conforms():
        check_reward(MyReward(), prompts=["1+1="] * 2, completions=["2", "3"], answer=["2", "2"])

Each check raises :class:`AssertionError` with a message saying what is wrong (and returns quietly, or with
the values it computed, when everything conforms). The built-in plugins pass every check.

What is checked:

- :func:`check_objective`: the public call ``objective(logprobs=, old_logprobs=, advantages=, mask=)``
  returns ``.loss`` (a differentiable 0-dim tensor of the input dtype) and ``.metrics`` (detached finite
  0-dim tensors); loss and gradient are finite in float32 and float64 on random inputs that include +-50
  log-prob gaps, on valid and on padded positions; the autograd gradient matches central finite differences
  in float64; no gradient reaches ``old_logprobs`` or ``advantages``; ``[B]`` and ``[B, T]`` advantages give
  the same loss; masked-out tokens do not change the loss and get zero gradient; the aggregation is
  split-invariant (pieces of a batch, each normalised by the global count ``sum objective.count(mask)`` via
  ``global_count=``, add up to the loss and gradient of the whole batch); inputs are not modified.
- :func:`check_reward`: keyword-only call, one finite float (or None) per completion, unknown extra columns
  ignored, inputs not modified.
- :func:`check_advantage`: shape ``[N]``, floating, finite, zero for groups whose rewards are all equal
  (also when the whole batch is equal, and for groups of one), inputs not modified.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["check_advantage", "check_objective", "check_reward"]

_UNKNOWN_COLUMN = "drpo_conformance_unknown_column"


def _fail(what: str, message: str) -> AssertionError:
    return AssertionError(f"{what}: {message}")


# ------------------------------------------------------------------------------------------------- objective


def _random_inputs(
    generator: torch.Generator, batch: int, length: int, dtype: torch.dtype, *, extreme: bool
) -> dict[str, torch.Tensor]:
    """Random ``logprobs``/``old_logprobs`` ``[B, T]``, ``advantages`` ``[B]``, ``mask`` ``[B, T]``.

    Probabilities lie in [0.05, 0.95]; with ``extreme`` some tokens (valid and padded) instead have a log-prob
    gap of +-50 between policy and anchor. Every sequence keeps at least one valid token except the last one
    of a batch of 4 or more, which is all padding.
    """

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, length, generator=generator, dtype=torch.float64)

    old = uniform(0.05, 0.95).log()
    new = uniform(0.05, 0.95).log()
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.float64)
    if batch >= 4:
        mask[-1] = 0  # a sequence of padding only
    if extreme:
        pick = torch.rand(batch, length, generator=generator, dtype=torch.float64)
        up, down = pick < 0.15, pick > 0.85
        # pi ~ 1 with mu = e^-50, and the reverse: the train/rollout mismatch (or padding garbage) the
        # objective must survive.
        new = torch.where(
            up, torch.full_like(new, -1e-3), torch.where(down, torch.full_like(new, -50.0), new)
        )
        old = torch.where(
            up, torch.full_like(old, -50.0), torch.where(down, torch.full_like(old, -1e-3), old)
        )
    advantages = torch.randn(batch, generator=generator, dtype=torch.float64)
    advantages[0] = 0.0  # a zero advantage too
    if batch > 1:
        advantages[1] = -advantages[1].abs() - 0.5  # and at least one of each sign
    if batch > 2:
        advantages[2] = advantages[2].abs() + 0.5
    return {
        "logprobs": new.to(dtype),
        "old_logprobs": old.to(dtype),
        "advantages": advantages.to(dtype),
        "mask": mask.to(dtype),
    }


def _call(objective: Callable, what: str, **inputs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    try:
        out = objective(**inputs)
    except TypeError as err:
        raise _fail(
            what,
            "the public call objective(logprobs=..., old_logprobs=..., advantages=..., mask=..."
            f"{', global_count=...' if 'global_count' in inputs else ''}) failed: {err}",
        ) from err
    for attr in ("loss", "metrics"):
        if not hasattr(out, attr):
            raise _fail(
                what, f"the call must return an object with .loss and .metrics, got {type(out).__name__}"
            )
    loss, metrics = out.loss, out.metrics
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise _fail(what, f".loss must be a 0-dim tensor, got {getattr(loss, 'shape', type(loss).__name__)}")
    if not isinstance(metrics, dict):
        raise _fail(what, f".metrics must be a dict, got {type(metrics).__name__}")
    return loss, metrics


def _loss_and_grad(
    objective: Callable, what: str, inputs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    logprobs = inputs["logprobs"].detach().clone().requires_grad_(True)
    loss, _ = _call(objective, what, **{**inputs, "logprobs": logprobs})
    if not loss.requires_grad:
        raise _fail(what, ".loss does not depend on logprobs (no gradient flows)")
    (grad,) = torch.autograd.grad(loss, logprobs, allow_unused=True)
    return loss.detach(), torch.zeros_like(logprobs) if grad is None else grad


def _count(objective: Any, mask: torch.Tensor) -> torch.Tensor:
    if hasattr(objective, "count"):
        return objective.count(mask)
    from drpo_lightning.objectives.base import aggregation_count

    return aggregation_count(mask, getattr(objective, "loss_agg_mode", "token-mean"))


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    return bool(torch.allclose(a, b, rtol=rtol, atol=atol))


def _worst(a: torch.Tensor, b: torch.Tensor) -> str:
    diff = (a - b).abs()
    index = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0]) if diff.dim() else ()
    return f"largest difference {diff.max().item():.3g} at {list(index)}: {a[index].item():.10g} vs {b[index].item():.10g}"


def check_objective(objective: Callable, *, seed: int = 0) -> None:
    """Check an objective plugin instance against the contract every objective must meet.

    Args:
        objective: an instance, e.g. ``SPO(epsilon=0.2)`` (check each configuration you ship).
        seed: seed of the random inputs.

    Raises:
        AssertionError: naming the property that fails and, where it applies, the largest mismatch.
    """
    name = type(objective).__name__
    if getattr(objective, "requires_topk", 0):
        raise _fail(name, "check_objective does not build the top-K inputs that requires_topk > 0 needs")
    generator = torch.Generator().manual_seed(seed)

    # 1. Call contract, metrics, dtype, finiteness (also with +-50 gaps, float32 and float64).
    for dtype in (torch.float32, torch.float64):
        for extreme in (False, True):
            what = f"{name} ({'+-50 log-prob gaps, ' if extreme else ''}{str(dtype).removeprefix('torch.')})"
            inputs = _random_inputs(generator, 6, 7, dtype, extreme=extreme)
            before = {k: v.clone() for k, v in inputs.items()}
            old = inputs["old_logprobs"].clone().requires_grad_(True)
            adv = inputs["advantages"].clone().requires_grad_(True)
            logprobs = inputs["logprobs"].clone().requires_grad_(True)
            loss, metrics = _call(
                objective, what, logprobs=logprobs, old_logprobs=old, advantages=adv, mask=inputs["mask"]
            )
            if loss.dtype != dtype:
                raise _fail(what, f".loss must have the dtype of logprobs ({dtype}), got {loss.dtype}")
            if not bool(torch.isfinite(loss)):
                raise _fail(what, f".loss is not finite: {loss.item()}")
            if not loss.requires_grad:
                raise _fail(what, ".loss does not depend on logprobs (no gradient flows)")
            for key, value in metrics.items():
                if not isinstance(key, str):
                    raise _fail(what, f"metric names must be strings, got {key!r}")
                if not isinstance(value, torch.Tensor) or value.dim() != 0:
                    raise _fail(
                        what,
                        f"metric {key!r} must be a 0-dim tensor, got {getattr(value, 'shape', type(value).__name__)}",
                    )
                if value.requires_grad or value.grad_fn is not None:
                    raise _fail(
                        what, f"metric {key!r} is not detached (it would keep the graph alive); use .detach()"
                    )
                if not bool(torch.isfinite(value)):
                    raise _fail(what, f"metric {key!r} is not finite: {value.item()}")
            loss.backward()
            grad = logprobs.grad
            if grad is None or not bool(torch.isfinite(grad).all()):
                raise _fail(
                    what, f"the gradient w.r.t. logprobs is {'missing' if grad is None else 'not finite'}"
                )
            for arg, tensor in (("old_logprobs", old), ("advantages", adv)):
                if tensor.grad is not None and bool((tensor.grad != 0).any()):
                    raise _fail(
                        what, f"a gradient flows into {arg}; it must be treated as a constant (detach it)"
                    )
            if bool((grad * (1 - inputs["mask"])).abs().max() > 0):
                raise _fail(what, "padded (mask = 0) tokens receive a gradient")
            passed = {"logprobs": logprobs, "old_logprobs": old, "advantages": adv, "mask": inputs["mask"]}
            for key, value in before.items():
                if not torch.equal(value, passed[key].detach()):
                    raise _fail(what, f"the call modified its input {key!r} in place")

    # 2. Autograd gradient vs central finite differences (float64, moderate inputs).
    what = f"{name} (gradient vs finite differences, float64)"
    inputs = _random_inputs(generator, 3, 4, torch.float64, extreme=False)
    _, grad = _loss_and_grad(objective, what, inputs)
    step = 1e-6
    numeric = torch.zeros_like(grad)
    with torch.no_grad():
        for index in torch.cartesian_prod(*(torch.arange(s) for s in grad.shape)):
            i = tuple(int(x) for x in index)
            values = []
            for sign in (1.0, -1.0):
                shifted = inputs["logprobs"].clone()
                shifted[i] += sign * step
                values.append(_call(objective, what, **{**inputs, "logprobs": shifted})[0])
            numeric[i] = (values[0] - values[1]) / (2 * step)
    if not _close(grad, numeric, rtol=1e-5, atol=1e-7):
        raise _fail(what, f"autograd and finite differences disagree: {_worst(grad, numeric)}")

    # 3. [B] and [B, T] advantages give the same loss and gradient.
    what = f"{name} ([B] vs [B, T] advantages)"
    inputs = _random_inputs(generator, 5, 6, torch.float64, extreme=True)
    per_token = {
        **inputs,
        "advantages": inputs["advantages"].unsqueeze(-1).expand_as(inputs["logprobs"]).clone(),
    }
    loss_b, grad_b = _loss_and_grad(objective, what, inputs)
    loss_bt, grad_bt = _loss_and_grad(objective, what, per_token)
    if not (_close(loss_b, loss_bt, 1e-12, 1e-12) and _close(grad_b, grad_bt, 1e-12, 1e-12)):
        raise _fail(
            what,
            f"the two forms disagree: loss {loss_b.item()!r} vs {loss_bt.item()!r}; {_worst(grad_b, grad_bt)}",
        )

    # 4. Masked-out tokens do not change the loss (whatever their log-probs and advantages).
    what = f"{name} (masked-out tokens)"
    pad = per_token["mask"] == 0
    garbage = _random_inputs(generator, 5, 6, torch.float64, extreme=True)
    changed = dict(per_token)
    changed["logprobs"] = torch.where(pad, garbage["logprobs"] - 3.0, per_token["logprobs"])
    changed["old_logprobs"] = torch.where(pad, garbage["old_logprobs"], per_token["old_logprobs"])
    changed["advantages"] = torch.where(
        pad, 10 * garbage["advantages"].unsqueeze(-1) + 1, per_token["advantages"]
    )
    loss_changed, grad_changed = _loss_and_grad(objective, what, changed)
    if not (_close(loss_bt, loss_changed, 1e-12, 1e-12) and _close(grad_bt, grad_changed, 1e-12, 1e-12)):
        raise _fail(
            what,
            f"changing only masked-out positions changed the result: loss {loss_bt.item()!r} vs "
            f"{loss_changed.item()!r}; {_worst(grad_bt, grad_changed)} (is the mask ignored somewhere?)",
        )

    # 5. Split invariance: pieces normalised by the global count add up to the whole batch.
    what = f"{name} (split invariance with global_count)"
    inputs = _random_inputs(generator, 7, 6, torch.float64, extreme=True)
    total = _count(objective, inputs["mask"])
    whole_loss, whole_grad = _loss_and_grad(objective, what, {**inputs, "global_count": total})
    plain_loss, _ = _loss_and_grad(objective, what, inputs)
    if not _close(whole_loss, plain_loss, 1e-12, 1e-12):
        raise _fail(
            what,
            f"global_count={float(total)} (objective.count(mask) of the whole batch) gives loss "
            f"{whole_loss.item()!r} but no global_count gives {plain_loss.item()!r}",
        )
    for cuts in ((2,), (1, 4, 6)):
        bounds = [0, *cuts, inputs["mask"].shape[0]]
        pieces = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
        counts = sum(float(_count(objective, inputs["mask"][p])) for p in pieces)
        if not math.isclose(counts, float(total), rel_tol=1e-12):
            raise _fail(
                what,
                f"objective.count() of the pieces sums to {counts}, of the whole batch to {float(total)}",
            )
        loss_sum = torch.zeros((), dtype=torch.float64)
        grad_parts = []
        for p in pieces:
            piece = {k: v[p] for k, v in inputs.items()}
            loss_p, grad_p = _loss_and_grad(objective, what, {**piece, "global_count": total})
            loss_sum = loss_sum + loss_p
            grad_parts.append(grad_p)
        grad_cat = torch.cat(grad_parts)
        if not (_close(loss_sum, whole_loss, 1e-10, 1e-12) and _close(grad_cat, whole_grad, 1e-10, 1e-12)):
            raise _fail(
                what,
                f"rows split at {list(cuts)}: the pieces' losses add up to {loss_sum.item()!r}, the whole batch "
                f"gives {whole_loss.item()!r}; {_worst(grad_cat, whole_grad)} (normalise by global_count)",
            )


# --------------------------------------------------------------------------------------------------- reward


def check_reward(
    reward: Callable, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]
) -> list[float | None]:
    """Check a reward plugin instance on one batch and return its scores.

    Args:
        reward: an instance of a :class:`~drpo_lightning.rewards.base.RewardFunction` subclass.
        prompts, completions: ``N`` strings each.
        columns: the dataset columns the reward reads, each a list of ``N`` values.

    The reward is called twice, the second time with an extra column it cannot know; both calls must give
    the same scores (so a reward must be deterministic).
    """
    from drpo_lightning.rewards.base import RewardFunction

    name = type(reward).__name__
    n = len(completions)
    if len(prompts) != n or any(len(v) != n for v in columns.values()):
        raise ValueError("check_reward: prompts, completions and every column must have the same length")
    if not isinstance(reward, RewardFunction):
        raise _fail(name, "must be an instance of a drpo_lightning.rewards.base.RewardFunction subclass")
    params = inspect.signature(reward.__call__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise _fail(
            name, "__call__ must accept **columns, so that dataset columns it does not use are ignored"
        )
    for arg in ("prompts", "completions"):
        if arg in params and params[arg].kind is inspect.Parameter.POSITIONAL_ONLY:
            raise _fail(name, f"{arg!r} must be accepted as a keyword argument")

    inputs = {
        "prompts": list(prompts),
        "completions": list(completions),
        **{k: list(v) for k, v in columns.items()},
    }
    before = copy.deepcopy(inputs)
    try:
        scores = reward(**inputs)
    except Exception as err:
        raise _fail(
            name, f"the keyword call reward(prompts=..., completions=..., **columns) raised {err!r}"
        ) from err
    if inputs != before:
        raise _fail(name, "the call modified its inputs in place")
    try:
        scores = list(scores)
    except TypeError as err:
        raise _fail(name, f"must return a sequence of scores, got {type(scores).__name__}") from err
    if len(scores) != n:
        raise _fail(name, f"must return one score per completion: {n} completions, {len(scores)} scores")
    for i, score in enumerate(scores):
        if score is None:
            continue
        if isinstance(score, bool) or not isinstance(score, numbers.Real):
            raise _fail(name, f"score {i} must be a float or None, got {score!r} ({type(score).__name__})")
        if not math.isfinite(float(score)):
            raise _fail(name, f"score {i} is not finite: {score!r}")
    try:
        again = list(reward(**copy.deepcopy(inputs), **{_UNKNOWN_COLUMN: [object()] * n}))
    except Exception as err:
        raise _fail(
            name, f"an unknown extra column {_UNKNOWN_COLUMN!r} must be ignored, but the call raised {err!r}"
        ) from err
    if again != scores:
        raise _fail(
            name, f"an unknown extra column (or a second call) changed the scores: {scores} vs {again}"
        )
    return [None if s is None else float(s) for s in scores]


# ------------------------------------------------------------------------------------------------ advantage


def check_advantage(estimator: Callable, *, seed: int = 0) -> None:
    """Check an advantage plugin instance: shape, dtype, finiteness, zero for all-equal groups.

    Args:
        estimator: an instance of an :class:`~drpo_lightning.advantages.base.AdvantageEstimator` subclass.
        seed: seed of the random rewards.
    """
    from drpo_lightning.advantages.base import AdvantageEstimator

    name = type(estimator).__name__
    if not isinstance(estimator, AdvantageEstimator):
        raise _fail(
            name, "must be an instance of a drpo_lightning.advantages.base.AdvantageEstimator subclass"
        )
    generator = torch.Generator().manual_seed(seed)
    group_ids = torch.arange(5).repeat_interleave(4)  # 5 groups of 4
    varied = torch.randn(20, generator=generator, dtype=torch.float64)
    rewards = varied.clone()
    rewards[0:4] = 1.0  # all-equal groups
    rewards[8:12] = 0.1  # a value whose group mean is not exact in binary
    equal = torch.zeros(20, dtype=torch.bool)
    equal[0:4] = equal[8:12] = True
    cases = [
        ("mixed groups", rewards, group_ids, equal),
        ("mixed groups, float32", rewards.float(), group_ids, equal),
        ("binary 0/1 rewards", (varied > 0).to(torch.float64), group_ids, None),
        (
            "every reward equal",
            torch.full((20,), 0.5, dtype=torch.float64),
            group_ids,
            torch.ones(20, dtype=torch.bool),
        ),
        ("groups of one", varied[:6].clone(), torch.arange(6), None),
    ]
    for label, r, g, zero in cases:
        what = f"{name} ({label})"
        r_before, g_before = r.clone(), g.clone()
        try:
            out = estimator(r, g)
        except Exception as err:
            raise _fail(what, f"estimator(rewards, group_ids) raised {err!r}") from err
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(r.shape):
            raise _fail(
                what,
                f"must return a tensor of shape {tuple(r.shape)}, got {getattr(out, 'shape', type(out).__name__)}",
            )
        if not out.is_floating_point():
            raise _fail(what, f"advantages must be floating point, got {out.dtype}")
        if not bool(torch.isfinite(out).all()):
            raise _fail(what, f"advantages are not finite: {out.tolist()}")
        if not (torch.equal(r, r_before) and torch.equal(g, g_before)):
            raise _fail(what, "the call modified its inputs in place")
        if zero is not None and bool(out[zero].abs().max() > 1e-6):
            raise _fail(
                what, f"groups whose rewards are all equal must get zero advantage, got {out[zero].tolist()}"
            )
