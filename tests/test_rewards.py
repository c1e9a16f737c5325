"""Reward plugins and the reward-combination policy."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from drpo_lightning.registry import REWARDS
from drpo_lightning.rewards.base import RewardFunction
from drpo_lightning.rewards.combine import (
    RewardError,
    RewardResult,
    call_with_timeout,
    compute_rewards,
    function_names,
)
from drpo_lightning.rewards.exact_match import ExactMatch, find_numbers
from drpo_lightning.rewards.format import FormatReward
from drpo_lightning.rewards.math_verify import MathVerify
from drpo_lightning.rewards.reward_model import RewardModel


def test_registered_by_entry_points():
    expected = {
        "exact_match": ExactMatch,
        "format": FormatReward,
        "math_verify": MathVerify,
        "reward_model": RewardModel,
    }
    for name, cls in expected.items():
        assert REWARDS.get(name) is cls
    assert ExactMatch().name == "exact_match"
    assert FormatReward().name == "format"


# -- ExactMatch ------------------------------------------------------------------------------------


def _em(completions, answers, **kw):
    return ExactMatch(**kw)(prompts=["p"] * len(completions), completions=completions, answer=answers)


def test_exact_match_number_mode():
    completions = ["46", " 46.", "46 apples, not 47", "46.0", "47", "no number", "-3", "1,234", "x=46"]
    answers = [46, "46", "46", 46, 46, 46, "-3", 1234, 46.0]
    assert _em(completions, answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_exact_match_last_number_and_gsm8k_answers():
    completions = ["3 + 4 = 7", "3 + 4 = 7", "so 5-3 is 2", "it is 72"]
    answers = [7, 7, 2, "Half of 144 is 72.\n#### 72"]
    assert _em(completions, answers, mode="last_number") == [1.0, 1.0, 1.0, 1.0]
    assert _em(completions, answers) == [0.0, 0.0, 0.0, 1.0]  # first number: 3, 3, 5, 72


def test_exact_match_number_parsing():
    assert [float(x) for x in find_numbers("5-3, x=-2, (-1), 1,234.5 and 7.")] == [5, 3, -2, -1, 1234.5, 7]


def test_exact_match_exact_mode_and_unscorable_answers():
    assert _em([" Paris\n", "paris", "Paris"], ["Paris", "Paris", " Paris "], mode="exact") == [1.0, 0.0, 1.0]
    assert _em([" Paris\n"], ["Paris"], mode="exact", strip=False) == [0.0]
    # an answer with no number (or missing) cannot be scored in number mode
    assert _em(["46", "46", "46"], ["n/a", None, float("nan")]) == [None, None, None]


def test_exact_match_errors():
    with pytest.raises(KeyError, match=r"'answer'.*available columns: label, source"):
        ExactMatch()(prompts=["p"], completions=["1"], label=["1"], source=["x"])
    with pytest.raises(ValueError, match="'target'"):
        ExactMatch(answer_column="target")(prompts=["p"], completions=["1"], answer=["1"])
    with pytest.raises(ValueError, match="mode"):
        ExactMatch(mode="fuzzy")


# -- FormatReward ----------------------------------------------------------------------------------


def test_format_reward_default_fullmatch():
    out = FormatReward()(prompts=["p"] * 5, completions=["46", " -7 \n", "46.", "x46", ""])
    assert out == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_format_reward_search_dotall_and_reward():
    fr = FormatReward(pattern=r"<think>.*</think>\s*<answer>.*</answer>", reward=0.5)
    out = fr(
        prompts=["p"] * 3, completions=["<think>a\nb</think>\n<answer>4</answer>", "<answer>4</answer>", "x"]
    )
    assert out == [0.5, 0.0, 0.0]
    fr = FormatReward(pattern=r"\d", match="search")
    assert fr(prompts=["p"] * 2, completions=["abc 1 def", "abc"]) == [1.0, 0.0]


def test_format_reward_invalid():
    with pytest.raises(ValueError, match=r"pattern '\(unclosed'"):
        FormatReward(pattern="(unclosed")
    with pytest.raises(ValueError, match="match"):
        FormatReward(match="prefix")


# -- MathVerify ------------------------------------------------------------------------------------

MATH_CASES = [
    ("The answer is 46.", "46", 1.0),
    ("The answer is 47.", "46", 0.0),
    ("$\\frac{1}{2}$", "\\frac{1}{2}", 1.0),
    ("0.5", "$\\frac{1}{2}$", 1.0),
    ("so \\boxed{\\sqrt{2}}", "\\sqrt{2}", 1.0),
    ("$\\sqrt{3}$", "\\sqrt{2}", 0.0),
    ("no answer here", "46", 0.0),
]


def _mv(cases, **kw):
    comps = [c for c, _, _ in cases]
    return MathVerify(**kw)(prompts=[""] * len(comps), completions=comps, answer=[a for _, a, _ in cases])


def test_math_verify_values():
    assert _mv(MATH_CASES) == [e for _, _, e in MATH_CASES]


def test_math_verify_off_main_thread():
    out: dict[str, Any] = {}

    def run():
        try:
            out["scores"] = _mv(MATH_CASES[:4])
        except Exception as err:  # pragma: no cover - reported below
            out["error"] = err

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert "error" not in out, out.get("error")
    assert out["scores"] == [1.0, 0.0, 1.0, 1.0]


def test_math_verify_timeout_and_unparseable_gold(monkeypatch):
    assert _mv([("46", "", None)]) == [None]
    mv = MathVerify(timeout_seconds=0.2)
    release = threading.Event()
    original = mv._score

    def slow(completion, answer):
        if completion == "slow":
            release.wait(10)
        return original(completion, answer)

    monkeypatch.setattr(mv, "_score", slow)
    start = time.monotonic()
    try:
        assert mv(prompts=["", ""], completions=["slow", "46"], answer=["46", "46"]) == [None, 1.0]
    finally:
        release.set()
    assert time.monotonic() - start < 5


def test_math_verify_errors():
    with pytest.raises(KeyError, match="'solution'"):
        MathVerify(answer_column="solution")(prompts=[""], completions=["1"], answer=["1"])
    with pytest.raises(ValueError, match="timeout_seconds"):
        MathVerify(timeout_seconds=0)


# -- RewardModel -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789 +=."
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg).eval()
    path = tmp_path_factory.mktemp("rm")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path, model, fast


def _direct_scores(model, tok, texts):
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt")
            out.append(model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits.item())
    return out


def test_reward_model_scores_prompt_plus_completion(tiny_rm):
    path, model, tok = tiny_rm
    prompts, completions = ["1+1=", "12+30=", "3+3="], ["2", "42 ", "6"]
    rm = RewardModel(str(path), batch_size=2, device="cpu")
    assert rm._model is None  # lazy
    scores = rm(prompts=prompts, completions=completions, answer=[2, 42, 6])
    assert rm._model is not None
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    expected = _direct_scores(model, tok, [p + c for p, c in zip(prompts, completions)])
    assert scores == pytest.approx(expected, abs=1e-5)  # padding in batches of 2 changes nothing
    assert len(set(scores)) == 3
    one_batch = RewardModel(path, batch_size=16)(prompts=prompts, completions=completions)
    assert one_batch == pytest.approx(scores, abs=1e-5)


def test_reward_model_truncates_from_the_left(tiny_rm):
    path, model, tok = tiny_rm
    rm = RewardModel(str(path), max_length=4, template="{prompt} {completion}")
    [score] = rm(prompts=["aaaaaaaa"], completions=["12"])
    assert score == pytest.approx(_direct_scores(model, tok, ["a 12"])[0], abs=1e-5)


def test_reward_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_name_or_path=.*nope"):
        RewardModel(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="batch_size"):
        RewardModel(str(tmp_path), batch_size=0)
    with pytest.raises(ValueError, match="template"):
        RewardModel(str(tmp_path), template="{question}{completion}")
    rm = RewardModel(str(tmp_path))  # an empty folder: fails on first call, naming the folder
    with pytest.raises(OSError, match="model_name_or_path"):
        rm(prompts=["a"], completions=["b"])


# -- compute_rewards -------------------------------------------------------------------------------


class Const(RewardFunction):
    def __init__(self, values: Sequence[Any]):
        self.values = values

    def __call__(self, *, prompts, completions, **columns):
        return list(self.values)


class Boom(RewardFunction):
    def __call__(self, *, prompts, completions, **columns):
        raise ZeroDivisionError("bad\nline")


PROMPTS = ["1+1=", "2+2=", "3+3="]
COMPLETIONS = ["2", "5", "6 is the answer"]
COLUMNS = {"answer": [2, 4, 6]}


def test_compute_rewards_weighted_sum():
    fns = [ExactMatch(), FormatReward(), Const([0.5, -1.0, 2.0])]
    res = compute_rewards(fns, [2.0, 0.5, 1.0], PROMPTS, COMPLETIONS, COLUMNS)
    assert isinstance(res, RewardResult)
    # exact_match [1, 0, 1]; format [1, 1, 0]; const [.5, -1, 2]
    # total = 2*[1,0,1] + .5*[1,1,0] + [.5,-1,2] = [3, -0.5, 4]
    assert res.total.tolist() == [3.0, -0.5, 4.0]
    assert res.total.dtype == torch.float32
    assert list(res.per_function) == ["exact_match", "format", "Const"]
    assert res.per_function["exact_match"].tolist() == [1.0, 0.0, 1.0]
    assert res.per_function["format"].tolist() == [1.0, 1.0, 0.0]
    assert res.num_fallbacks == {"exact_match": 0, "format": 0, "Const": 0}
    # default weights: 1 each
    res = compute_rewards(fns, None, PROMPTS, COMPLETIONS, COLUMNS)
    assert res.total.tolist() == [2.5, 0.0, 3.0]


def test_compute_rewards_accepts_tensor_output():
    res = compute_rewards([Const(torch.tensor([1.0, 2.0, 3.0]))], None, PROMPTS, COMPLETIONS)
    assert res.total.tolist() == [1.0, 2.0, 3.0]


def test_duplicate_names_get_suffixes():
    fns = [Const([0, 0, 0]), Const([1, 1, 1]), Const([2, 2, 2]), FormatReward()]
    assert function_names(fns) == ["Const", "Const_1", "Const_2", "format"]
    res = compute_rewards(fns, None, PROMPTS, COMPLETIONS)
    assert res.per_function["Const_2"].tolist() == [2.0, 2.0, 2.0]


def test_weights_and_argument_errors():
    with pytest.raises(ValueError, match="reward_weights"):
        compute_rewards([FormatReward(), FormatReward()], [1.0], PROMPTS, COMPLETIONS)
    with pytest.raises(ValueError, match="reward_weights"):
        compute_rewards([FormatReward()], [float("nan")], PROMPTS, COMPLETIONS)
    with pytest.raises(ValueError, match="on_error"):
        compute_rewards([FormatReward()], None, PROMPTS, COMPLETIONS, on_error="ignore")
    with pytest.raises(ValueError, match="at least one"):
        compute_rewards([], None, PROMPTS, COMPLETIONS)
    with pytest.raises(ValueError, match="'answer'"):
        compute_rewards([FormatReward()], None, PROMPTS, COMPLETIONS, {"answer": [1]})
    with pytest.raises(ValueError, match="timeout"):
        compute_rewards([FormatReward()], None, PROMPTS, COMPLETIONS, timeout=0)


@pytest.mark.parametrize(
    "bad, what",
    [(None, "None"), (float("nan"), "nan"), (float("inf"), "inf"), ("x", "'x'")],
)
def test_bad_item_raises_naming_plugin_index_and_completion(bad, what):
    fn = Const([1.0, bad, 0.0])
    with pytest.raises(RewardError) as info:
        compute_rewards([FormatReward(), fn], None, PROMPTS, COMPLETIONS)
    msg = str(info.value)
    assert "\n" not in msg
    assert "'Const'" in msg and "sample 1" in msg and "'5'" in msg and what in msg
    assert isinstance(info.value, RuntimeError)


def test_bad_item_fallback():
    fns = [Const([1.0, None, float("nan")]), Const([1.0, 2.0, 3.0])]
    res = compute_rewards(fns, [1.0, 10.0], PROMPTS, COMPLETIONS, on_error="fallback", fallback=-1.0)
    assert res.per_function["Const"].tolist() == [1.0, -1.0, -1.0]
    assert res.num_fallbacks == {"Const": 2, "Const_1": 0}
    assert res.total.tolist() == [11.0, 19.0, 29.0]


def test_raising_function():
    with pytest.raises(RewardError, match=r"'Boom' raised ZeroDivisionError: bad line \(all 3 completions"):
        compute_rewards([Boom()], None, PROMPTS, COMPLETIONS)
    res = compute_rewards([Boom(), Const([1, 2, 3])], None, PROMPTS, COMPLETIONS, on_error="fallback")
    assert res.per_function["Boom"].tolist() == [0.0, 0.0, 0.0]
    assert res.num_fallbacks["Boom"] == 3
    assert res.total.tolist() == [1.0, 2.0, 3.0]


def test_missing_column_is_reported_through_the_policy():
    with pytest.raises(
        RewardError,
        match=r"'exact_match' raised MissingColumnError: reward 'exact_match' needs dataset column 'answer'",
    ):
        compute_rewards([ExactMatch()], None, PROMPTS, COMPLETIONS)


@pytest.mark.parametrize("out", [[1.0, 2.0], 3.0, "abc", torch.zeros(3, 1)])
def test_wrong_shape_output(out):
    class Wrong(RewardFunction):
        def __call__(self, *, prompts, completions, **columns):
            return out

    with pytest.raises(RewardError, match="'Wrong' returned"):
        compute_rewards([Wrong()], None, PROMPTS, COMPLETIONS)
    res = compute_rewards([Wrong()], None, PROMPTS, COMPLETIONS, on_error="fallback", fallback=0.25)
    assert res.total.tolist() == [0.25] * 3 and res.num_fallbacks == {"Wrong": 3}


def test_timeout_does_not_block_forever():
    release = threading.Event()

    class Hang(RewardFunction):
        def __call__(self, *, prompts, completions, **columns):
            release.wait(30)
            return [9.0] * len(completions)

    try:
        start = time.monotonic()
        with pytest.raises(RewardError, match="'Hang' timed out after 0.2 s"):
            compute_rewards([Hang()], None, PROMPTS, COMPLETIONS, timeout=0.2)
        res = compute_rewards(
            [Hang(), Const([1, 1, 1])], None, PROMPTS, COMPLETIONS, on_error="fallback", timeout=0.2
        )
        assert time.monotonic() - start < 5
        assert res.num_fallbacks == {"Hang": 3, "Const": 0}
        assert res.total.tolist() == [1.0, 1.0, 1.0]
        # a fast function under a timeout works as usual, from a worker thread
        res = compute_rewards([FormatReward()], None, PROMPTS, COMPLETIONS, timeout=5)
        assert res.total.tolist() == [1.0, 1.0, 0.0]
    finally:
        release.set()


def test_call_with_timeout_propagates():
    assert call_with_timeout(lambda x: x + 1, 1.0, 1) == 2
    assert call_with_timeout(lambda x: x + 1, None, 1) == 2
    with pytest.raises(ZeroDivisionError):
        call_with_timeout(lambda: 1 / 0, 1.0)
    assert math.isclose(call_with_timeout(math.sqrt, 1.0, 4.0), 2.0)


def test_columns_are_forwarded():
    seen: dict[str, Any] = {}

    class Spy(RewardFunction):
        def __call__(self, *, prompts, completions, **columns):
            seen.update(columns, prompts=prompts)
            return [0.0] * len(completions)

    compute_rewards([Spy()], None, PROMPTS, COMPLETIONS, {"answer": [1, 2, 3], "level": ["a", "b", "c"]})
    assert seen == {"answer": [1, 2, 3], "level": ["a", "b", "c"], "prompts": PROMPTS}
