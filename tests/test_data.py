"""Prompt data: file formats, held-out splits, built-in tasks, one-line errors, collation, chat templates."""

from __future__ import annotations

import json
import re
from unittest import mock

import pytest
import torch

from drpo_lightning.data import (
    DataError,
    EpochShuffleSampler,
    PromptDataModule,
    collate_prompts,
    format_prompts,
    split_train_val,
)
from drpo_lightning.errors import UserError
from drpo_lightning.registry import Registry
from drpo_lightning.tasks import (
    TASKS,
    ArithmeticTask,
    MissingDependencyError,
    Task,
    TaskError,
    arithmetic,
    build_task,
)
from drpo_lightning.tiny import is_heldout

# ------------------------------------------------------------------------------------------------ helpers


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"{i}+{i}=", "answer": str(2 * i), "level": i % 3} for i in range(start, start + n)]


def write_jsonl(path, items) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return str(path)


def setup_dm(**kwargs) -> PromptDataModule:
    kwargs.setdefault("batch_size", 2)
    dm = PromptDataModule(**kwargs)
    dm.setup("fit")
    return dm


def prompts(dataset) -> list[str]:
    return [item["prompt"] for item in dataset.items]


def setup_error(**kwargs) -> str:
    with pytest.raises(DataError) as info:
        setup_dm(**kwargs)
    message = str(info.value)
    assert "\n" not in message, "data errors are one line"
    return message


# -------------------------------------------------------------------------------------------------- formats


def test_jsonl_items_and_collate(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", rows(20))
    dm = setup_dm(path=path, val_fraction=0.0, batch_size=4, shuffle=False)
    assert len(dm.train_dataset) == 20 and len(dm.val_dataset) == 0
    assert dm.train_dataset[3] == {"prompt": "3+3=", "answer": "6", "level": 0}
    assert dm.columns == ["prompt", "answer", "level"]
    batch = next(iter(dm.train_dataloader()))
    assert batch == {
        "prompt": ["0+0=", "1+1=", "2+2=", "3+3="],
        "answer": ["0", "2", "4", "6"],
        "level": [0, 1, 2, 0],
    }
    assert dm.val_dataloader() == [] and dm.test_dataloader() == []


def test_jsonl_blank_lines_bom_and_json_array(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a"}\n\n  \n{"prompt": "b"}\n')
    assert prompts(setup_dm(path=str(path), val_fraction=0).train_dataset) == ["a", "b"]
    array = tmp_path / "p.json"
    array.write_text(json.dumps(rows(5)), encoding="utf-8")
    assert len(setup_dm(path=str(array), val_fraction=0).train_dataset) == 5
    lines_as_json = tmp_path / "lines.json"
    write_jsonl(lines_as_json, rows(3))
    assert len(setup_dm(path=str(lines_as_json), val_fraction=0).train_dataset) == 3


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows(10)), path)
    dm = setup_dm(path=str(path), val_fraction=0.2)
    assert len(dm.train_dataset) == 8 and len(dm.val_dataset) == 2
    assert set(dm.columns) == {"prompt", "answer", "level"}


def test_hf_dataset_on_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_list(rows(10)).save_to_disk(str(single))
    dm = setup_dm(path=str(single), val_fraction=0.0)
    assert prompts(dm.train_dataset) == [r["prompt"] for r in rows(10)]

    # A DatasetDict: train split for training, its validation split as the held-out set.
    both = tmp_path / "dict"
    question_rows = [{"question": r["prompt"], "answer": r["answer"]} for r in rows(12)]
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(question_rows[:8]),
            "validation": datasets.Dataset.from_list(question_rows[8:]),
        }
    ).save_to_disk(str(both))
    dm = setup_dm(path=str(both), prompt_column="question")
    assert len(dm.train_dataset) == 8 and prompts(dm.val_dataset) == ["8+8=", "9+9=", "10+10=", "11+11="]
    assert dm.train_dataset[0] == {"prompt": "0+0=", "answer": "0"}  # renamed to "prompt"
    # As a val_path, a DatasetDict gives its validation split.
    dm = setup_dm(path=str(both), val_path=str(both), prompt_column="question", max_prompts=2)
    assert len(dm.train_dataset) == 2 and len(dm.val_dataset) == 4


def test_folder_of_shards_and_val_path(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "a.jsonl", rows(3))
    write_jsonl(shards / "b.jsonl", rows(3, start=3))
    val = write_jsonl(tmp_path / "val.jsonl", rows(2, start=100))
    dm = setup_dm(path=str(shards), val_path=val)
    assert len(dm.train_dataset) == 6
    assert prompts(dm.val_dataset) == ["100+100=", "101+101="]
    # Row locations inside shards name the shard file and its line.
    (shards / "b.jsonl").write_text('{"prompt": "x"}\n{"nope": 1}\n', encoding="utf-8")
    message = setup_error(path=str(shards))
    assert f"{shards / 'b.jsonl'}:2" in message


def test_rows_are_checked_for_the_columns_the_attached_modules_rewards_read(tmp_path):
    from types import SimpleNamespace

    from drpo_lightning.rewards.exact_match import ExactMatch
    from drpo_lightning.rewards.format import FormatReward

    items = rows(10)
    items[7] = {"prompt": "7+7=", "solution": "14"}
    path = write_jsonl(tmp_path / "p.jsonl", items)
    dm = PromptDataModule(path=path, batch_size=2)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(rewards=[FormatReward(), ExactMatch()]))
    with pytest.raises(DataError, match=re.escape(f"{path}:8: no 'answer' column, which reward 'exact_match' reads; "
                                                  "columns of this row: ['prompt', 'solution']")):
        dm.setup("fit")
    # without a reward that reads it, the column is not needed
    dm = PromptDataModule(path=path, batch_size=2)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(rewards=[FormatReward()]))
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 10


def test_shards_must_share_columns_but_rows_may_leave_optional_ones_out(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "a.jsonl", [{"prompt": "1", "meta": 1}, {"prompt": "2"}])
    write_jsonl(shards / "b.jsonl", [{"prompt": "3"}, {"prompt": "4", "meta": 2}])
    assert len(setup_dm(path=str(shards), val_fraction=0).train_dataset) == 4
    write_jsonl(shards / "c.jsonl", [{"prompt": "5"}, {"prompt": "6"}])
    message = setup_error(path=str(shards))
    assert message.startswith(f"{shards / 'c.jsonl'}:1: the shards of {shards} have different columns: c.jsonl has "
                              "['prompt'], a.jsonl has ['meta', 'prompt'] (no 'meta')")


def test_columns_named_like_the_reward_arguments_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", rows(3) + [{"prompt": "x", "completions": ["y"]}])
    assert setup_error(path=path).startswith(f"{path}:4: column 'completions' clashes with the 'completions' argument")
    # ... unless it is the prompt column itself, which reaches the rewards as `prompts`
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompts": f"{i}+1="} for i in range(4)])
    assert prompts(setup_dm(path=path, prompt_column="prompts", val_fraction=0).train_dataset)[0] == "0+1="


def test_prompt_lengths_are_checked_with_file_lines_through_the_split(tmp_path):
    items = rows(40)
    items[5]["prompt"] = "x" * 50
    items[31]["prompt"] = "y" * 60
    path = write_jsonl(tmp_path / "p.jsonl", items)
    dm = setup_dm(path=path, val_fraction=0.5, seed=1)
    # training prompts are checked first, then held-out ones; either is named by its own line in the file
    lines = {"x" * 50: 6, "y" * 60: 32}
    first = next(p for p in prompts(dm.train_dataset) + prompts(dm.val_dataset) if p in lines)
    assert prompts(dm.train_dataset)[0] != items[0]["prompt"] or prompts(dm.val_dataset), "the split moved rows"
    with pytest.raises(DataError, match=re.escape(f"{path}:{lines[first]}: the prompt is {len(first)} tokens long")):
        dm.check_prompt_lengths(lambda ps: [len(p) for p in ps], limit=49, batch=3)
    dm.check_prompt_lengths(lambda ps: [len(p) for p in ps], limit=60)


def test_max_prompts(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", rows(50))
    dm = setup_dm(path=path, val_fraction=0.1, max_prompts=7)
    assert len(dm.train_dataset) == 7 and len(dm.val_dataset) == 5


# ------------------------------------------------------------------------------------------- held-out split


def test_val_split_deterministic_and_disjoint(tmp_path):
    items = rows(200) + rows(20)  # 20 duplicated prompts
    path = write_jsonl(tmp_path / "p.jsonl", items)
    a = setup_dm(path=path, val_fraction=0.1, seed=3)
    b = setup_dm(path=path, val_fraction=0.1, seed=3)
    c = setup_dm(path=path, val_fraction=0.1, seed=4)
    assert prompts(a.val_dataset) == prompts(b.val_dataset)
    assert prompts(a.train_dataset) == prompts(b.train_dataset)
    assert prompts(a.val_dataset) != prompts(c.val_dataset)
    for dm in (a, c):
        train, val = set(prompts(dm.train_dataset)), set(prompts(dm.val_dataset))
        assert not train & val  # duplicates never straddle the split
        assert len(dm.train_dataset) + len(dm.val_dataset) == len(items)
        assert 22 <= len(dm.val_dataset) <= 23  # round(220 * 0.1), plus at most one duplicate


def test_split_edge_cases():
    items = [{"prompt": p} for p in "abcdefghij"]
    assert split_train_val(items, 0.0, 0) == (items, [])
    train, val = split_train_val(items, 0.01, 0)  # at least one held out when val_fraction > 0
    assert len(val) == 1 and len(train) == 9
    same = [{"prompt": "x"}] * 5  # one distinct prompt: it cannot be split, training keeps it
    assert split_train_val(same, 0.5, 0) == (same, [])


# ------------------------------------------------------------------------------------------------ shuffling


def test_training_order_deterministic_per_epoch_and_full_batches(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", rows(30))
    dm = setup_dm(path=path, val_fraction=0, batch_size=4, seed=1)
    loader = dm.train_dataloader()
    assert loader.drop_last and len(loader) == 7
    first = [b["prompt"] for b in loader]
    assert all(len(p) == 4 for p in first)
    again = [
        b["prompt"] for b in setup_dm(path=path, val_fraction=0, batch_size=4, seed=1).train_dataloader()
    ]
    assert first == again
    loader.sampler.set_epoch(1)
    assert [b["prompt"] for b in loader] != first
    loader.sampler.set_epoch(0)
    assert [b["prompt"] for b in loader] == first
    other_seed = setup_dm(path=path, val_fraction=0, batch_size=4, seed=2).train_dataloader()
    assert [b["prompt"] for b in other_seed] != first
    assert list(EpochShuffleSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]
    assert sorted(EpochShuffleSampler(50, seed=9)) == list(range(50))


def test_collate_ragged_columns():
    batch = collate_prompts([{"prompt": "a", "answer": "1"}, {"prompt": "b", "extra": [1, 2]}])
    assert batch == {"prompt": ["a", "b"], "answer": ["1", None], "extra": [None, [1, 2]]}


def test_lightning_fit_consumes_batches(tmp_path):
    import lightning.pytorch as pl

    seen = []

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            seen.append(batch)

        def validation_step(self, batch, batch_idx):
            raise AssertionError("no held-out prompts: validation must be skipped")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    path = write_jsonl(tmp_path / "p.jsonl", rows(12))
    dm = PromptDataModule(path=path, val_fraction=0.0, batch_size=4)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(Recorder(), datamodule=dm)
    assert len(seen) == 6 and all(len(b["prompt"]) == 4 and len(b["answer"]) == 4 for b in seen)
    epoch0 = [p for b in seen[:3] for p in b["prompt"]]
    epoch1 = [p for b in seen[3:] for p in b["prompt"]]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # Lightning advanced the sampler's epoch


# ---------------------------------------------------------------------------------------------------- tasks


def test_arithmetic_correct_deterministic_disjoint():
    train, val = arithmetic(3000, 200, seed=0)
    assert len(train) == 3000 and len(val) == 200
    for r in train + val:
        a, b = map(int, re.fullmatch(r"(\d+)\+(\d+)=", r["prompt"]).groups())
        assert 0 <= a < 100 and 0 <= b < 100 and r["answer"] == str(a + b)
        assert is_heldout(a, b) == (r in val)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    assert len({r["prompt"] for r in val}) == 200  # validation problems are distinct
    assert arithmetic(3000, 200, seed=0) == (train, val)
    assert arithmetic(3000, 200, seed=1)[0] != train


def test_arithmetic_operations_and_large_space():
    train, val = arithmetic(600, 50, seed=0, max_operand=20, operations=["+", "-", "*"])
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    seen_ops = set()
    for r in train + val:
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=", r["prompt"]).groups()
        seen_ops.add(op)
        assert r["answer"] == str(ops[op](int(a), int(b)))
    assert seen_ops == {"+", "-", "*"}
    big_train, big_val = arithmetic(200, 20, seed=0, max_operand=10**6, operations="+*")
    assert len(big_train) == 200 and len(big_val) == 20
    assert not {r["prompt"] for r in big_train} & {r["prompt"] for r in big_val}
    with pytest.warns(UserWarning, match="held-out problems"):
        _, small_val = arithmetic(10, 500, seed=0, max_operand=10)
    assert 0 < len(small_val) < 500


def test_task_datamodule_and_registry_errors():
    dm = setup_dm(task="arithmetic", task_size=64, val_size=16, batch_size=8)
    assert len(dm.train_dataset) == 64 and len(dm.val_dataset) == 16
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"prompt", "answer"} and len(batch["prompt"]) == 8
    assert len(next(iter(dm.val_dataloader()))["prompt"]) == 16
    assert "arithmetic" in TASKS and TASKS.get("arithmetic") is ArithmeticTask
    assert TASKS.available()["arithmetic"].package == "drpo-lightning"  # declared as an entry point
    with pytest.raises(
        TaskError, match=r"data\.task: unknown task 'nope'; available: .*arithmetic \(drpo-lightning"
    ):
        build_task("nope", train_size=1, val_size=1)
    with pytest.raises(TaskError, match="task 'arithmetic' takes no ':<arg>' part"):
        build_task("arithmetic:x", train_size=1, val_size=1)
    with pytest.raises(
        TaskError, match=r"no option\(s\) \['bogus'\]; accepted: \['max_operand', 'operations'\]"
    ):
        build_task("arithmetic", train_size=1, val_size=1, bogus=1)
    with pytest.raises(TaskError, match="unsupported operation"):
        build_task("arithmetic", train_size=1, val_size=1, operations=["/"])
    with pytest.raises(TaskError, match="max_operand must be an integer >= 1"):
        build_task("arithmetic", train_size=1, val_size=1, max_operand=0)
    assert issubclass(TaskError, UserError)
    expected = arithmetic(50, 10, seed=3, max_operand=30, operations="+-")
    assert ArithmeticTask(max_operand=30, operations="+-").build(50, 10, seed=3) == expected
    assert build_task("arithmetic", train_size=50, val_size=10, seed=3, max_operand=30, operations="+-") == expected


class EchoTask(Task):
    """A third-party-style task: ``name:arg`` passes ``arg`` as the first constructor argument."""

    def __init__(self, word: str, repeat: int = 1) -> None:
        self.word, self.repeat = word, repeat

    def build(self, train_size, val_size, seed=0):
        rows = [{"prompt": f"{self.word * self.repeat} {i}", "answer": str(i)} for i in range(train_size + val_size)]
        return rows[:train_size], rows[train_size:]


@pytest.fixture
def echo_task():
    TASKS.register("echo", EchoTask)
    yield
    TASKS.unregister("echo")


def test_registered_task_with_arg_part(echo_task):
    train, val = build_task("echo:ab", train_size=3, val_size=2, repeat=2)
    assert [r["prompt"] for r in train] == ["abab 0", "abab 1", "abab 2"] and len(val) == 2
    dm = setup_dm(task="echo:x", task_size=4, val_size=2, batch_size=2)
    assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 2
    with pytest.raises(TaskError, match="given twice"):
        build_task("echo:ab", train_size=1, val_size=1, word="cd")
    with pytest.raises(TaskError, match="'echo' cannot be built from its options.*word"):
        build_task("echo", train_size=1, val_size=1)
    with pytest.raises(TaskError, match="nothing after the ':' in 'echo:'"):
        build_task("echo:", train_size=1, val_size=1)


def test_missing_reasoning_gym_plugin_says_what_to_install(monkeypatch):
    only_builtins = Registry("tasks", "drpo_lightning.tasks:Task")
    with mock.patch("drpo_lightning.registry.entry_points", return_value=[]):
        only_builtins.load()  # as if drpo-reasoning-gym were not installed
    only_builtins.register("arithmetic", ArithmeticTask, package="drpo-lightning")
    monkeypatch.setattr("drpo_lightning.tasks.TASKS", only_builtins)
    with pytest.raises(ImportError, match=r"pip install \./plugins/drpo-reasoning-gym") as info:
        build_task("reasoning_gym:chain_sum", train_size=2, val_size=1)
    assert isinstance(info.value, MissingDependencyError) and isinstance(info.value, TaskError)
    assert "drpo-reasoning-gym" in str(info.value) and "\n" not in str(info.value)
    assert "available: arithmetic" in str(info.value)


# --------------------------------------------------------------------------------------------------- errors


def test_construction_errors():
    with pytest.raises(DataError, match=r"data\.path.*data\.task"):
        PromptDataModule()
    with pytest.raises(DataError, match=r"data\.path.*data\.task"):
        PromptDataModule(path="x.jsonl", task="arithmetic")
    for value in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"data\.val_fraction must be in \[0, 1\)"):
            PromptDataModule(path="x.jsonl", val_fraction=value)
    with pytest.raises(DataError, match=r"data\.batch_size must be >= 1, got 0"):
        PromptDataModule(path="x.jsonl", batch_size=0)
    with pytest.raises(DataError, match=r"data\.val_batch_size"):
        PromptDataModule(path="x.jsonl", val_batch_size=0)
    with pytest.raises(DataError, match=r"data\.max_prompts"):
        PromptDataModule(path="x.jsonl", max_prompts=0)
    assert issubclass(DataError, ValueError) and issubclass(DataError, UserError)


def test_missing_files(tmp_path):
    missing = tmp_path / "nope.jsonl"
    message = setup_error(path=str(missing))
    assert "data.path" in message and str(missing) in message
    ok = write_jsonl(tmp_path / "ok.jsonl", rows(4))
    message = setup_error(path=ok, val_path=str(tmp_path / "val.jsonl"))
    assert "data.val_path" in message and "val.jsonl" in message


def test_malformed_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",}\n', encoding="utf-8")
    message = setup_error(path=str(path))
    assert f"{path}:3" in message and "invalid JSON" in message and "Expecting property name" in message
    array = tmp_path / "bad.json"
    array.write_text('[\n{"prompt": "a"},\n{"prompt": }\n]', encoding="utf-8")
    assert f"{array}:3" in setup_error(path=str(array))
    scalar = tmp_path / "scalar.json"
    scalar.write_text("42", encoding="utf-8")
    assert "expected a JSON array" in setup_error(path=str(scalar))


def test_non_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    message = setup_error(path=str(path))
    assert f"{path}:2" in message and "UTF-8" in message and "byte 32" in message
    whole = tmp_path / "latin1.json"
    whole.write_bytes(b'[{"prompt": "ok"},\n{"prompt": "caf\xe9"}]')
    assert f"{whole}:2" in setup_error(path=str(whole))


def test_missing_prompt_column(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"question": "b", "answer": "1"}])
    message = setup_error(path=path)
    assert f"{path}:2" in message and "'prompt'" in message and "['question', 'answer']" in message
    message = setup_error(path=path, prompt_column="question")
    assert f"{path}:1" in message and "'question'" in message and "data.prompt_column" in message


def test_missing_prompt_column_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": "b"}]), path)
    message = setup_error(path=str(path))
    assert f"{path} row 0" in message and "'prompt'" in message and "['text']" in message


def test_bad_prompts(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": 7}])
    message = setup_error(path=path)
    assert f"{path}:3" in message and "must be a string" in message and "int" in message
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a"}, {"prompt": "  "}])
    message = setup_error(path=path)
    assert f"{path}:2" in message and "empty" in message
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "a"}, ["not", "an", "object"]])
    assert f"{path}:2" in setup_error(path=path)


def test_empty_and_too_small(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    message = setup_error(path=str(empty))
    assert "data.path" in message and str(empty) in message and "no rows" in message
    small = write_jsonl(tmp_path / "small.jsonl", rows(3))
    message = setup_error(path=small, batch_size=4, val_fraction=0)
    assert "only 3 training prompts" in message and "data.batch_size=4" in message
    odd = tmp_path / "p.csv"
    odd.write_text("prompt\na\n", encoding="utf-8")
    assert "unsupported file type" in setup_error(path=str(odd))


# ---------------------------------------------------------------------------------------------- chat format


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")), unk_token="[UNK]"
    )


TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_format_prompts(tiny_tokenizer):
    tok = tiny_tokenizer
    tok.chat_template = None
    assert format_prompts(tok, ["1+1="], None) == ["1+1="]
    assert format_prompts(tok, ["1+1="], False, system_prompt="Add.") == ["Add.\n\n1+1="]
    with pytest.raises(DataError, match=r"data\.chat_template"):
        format_prompts(tok, ["1+1="], True)
    tok.chat_template = TEMPLATE
    assert format_prompts(tok, ["1+1=", "2+2="], None) == [
        "<|user|>1+1=\n<|assistant|>",
        "<|user|>2+2=\n<|assistant|>",
    ]
    assert format_prompts(tok, ["1+1="], True, system_prompt="Add.") == [
        "<|system|>Add.\n<|user|>1+1=\n<|assistant|>"
    ]
    assert format_prompts(tok, ["1+1="], False) == ["1+1="]


def test_docstring_documents_every_argument():
    import inspect

    doc = PromptDataModule.__doc__
    for name in inspect.signature(PromptDataModule.__init__).parameters:
        if name != "self":
            assert f"\n        {name}: " in doc, name
