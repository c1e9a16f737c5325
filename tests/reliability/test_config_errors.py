"""Config and data mistakes end in one line naming the key or file:line, exit code 2, before the model loads.

Most scenarios run ``drpo_lightning.cli.main`` in-process (cheap) with the policy loader replaced by a trap;
two run ``python -m drpo_lightning.cli`` in a real process to check what a user's terminal shows.
"""

from __future__ import annotations

import pytest
import yaml
from rel_helpers import QUICKSTART, assert_one_line_error, error_lines, run_drpo, tiny_fit_args

from drpo_lightning.cli import main
from drpo_lightning.data import DataError


@pytest.fixture(autouse=True)
def model_must_not_load(monkeypatch):
    """Every scenario here must fail before any policy weights are read."""

    def trap(*args, **kwargs):
        pytest.fail("the policy was loaded before the config/data error was reported")

    monkeypatch.setattr("drpo_lightning.models.load_policy", trap)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_data")
    good = '{"prompt": "1+1=", "answer": "2"}\n'
    (d / "malformed.jsonl").write_text(good + '{"prompt": "2+2=", "answer": 4\n' + good)
    (d / "no_prompt.jsonl").write_text('{"question": "1+1=", "answer": "2"}\n')
    (d / "number_prompt.jsonl").write_text(good + '{"prompt": 12, "answer": "2"}\n')
    (d / "empty.jsonl").write_text("\n  \n")
    (d / "latin1.jsonl").write_bytes(good.encode() + '{"prompt": "café", "answer": "2"}\n'.encode("latin-1"))
    (d / "one_row.jsonl").write_text(good)
    (d / "wrong_type.yaml").write_text(yaml.safe_dump({"data": {"batch_size": "many"}}))
    (d / "null_numbers.yaml").write_text("data:\n  batch_size: null\n")
    (d / "null_model_number.yaml").write_text("model:\n  num_generations: null\n")
    (d / "broken.yaml").write_text("model:\n  rewards: [exact_match\n")
    (d / "trainer_null.yaml").write_text("trainer: null\n")
    return d


# (id, extra CLI arguments with {d} = the folder of bad files, fragments the one error line must hold)
SCENARIOS = [
    ("unknown-objective", ["--model.objective=drpoo"],
     ["model.objective: unknown objective 'drpoo'; available: ", "drpo (drpo-lightning"]),
    ("unknown-reward", ["--model.rewards=[exact_matsh]"], ["model.rewards: unknown reward 'exact_matsh'"]),
    ("unknown-advantage", ["--model.advantage=grpoo"], ["model.advantage: unknown advantage 'grpoo'"]),
    ("unknown-rollout", ["--model.rollout=vlm"], ["model.rollout: unknown rollout 'vlm'; available: hf"]),
    ("unknown-plugin-option", ["--model.objective.init_args.deltaa=1"], ["model.objective:", "'deltaa'"]),
    ("wrong-type-cli", ["--model.num_generations=eight"], ["model.num_generations:", "eight"]),
    ("wrong-type-yaml", ["--config", "{d}/wrong_type.yaml"], ["data.batch_size:", "many"]),
    ("bad-value", ["--model.kl_beta=-1"], ["model.kl_beta must be >= 0, got -1.0"]),
    ("bad-plugin-value", ["--model.objective.init_args.delta=-1"], ["DRPO: delta must be > 0"]),
    ("missing-model-folder", ["--model.model_name_or_path={d}/no_such_model"],
     ["model.model_name_or_path: ", "no_such_model", "is not a local folder"]),
    ("minibatch-split", ["--model.num_minibatches=3"],
     ["data.batch_size * model.num_generations = 2 * 2 = 4", "model.num_minibatches = 3"]),
    ("micro-batch-split", ["--model.micro_batch_size=3"], ["model.micro_batch_size = 3"]),
    ("path-and-task", ["--data.path={d}/one_row.jsonl"], ["set exactly one of data.path", "data.task"]),
    ("missing-file", ["--data.task=null", "--data.path={d}/nope.jsonl"], ["data.path: file not found: ", "nope.jsonl"]),
    ("malformed-jsonl", ["--data.task=null", "--data.path={d}/malformed.jsonl"],
     ["malformed.jsonl:2: invalid JSON: Expecting ',' delimiter (column 31)"]),
    ("malformed-val-file", ["--data.val_path={d}/malformed.jsonl"], ["malformed.jsonl:2: invalid JSON"]),
    ("missing-column", ["--data.task=null", "--data.path={d}/no_prompt.jsonl"],
     ["no_prompt.jsonl:1: no 'prompt' column (data.prompt_column); available columns: ['question', 'answer']"]),
    ("wrong-column-type", ["--data.task=null", "--data.path={d}/number_prompt.jsonl"],
     ["number_prompt.jsonl:2: 'prompt' must be a string, got int"]),
    ("empty-dataset", ["--data.task=null", "--data.path={d}/empty.jsonl"], ["data.path: no rows in ", "empty.jsonl"]),
    ("fewer-prompts-than-batch", ["--data.task=null", "--data.path={d}/one_row.jsonl", "--data.val_fraction=0"],
     ["only 1 training prompts, fewer than data.batch_size=2"]),
    ("non-utf8", ["--data.task=null", "--data.path={d}/latin1.jsonl"], ["latin1.jsonl:2: not valid UTF-8"]),
    ("unknown-key", ["--model.num_generatoins=2"], ["unrecognized arguments: --model.num_generatoins=2"]),
    ("missing-config-file", ["--config", "{d}/nope.yaml"], ["config: ", "File does not exist", "nope.yaml"]),
    ("yaml-syntax-error", ["--config", "{d}/broken.yaml"],
     ["--config ", "broken.yaml: YAML syntax error at line 3, column 1: expected ',' or ']'",
      "flow sequence started at line 2, column 12"]),
    ("yaml-syntax-error-short-flag", ["-c{d}/broken.yaml"],
     ["--config ", "broken.yaml: YAML syntax error at line 3, column 1"]),
    ("null-number-yaml", ["--config", "{d}/null_numbers.yaml"], ["data.batch_size must be a number, got null"]),
    ("null-model-number-yaml", ["--config", "{d}/null_model_number.yaml"], ["model.num_generations must be >= 1, got None"]),
    ("zero-batch", ["--data.batch_size=0"], ["data.batch_size must be >= 1, got 0"]),
    ("zero-group", ["--model.num_generations=0"], ["model.num_generations must be >= 1, got 0"]),
    ("bad-reward-timeout", ["--model.reward_timeout=0"], ["model.reward_timeout must be > 0 seconds or null, got 0.0"]),
    ("empty-model-path", ["--model.model_name_or_path="], ["model.model_name_or_path: ", "is not a local folder"]),
    ("model-folder-without-config", ["--model.model_name_or_path={d}"], ["model.model_name_or_path: ",
                                                                         "holds no config.json"]),
]


@pytest.mark.parametrize(("extra", "fragments"), [pytest.param(e, f, id=i) for i, e, f in SCENARIOS])
def test_config_and_data_errors_are_one_line_before_the_model_loads(extra, fragments, bad_files, tmp_path, capsys):
    args = tiny_fit_args(tmp_path, *(a.format(d=bad_files) for a in extra))
    code = main(args)
    assert_one_line_error(code, capsys.readouterr().err, *fragments)


def test_debug_flag_reraises_the_original_exception(bad_files, tmp_path):
    with pytest.raises(DataError, match=r"malformed\.jsonl:2: invalid JSON"):
        main(tiny_fit_args(tmp_path, "--data.task=null", f"--data.path={bad_files}/malformed.jsonl", "--debug"))


def test_malformed_jsonl_in_a_real_process(bad_files):
    # What the terminal shows: exit code 2, one line naming file:line, no traceback; --debug shows it.
    args = ["fit", "--config", str(QUICKSTART), "--data.task=null", f"--data.path={bad_files}/malformed.jsonl"]
    proc = run_drpo(args)
    line = assert_one_line_error(proc.returncode, proc.stderr, "malformed.jsonl:2: invalid JSON")
    assert line.startswith(f"drpo: error: {bad_files}/malformed.jsonl:2: ")
    assert "--debug" in proc.stderr  # the hint


def test_debug_shows_the_traceback_in_a_real_process(bad_files):
    args = ["fit", "--config", str(QUICKSTART), "--data.task=null", f"--data.path={bad_files}/latin1.jsonl", "--debug"]
    proc = run_drpo(args)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "DataError" in proc.stderr and "latin1.jsonl:2: not valid UTF-8" in proc.stderr
    assert not error_lines(proc.stderr)


# Mistakes in the trainer section and top-level keys, which Lightning itself rejects only when it builds the
# Trainer (ValueError, MisconfigurationException) or seeds the run: one line naming the key.
TRAINER_SCENARIOS = [
    ("accelerator-typo", ["--trainer.accelerator=gpuu"],
     ["trainer.accelerator: You selected an invalid accelerator name: `accelerator='gpuu'`"]),
    ("devices-zero", ["--trainer.devices=0"], ["trainer.devices: `Trainer(devices='0')` value is not a valid input"]),
    ("strategy-typo", ["--trainer.strategy=ddpp"],
     ["trainer.strategy: You selected an invalid strategy name: `strategy='ddpp'`"]),
    ("seed-out-of-range", ["--seed_everything=-1"], ["seed_everything: -1 is not in bounds"]),
    ("trainer-null", ["--config", "{d}/trainer_null.yaml"], ["trainer: is null; give a mapping of Trainer arguments"]),
]


@pytest.mark.parametrize(("extra", "fragments"), [pytest.param(e, f, id=i) for i, e, f in TRAINER_SCENARIOS])
def test_trainer_and_seed_errors_are_one_line_naming_the_key(extra, fragments, bad_files, tmp_path, capsys):
    code = main(tiny_fit_args(tmp_path, *(a.format(d=bad_files) for a in extra)))
    assert_one_line_error(code, capsys.readouterr().err, *fragments)
