"""The drpo-reasoning-gym plugin: task rows, the reward on right and wrong answers, registration, conformance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from drpo_reasoning_gym import ReasoningGymReward, ReasoningGymTask

from drpo_lightning.data import PromptDataModule
from drpo_lightning.registry import REWARDS, TASKS
from drpo_lightning.tasks import TaskError, build_task
from drpo_lightning.testing import check_reward


def rows(task: str, n: int = 4, seed: int = 3) -> list[dict]:
    train, _ = build_task(f"reasoning_gym:{task}", train_size=n, val_size=0, seed=seed)
    return train


def columns(batch: list[dict]) -> dict[str, list]:
    """The reward's keyword arguments for these rows, as the trainer builds them: ``prompts`` + columns."""
    cols = {key: [r[key] for r in batch] for key in batch[0]}
    return {"prompts": cols.pop("prompt"), **cols}


# ------------------------------------------------------------------------------------------------- the task


def test_task_rows_through_the_datamodule():
    dm = PromptDataModule(task="reasoning_gym:chain_sum", task_size=40, val_size=10, batch_size=4, seed=5)
    dm.setup("fit")
    assert len(dm.train_dataset) == 40 and len(dm.val_dataset) == 10
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"prompt", "answer", "metadata", "task"} and batch["task"] == ["chain_sum"] * 4
    train_prompts = {dm.train_dataset[i]["prompt"] for i in range(len(dm.train_dataset))}
    val_prompts = {dm.val_dataset[i]["prompt"] for i in range(len(dm.val_dataset))}
    assert not train_prompts & val_prompts and len(val_prompts) == 10
    row = dm.val_dataset[0]
    assert json.loads(row["metadata"])["source_dataset"] == "chain_sum"
    assert int(row["answer"]) == eval(json.loads(row["metadata"])["expression"])  # noqa: S307 - digits and +-


def test_task_is_deterministic_and_takes_dataset_options():
    first = build_task("reasoning_gym:basic_arithmetic", train_size=8, val_size=4, seed=1)
    assert build_task("reasoning_gym:basic_arithmetic", train_size=8, val_size=4, seed=1) == first
    assert build_task("reasoning_gym:basic_arithmetic", train_size=8, val_size=4, seed=2)[0] != first[0]
    train, _ = build_task("reasoning_gym:chain_sum", train_size=6, val_size=0, min_terms=5, max_terms=5)
    assert all(json.loads(r["metadata"])["num_terms"] == 5 for r in train)
    assert ReasoningGymTask("chain_sum").build(3, 2, seed=0) == build_task(
        "reasoning_gym:chain_sum", train_size=3, val_size=2, seed=0
    )


def test_task_errors_are_one_line_and_name_the_key():
    with pytest.raises(
        TaskError, match="unknown reasoning_gym dataset 'no_such_task'; available: .*chain_sum"
    ):
        build_task("reasoning_gym:no_such_task", train_size=2, val_size=1)
    with pytest.raises(TaskError, match=r"data\.task_kwargs: reasoning_gym:chain_sum rejected its options"):
        build_task("reasoning_gym:chain_sum", train_size=2, val_size=1, bogus_option=1)
    with pytest.raises(TaskError, match="cannot be built from its options.*dataset"):
        build_task("reasoning_gym", train_size=2, val_size=1)


# ----------------------------------------------------------------------------------------------- the reward


@pytest.mark.parametrize("task", ["chain_sum", "basic_arithmetic"])
def test_reward_right_and_wrong_answers(task):
    batch = rows(task)
    cols = columns(batch)
    reward = ReasoningGymReward()
    right = [r["answer"] for r in batch]
    wrong = [str(int(r["answer"]) + 1) for r in batch]
    assert reward(completions=right, **cols) == [1.0] * len(batch)
    assert reward(completions=wrong, **cols) == [0.0] * len(batch)
    assert reward(completions=["not a number"] * len(batch), **cols) == [0.0] * len(batch)
    # the scorer works from task + metadata (+ answer): a dict metadata works as well as the JSON string
    cols_dicts = {**cols, "metadata": [json.loads(m) for m in cols["metadata"]]}
    assert reward(completions=right, **cols_dicts) == [1.0] * len(batch)


def test_answer_extraction_modes():
    batch = rows("chain_sum", n=2)
    cols = columns(batch)
    a, b = (r["answer"] for r in batch)
    tagged = ReasoningGymReward(extract="answer_tag")
    assert tagged(completions=[f"<answer>0</answer> then <answer> {a} </answer>", f"just {b}"], **cols) == [
        1.0,
        0.0,
    ]
    last_line = ReasoningGymReward(extract="last_line")
    assert last_line(completions=[f"let me think\n1+1\n{a}\n\n", f"{b}\nno"], **cols) == [1.0, 0.0]
    regex = ReasoningGymReward(extract="regex", pattern=r"answer is (-?\d+)")
    assert regex(completions=[f"the answer is {a}.", f"the answer: {b}"], **cols) == [1.0, 0.0]
    full = ReasoningGymReward()(completions=[f"  {a}\n", f"{b} apples"], **cols)
    assert full[0] == 1.0 and full[1] < 1.0  # chain_sum's scorer gives partial credit to "<answer> apples"


def test_reward_options_and_missing_columns():
    with pytest.raises(ValueError, match="extract must be one of"):
        ReasoningGymReward(extract="first_word")
    with pytest.raises(ValueError, match="pattern is required"):
        ReasoningGymReward(extract="regex")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        ReasoningGymReward(extract="regex", pattern="(")
    batch = rows("chain_sum", n=2)
    cols = columns(batch)
    with pytest.raises(KeyError, match="needs dataset column 'metadata'.*available columns: answer, task"):
        ReasoningGymReward()(completions=["1", "2"], **{k: v for k, v in cols.items() if k != "metadata"})
    without_task = {k: v for k, v in cols.items() if k != "task"}
    assert ReasoningGymReward(task="chain_sum")(completions=[r["answer"] for r in batch], **without_task) == [
        1.0,
        1.0,
    ]


def test_reward_conformance_kit():
    batch = rows("basic_arithmetic", n=3) + rows("chain_sum", n=3)  # one batch may mix datasets
    cols = columns(batch)
    completions = [batch[0]["answer"], "wrong", "", batch[3]["answer"], "7 8 9", "<answer>1</answer>"]
    scores = check_reward(ReasoningGymReward(), completions=completions, **cols)
    assert scores[0] == 1.0 and scores[3] == 1.0 and scores[1] == 0.0


# -------------------------------------------------------------------------------------------- registration


def test_entry_points_are_visible_in_the_registries():
    assert TASKS.get("reasoning_gym") is ReasoningGymTask
    assert REWARDS.get("reasoning_gym") is ReasoningGymReward
    for registry in (TASKS, REWARDS):
        info = registry.available()["reasoning_gym"]
        assert info.package == "drpo-reasoning-gym", info
    assert "arithmetic" in TASKS  # the core's own task is still there


def _config() -> Path:
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "configs" / "reasoning_gym.yaml"
        if candidate.is_file():
            return candidate
    pytest.skip("configs/reasoning_gym.yaml of drpo-lightning not found")


def test_example_config_parses(capsys):
    from drpo_lightning.cli import main

    assert main(["fit", "--config", str(_config()), "--print_config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["task"] == "reasoning_gym:chain_sum"
    assert [r["class_path"] for r in config["model"]["rewards"]] == [
        "drpo_reasoning_gym.reward.ReasoningGymReward"
    ]
