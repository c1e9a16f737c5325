"""Property-based fuzzing (hypothesis) of the objectives, the advantage estimators, data parsing and config parsing.

These complement the value-level properties in tests/test_objectives.py and tests/test_advantages.py with
robustness properties: garbage where the mask is 0 changes nothing, how a batch is split changes nothing,
relabelling or reordering groups changes nothing, any bytes in a prompt file either load or give one line
naming the file and line, and any value for a config key either is accepted or gives one line.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from rel_helpers import tiny_fit_args

from drpo_lightning.advantages.dr_grpo import DrGRPOAdvantage
from drpo_lightning.advantages.grpo import GRPOAdvantage
from drpo_lightning.advantages.reinforce_pp import ReinforcePlusPlusAdvantage
from drpo_lightning.advantages.rloo import RLOOAdvantage
from drpo_lightning.cli import main
from drpo_lightning.data import DataError, PromptDataModule
from drpo_lightning.module import RLModule
from drpo_lightning.objectives.dppo import DPPO
from drpo_lightning.objectives.drpo import DRPO
from drpo_lightning.objectives.ppo import PPO

OBJECTIVES = {
    "drpo": lambda: DRPO(delta=0.2),
    "drpo-seq-mean-token-mean": lambda: DRPO(delta=12.5, loss_agg_mode="seq-mean-token-mean"),
    "dppo-tv": lambda: DPPO(divergence="tv", ratio_cap=3.0),
    "dppo-kl": lambda: DPPO(divergence="kl", loss_agg_mode="seq-mean-token-sum"),
    "ppo-dual-clip": lambda: PPO(clip_high=0.28, dual_clip=3.0),
    "ppo-sum-norm": lambda: PPO(loss_agg_mode="seq-mean-token-sum-norm", loss_agg_horizon=4),
}
ESTIMATORS = [GRPOAdvantage(), DrGRPOAdvantage(), RLOOAdvantage(), ReinforcePlusPlusAdvantage()]
FUZZ = settings(max_examples=40, deadline=None)


# ------------------------------------------------------------------------------------------------ objectives

@st.composite
def token_batches(draw, max_rows: int = 5, max_len: int = 4):
    """(z, y, advantages, mask) in float64: valid log-probs, any advantages, any 0/1 mask."""
    rows, length = draw(st.integers(1, max_rows)), draw(st.integers(1, max_len))
    n = rows * length
    logprob = st.floats(-40, 0)
    z = torch.tensor(draw(st.lists(logprob, min_size=n, max_size=n)), dtype=torch.float64).view(rows, length)
    y = torch.tensor(draw(st.lists(logprob, min_size=n, max_size=n)), dtype=torch.float64).view(rows, length)
    adv = torch.tensor(draw(st.lists(st.floats(-10, 10), min_size=rows, max_size=rows)), dtype=torch.float64)
    mask = torch.tensor(draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n)),
                        dtype=torch.float64).view(rows, length)
    return z, y, adv, mask


def loss_and_grad(objective, z, y, adv, mask, global_count=None):
    z = z.clone().requires_grad_()
    out = objective(logprobs=z, old_logprobs=y, advantages=adv, mask=mask, global_count=global_count)
    out.loss.backward()
    return out.loss.detach(), z.grad


@FUZZ
@given(batch=token_batches(), pad_z=st.sampled_from([-math.inf, -1e30, -50.0]),
       pad_y=st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30, 5.0]))
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_garbage_on_padded_positions_changes_neither_loss_nor_gradient(name, batch, pad_z, pad_y):
    """Where the mask is 0 the policy's log-prob may be anything a log-softmax gives (down to -inf) and the
    anchor anything a rollout engine reports (NaN, +-inf, huge, positive): none of it may leak."""
    z, y, adv, mask = batch
    assume(bool((mask == 0).any()))
    objective = OBJECTIVES[name]()
    clean_loss, clean_grad = loss_and_grad(objective, z, y, adv, mask)
    pad = mask == 0
    dirty_z, dirty_y = z.masked_fill(pad, pad_z), y.masked_fill(pad, pad_y)
    dirty_loss, dirty_grad = loss_and_grad(objective, dirty_z, dirty_y, adv, mask)
    assert torch.isfinite(clean_loss) and torch.isfinite(dirty_loss)
    assert dirty_loss == clean_loss
    assert torch.equal(dirty_grad, clean_grad)
    assert (dirty_grad[pad] == 0).all()
    # ... and none of it leaks into the metrics either (objective-specific and shared ones)
    clean = objective(logprobs=z, old_logprobs=y, advantages=adv, mask=mask).metrics
    dirty = objective(logprobs=dirty_z, old_logprobs=dirty_y, advantages=adv, mask=mask).metrics
    assert clean.keys() == dirty.keys()
    for key in clean:
        assert torch.isfinite(dirty[key]), key
        torch.testing.assert_close(dirty[key], clean[key], rtol=1e-12, atol=1e-12, msg=key)


@FUZZ
@given(batch=token_batches(max_rows=6), cuts=st.lists(st.integers(1, 5), max_size=3, unique=True))
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_any_split_into_minibatches_gives_the_whole_batch_loss_and_gradient(name, batch, cuts):
    """With the global count, losses of the pieces add up to the whole batch's loss, gradients too."""
    z, y, adv, mask = batch
    objective = OBJECTIVES[name]()
    whole_loss, whole_grad = loss_and_grad(objective, z, y, adv, mask)
    count = objective.count(mask)
    bounds = [0, *sorted(c for c in cuts if c < z.shape[0]), z.shape[0]]
    total, grads = torch.zeros((), dtype=torch.float64), []
    for lo, hi in zip(bounds, bounds[1:]):
        loss, grad = loss_and_grad(objective, z[lo:hi], y[lo:hi], adv[lo:hi], mask[lo:hi], global_count=count)
        total, grads = total + loss, [*grads, grad]
    torch.testing.assert_close(total, whole_loss, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.cat(grads), whole_grad, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------ advantages

quarters = st.integers(-4000, 4000).map(lambda k: k / 4)  # exact in float64: sums do not depend on order


@st.composite
def grouped_rewards(draw):
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=5))
    rewards = draw(st.lists(quarters, min_size=sum(sizes), max_size=sum(sizes)))
    ids = [g for g, size in enumerate(sizes) for _ in range(size)]
    return torch.tensor(rewards, dtype=torch.float64), torch.tensor(ids)


@FUZZ
@given(data=grouped_rewards(), seed=st.integers(0, 2**16),
       labels=st.lists(st.integers(-10**6, 10**6), min_size=5, max_size=5, unique=True),
       shifts=st.lists(quarters, min_size=5, max_size=5))
def test_advantages_do_not_depend_on_order_labels_or_a_per_group_offset(data, seed, labels, shifts):
    rewards, ids = data
    perm = torch.randperm(rewards.numel(), generator=torch.Generator().manual_seed(seed))
    relabelled = torch.tensor(labels)[ids]  # any distinct integers, unsorted, negative
    # A sample alone in its group has no group mean to subtract (REINFORCE++ then uses its raw reward, as the
    # reference does), so only groups of two or more are shifted.
    alone = torch.bincount(ids)[ids] == 1
    shifted = rewards + torch.tensor(shifts, dtype=torch.float64)[ids].masked_fill(alone, 0.0)
    for estimator in ESTIMATORS:
        base = estimator(rewards, ids)
        assert base.dtype == torch.float64 and torch.isfinite(base).all(), estimator
        torch.testing.assert_close(estimator(rewards[perm], ids[perm]), base[perm], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(estimator(rewards, relabelled), base, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(estimator(shifted, ids), base, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------ data parsing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**18, 10**18) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
prompt_rows = st.dictionaries(st.sampled_from(["prompt", "answer", "question", "id"]), json_values, max_size=3)
lines = st.one_of(
    st.binary(max_size=24),                                            # anything at all
    prompt_rows.map(lambda row: json.dumps(row).encode()),             # JSON, maybe the wrong shape
    prompt_rows.map(lambda row: json.dumps(row, ensure_ascii=False).encode("utf-8")),
    st.text(max_size=10).map(lambda t: json.dumps({"prompt": t}, ensure_ascii=False).encode("latin-1", "replace")),
    st.sampled_from([b"", b"  ", b"\r", b"\xef\xbb\xbf{}", b'{"prompt": "x"', b"[" * 3000, b"1" * 5000, b"NaN"]),
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.lists(lines, max_size=6), suffix=st.sampled_from([".jsonl", ".json"]))
def test_any_bytes_in_a_prompt_file_load_or_fail_with_one_line_naming_file_and_line(content, suffix, fuzz_dir):
    path = fuzz_dir / f"prompts{suffix}"
    raw = b"\n".join(content)
    path.write_bytes(raw)
    data = PromptDataModule(path=str(path), val_fraction=0, batch_size=1)
    try:
        data.setup()
    except DataError as err:
        message = str(err)
        assert "\n" not in message and message.strip() == message, message
        assert message.startswith((f"{path}:", f"{path} ", f"{path}: ", "data.path: ", f"data.path={path}")), message
        where = re.match(rf"{re.escape(str(path))}:(\d+): ", message)
        if where:
            assert 1 <= int(where.group(1)) <= raw.count(b"\n") + 1, message
        return
    items = data.train_dataset.items
    assert items and all(isinstance(i["prompt"], str) and i["prompt"].strip() for i in items)


prompt_text = st.text(min_size=1, max_size=20).filter(lambda t: t.strip() != "")
good_rows = st.lists(st.fixed_dictionaries({"prompt": prompt_text}, optional={"answer": json_values, "meta": json_values}),
                     min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(rows=good_rows, ascii_only=st.booleans(), crlf=st.booleans(), blank_every=st.integers(0, 3))
def test_any_valid_rows_round_trip_through_a_jsonl_file(rows, ascii_only, crlf, blank_every, fuzz_dir):
    """Unicode (line separators, NUL, emoji), CRLF endings, blank lines: every row comes back unchanged."""
    path = fuzz_dir / "good.jsonl"
    out = []
    for i, row in enumerate(rows):
        out.append(json.dumps(row, ensure_ascii=ascii_only))
        if blank_every and i % blank_every == 0:
            out.append("   ")
    path.write_bytes(("\r\n" if crlf else "\n").join(out).encode("utf-8"))
    data = PromptDataModule(path=str(path), val_fraction=0, batch_size=1, shuffle=False)
    data.setup()
    assert data.train_dataset.items == rows


# ------------------------------------------------------------------------------------------------ config parsing

class ModelLoadReached(Exception):
    """The trapped policy loader was called: the config was accepted."""


@pytest.fixture(scope="module")
def trapped_model_load():
    def trap(*args, **kwargs):
        raise ModelLoadReached

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("drpo_lightning.models.load_policy", trap)
        yield


def run_cli(args: list[str]) -> tuple[int | None, str]:
    """``main(args)`` with stderr captured; code None when the config was accepted (the model would load)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except ModelLoadReached:
            code = None
    return code, err.getvalue()


def assert_accepted_or_one_line(code: int | None, err: str) -> None:
    assert "Traceback" not in err, err[-2000:]
    if code is None:
        return
    lines = [line for line in err.splitlines() if line.startswith("drpo: error:")]
    assert code == 2 and len(lines) == 1, err[-2000:]


def _params(cls, skip=()) -> list[str]:
    return [name for name in inspect.signature(cls).parameters if name not in skip]


# Every model and data option, except those that size the work done before the model loads (a task_size of
# 10**9 would generate 10**9 prompts). The trainer section and seed_everything are Lightning's own: their
# mistakes are a known gap (see test_config_errors.py::test_known_gap_trainer_and_yaml_errors_are_one_line).
MODEL_KEYS = _params(RLModule)
DATA_KEYS = _params(PromptDataModule, skip=("task_size", "val_size", "num_workers"))
KEYS = ([f"model.{k}" for k in MODEL_KEYS] + [f"data.{k}" for k in DATA_KEYS]
        + ["model.objective.init_args.delta", "model.rollout.init_args.temperature", "trainer.max_steps"])
scalars = st.one_of(st.integers(-3, 10**9), st.floats(), st.booleans(), st.none(), st.text(max_size=12),
                    st.sampled_from(["drpo", "ppo", "grpo", "hf", "exact_match", "[exact_match]", "null", "{}", "[]",
                                     "{class_path: drpo}", "0", "-1", "1e309", "nan", ".inf", "~", "''", "'", "."]))


@settings(max_examples=20, deadline=None)
@given(pairs=st.lists(st.tuples(st.sampled_from(KEYS), scalars), min_size=1, max_size=3))
def test_any_cli_value_is_accepted_or_one_line_naming_the_problem(pairs, tmp_path_factory, trapped_model_load):
    root = tmp_path_factory.getbasetemp() / "cfg_fuzz"
    args = [f"--{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in pairs]
    assume(all("\x00" not in a for a in args))  # a shell cannot pass NUL in an argument
    code, err = run_cli(tiny_fit_args(root, *args))
    assert_accepted_or_one_line(code, err)


sections = {"model": MODEL_KEYS, "data": DATA_KEYS}
config_docs = st.one_of(
    st.dictionaries(st.sampled_from(["model", "data"]), st.one_of(scalars, st.lists(scalars, max_size=2)), max_size=2),
    st.sampled_from(list(sections)).flatmap(
        lambda section: st.dictionaries(st.sampled_from(sections[section]), scalars, min_size=1, max_size=3).map(
            lambda options: {section: options})),
    st.dictionaries(st.sampled_from(["modle", "optimizer", "objective"]), scalars, min_size=1, max_size=1),
    scalars, st.lists(scalars, max_size=2),
)


@settings(max_examples=20, deadline=None)
@given(doc=config_docs, raw=st.booleans())
def test_any_config_file_is_accepted_or_one_line_naming_the_problem(doc, raw, tmp_path_factory, trapped_model_load):
    root = tmp_path_factory.getbasetemp() / "cfg_fuzz"
    root.mkdir(exist_ok=True)
    config = root / "fuzz.yaml"
    text = yaml.safe_dump(doc) if not raw else (doc if isinstance(doc, str) else json.dumps(doc, default=str))
    config.write_text(text)
    code, err = run_cli(tiny_fit_args(root, "--config", str(config)))
    assert_accepted_or_one_line(code, err)
