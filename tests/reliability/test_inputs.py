"""Inputs a user gets wrong end in one line naming the key, file:line, plugin or option, before training.

Sampling values that are null or not finite, data rows that a reward function cannot score, columns that
clash with the reward call, shards that disagree, optional packages that are missing, model kwargs that the
model refuses, and ``drpo plot-weights`` options; plus two things that were silently wrong: exported weights
readable by their owner only, and property tests that drew new examples on every CI run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rel_helpers import assert_one_line_error, tiny_fit_args

from drpo_lightning import data as data_module
from drpo_lightning.cli import main
from drpo_lightning.data import DataError, PromptDataModule, prompt_token_counter

ROOT = Path(__file__).resolve().parents[2]


class ModelLoadReached(Exception):
    """The trapped policy loader was called: everything before it was accepted."""


@pytest.fixture
def trapped_model_load(monkeypatch):
    def trap(*args, **kwargs):
        raise ModelLoadReached

    monkeypatch.setattr("drpo_lightning.models.load_policy", trap)


def run_cli(args: list[str]) -> tuple[int | str, str]:
    """``main(args)`` in-process: (exit code or "model-load", stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except ModelLoadReached:
            code = "model-load"
    return code, err.getvalue()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def sums(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(start, start + n)]


def file_args(tmp_path: Path, path: str, *extra: str) -> list[str]:
    """The tiny quickstart fit on a prompt file instead of the arithmetic task."""
    return tiny_fit_args(tmp_path, "--data.task=null", f"--data.path={path}", "--data.val_fraction=0", *extra)


# ------------------------------------------------------------------------------------ 1. sampling values

@pytest.mark.parametrize(("value", "fragment"), [
    ("temperature=null", "HFRollout: temperature must be a finite number, got None"),
    ("top_p=null", "HFRollout: top_p must be a finite number, got None"),
    ("max_new_tokens=null", "HFRollout: max_new_tokens must be an integer, got None"),
    ("temperature=.inf", "HFRollout: temperature must be a finite number, got inf"),
    ("temperature=.nan", "HFRollout: temperature must be a finite number, got nan"),
    ("top_p=.nan", "HFRollout: top_p must be a finite number, got nan"),
], ids=["temperature-null", "top_p-null", "max_new_tokens-null", "temperature-inf", "temperature-nan",
        "top_p-nan"])
def test_null_or_non_finite_sampling_values_are_one_line(value, fragment, tmp_path, trapped_model_load):
    code, err = run_cli(tiny_fit_args(tmp_path, f"--model.rollout.init_args.{value}"))
    assert_one_line_error(code, err, fragment)


def test_property_tests_draw_the_same_examples_on_every_run():
    """tests/conftest.py loads a derandomized profile: a property test's examples are a function of the test,
    so a red CI run reproduces and a green one stays green. (HYPOTHESIS_PROFILE=random searches afresh.)"""
    current = getattr(settings, "get_current_profile_name", lambda: settings._current_profile)()
    if current != "deterministic":  # HYPOTHESIS_PROFILE=random or --hypothesis-profile=random
        pytest.skip(f"hypothesis profile {current!r} was asked for")
    assert settings.default.derandomize and settings.default.database is None and settings.default.print_blob

    def draws() -> list[int]:
        seen: list[int] = []

        @settings(max_examples=25)
        @given(st.integers())
        def record(x):
            seen.append(x)

        record()
        return seen

    first = draws()
    assert len(set(first)) > 5 and draws() == first


# ------------------------------------------------------------------------------ 2, 3. data checked up front

@pytest.fixture
def bad_data(tmp_path) -> Path:
    rows = sums(20)
    del rows[16]["answer"]  # line 17 of 20: drawn only near the end of a run
    write_jsonl(tmp_path / "missing_answer.jsonl", rows)
    write_jsonl(tmp_path / "good.jsonl", sums(20))
    write_jsonl(tmp_path / "val_missing.jsonl", sums(3) + [{"prompt": "9+9="}])
    write_jsonl(tmp_path / "completions.jsonl", sums(3) + [{"prompt": "7+7=", "answer": "14", "completions": []}])
    write_jsonl(tmp_path / "prompts.jsonl", [{**r, "prompts": r["prompt"]} for r in sums(4)])
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", sums(10))
    write_jsonl(shards / "part-1.jsonl", [{"prompt": r["prompt"], "solution": r["answer"]} for r in sums(10, 10)])
    renamed = tmp_path / "renamed_shards"  # a column the rewards do not read, renamed in the second shard
    renamed.mkdir()
    write_jsonl(renamed / "a.jsonl", [{**r, "level": 1} for r in sums(10)])
    write_jsonl(renamed / "b.jsonl", [{**r, "difficulty": 1} for r in sums(10, 10)])
    return tmp_path


DATA_SCENARIOS = [
    ("missing-answer", ["--data.path={d}/missing_answer.jsonl"],
     ["{d}/missing_answer.jsonl:17: no 'answer' column, which reward 'exact_match' reads"]),
    ("missing-answer-math-verify", ["--data.path={d}/good.jsonl", "--model.rewards=[math_verify]",
                                    "--model.rewards.init_args.answer_column=solution"],
     ["{d}/good.jsonl:1: no 'solution' column, which reward 'math_verify' reads"]),
    ("missing-answer-held-out", ["--data.path={d}/good.jsonl", "--data.val_path={d}/val_missing.jsonl"],
     ["{d}/val_missing.jsonl:4: no 'answer' column"]),
    ("column-completions", ["--data.path={d}/completions.jsonl", "--data.batch_size=1"],
     ["{d}/completions.jsonl:4: column 'completions' clashes with the 'completions' argument"]),
    ("column-prompts", ["--data.path={d}/prompts.jsonl"],
     ["{d}/prompts.jsonl:1: column 'prompts' clashes"]),
    ("shard-without-answer", ["--data.path={d}/shards"],
     ["{d}/shards/part-1.jsonl:1: no 'answer' column, which reward 'exact_match' reads",
      "columns of this row: ['prompt', 'solution']"]),
    ("shards-differ", ["--data.path={d}/renamed_shards"],
     ["{d}/renamed_shards/b.jsonl:1: the shards of {d}/renamed_shards have different columns",
      "no 'level'; extra 'difficulty'"]),
]


@pytest.mark.parametrize(("args", "fragments"), [s[1:] for s in DATA_SCENARIOS], ids=[s[0] for s in DATA_SCENARIOS])
def test_data_a_reward_cannot_use_is_one_line_before_the_model_loads(args, fragments, bad_data, trapped_model_load):
    """Found today only when the row is drawn: one run died at step 17 of 20 blaming the reward function."""
    d = str(bad_data)
    path = next(a for a in args if a.startswith("--data.path=")).format(d=d)
    rest = [a.format(d=d) for a in args if not a.startswith("--data.path=")]
    code, err = run_cli(file_args(bad_data / "root", path.removeprefix("--data.path="), *rest))
    assert_one_line_error(code, err, *(f.format(d=d) for f in fragments))


def test_a_long_data_check_shows_progress(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_module, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(data_module, "_PROGRESS_EVERY", 500)
    path = write_jsonl(tmp_path / "big.jsonl", sums(1200))
    dm = PromptDataModule(path=path, val_fraction=0, batch_size=2)
    dm.required_columns = {"answer": ["exact_match"]}
    dm.setup()
    err = capsys.readouterr().err
    assert f"drpo: reading {path}: 1,000 rows" in err and "drpo: checking data.path: 1,000 rows" in err


def test_a_prompt_longer_than_max_prompt_length_is_named_by_file_line(tmp_path, tiny_model_dir):
    """The length in tokens needs the model's tokenizer: the trainer calls check_prompt_lengths with it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    rows = sums(30)
    rows[23]["prompt"] = "1+" * 40 + "1="
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    dm = PromptDataModule(path=path, val_fraction=0.2, batch_size=2, seed=3)
    dm.setup()
    count = prompt_token_counter(tokenizer, chat_template=None)
    n = count([rows[23]["prompt"]])[0]
    assert n >= 82  # one token per character, plus any BOS
    dm.check_prompt_lengths(count, limit=n)
    with pytest.raises(DataError) as info:
        dm.check_prompt_lengths(count, limit=n - 1, batch=4)
    message = str(info.value)
    assert message.startswith(f"{path}:24: the prompt is {n} tokens long, more than model.max_prompt_length = {n - 1}")
    assert "\n" not in message


def test_a_prompt_longer_than_max_prompt_length_stops_a_fit_before_the_first_rollout(tmp_path, monkeypatch):
    rows = sums(20)
    rows[17]["prompt"] = "1+" * 20 + "1="
    path = write_jsonl(tmp_path / "long.jsonl", rows)

    def no_rollout(*args, **kwargs):
        pytest.fail("a rollout was sampled before the prompt lengths were checked")

    monkeypatch.setattr("drpo_lightning.rollouts.hf.HFRollout.generate", no_rollout)
    code, err = run_cli(file_args(tmp_path, path, "--model.max_prompt_length=30"))
    assert_one_line_error(code, err, f"{path}:18: the prompt is ", "more than model.max_prompt_length = 30")


# ------------------------------------------------------------------------------- 4. missing optional package

def test_missing_math_verify_is_one_line_naming_the_plugin_and_extra(monkeypatch, trapped_model_load):
    """`drpo fit --config configs/drpo_fsdp.yaml` on a fresh install (math-verify is an extra)."""
    monkeypatch.setitem(sys.modules, "math_verify", None)  # `import math_verify` now raises ImportError
    code, err = run_cli(["fit", "--config", str(ROOT / "configs" / "drpo_fsdp.yaml")])
    assert_one_line_error(code, err, "reward 'math_verify' (model.rewards) needs the math-verify package",
                          'pip install "drpo-lightning[math]"')


def test_missing_pyarrow_for_parquet_data_is_one_line_naming_the_extra(tmp_path, monkeypatch, trapped_model_load):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    code, err = run_cli(file_args(tmp_path, str(path)))
    assert_one_line_error(code, err, f"{path}: reading Parquet needs pyarrow", 'pip install "drpo-lightning[data]"')


# ------------------------------------------------------------------------------------ 5, 6. model loading

def test_an_unknown_model_kwarg_is_one_line_naming_model_kwargs(tmp_path):
    code, err = run_cli(tiny_fit_args(tmp_path, "--model.model_kwargs={not_an_arg: 1}"))
    assert_one_line_error(code, err, "model.model_kwargs: not_an_arg=1 was refused by from_pretrained",
                          "unexpected keyword argument 'not_an_arg'")


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_exported_weights_follow_the_umask(umask, tmp_path):
    """safetensors writes through a 0600 temporary file: the weights were unreadable beside a 0644 config."""
    root = tmp_path / "run"
    previous = os.umask(umask)
    try:
        code, err = run_cli(tiny_fit_args(root, "--trainer.max_steps=1", f"--model.export_dir={tmp_path / 'export'}"))
    finally:
        os.umask(previous)
    assert code == 0, err[-3000:]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "export").iterdir() if p.is_file()}
    assert "model.safetensors" in modes and "config.json" in modes, modes
    assert set(modes.values()) == {0o666 & ~umask}, {k: oct(v) for k, v in modes.items()}


# ---------------------------------------------------------------------------------------- 7. plot-weights

PLOT_SCENARIOS = [
    ("out-missing-folder", ["--out", "{d}/no_such_folder/w.png"], "--out {d}/no_such_folder/w.png: folder"),
    ("out-unknown-suffix", ["--out", "{d}/w.pgn"], "unknown image format 'pgn'; use one of"),
    ("out-is-a-folder", ["--out", "{d}"], "--out {d}: is a folder"),
    ("param-not-a-number", ["--param", "drpo.delta=abc"], "--param drpo.delta='abc': delta must be a number"),
    ("param-bad-yaml", ["--param", "drpo.delta=[1"], "--param 'drpo.delta=[1': VALUE is not valid YAML"),
    ("param-unknown-arg", ["--param", "drpo.deltaa=1"], "objective 'drpo' (--param drpo.deltaa=1): "),
    ("points-too-many", ["--points", "1000000000"], "--points must be in [3, 100000], got 1000000000"),
]


@pytest.mark.parametrize(("args", "fragment"), [s[1:] for s in PLOT_SCENARIOS], ids=[s[0] for s in PLOT_SCENARIOS])
def test_plot_weights_mistakes_are_one_line(args, fragment, tmp_path):
    pytest.importorskip("matplotlib")
    d = str(tmp_path)
    args = [a.format(d=d) for a in args]
    if "--out" not in args:
        args += ["--out", f"{d}/w.png"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["plot-weights", *args])
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()[-2000:]
    assert lines[0].startswith("drpo plot-weights: error: ") and fragment.format(d=d) in lines[0], lines[0]
    assert not any(Path(d).rglob("*.png")) and not any(Path(d).rglob("*.pgn"))
