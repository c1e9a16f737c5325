"""Reward plugins that raise, hang or return NaN/inf/None, under both policies of ``model.reward_on_error``.

``raise``: the run stops with one line naming the plugin and the sample. ``fallback``: the sample scores
``model.reward_fallback``, the step goes on, and ``reward/fallbacks`` counts the replaced scores.
The unit-level cases (wrong shapes, timeouts of ``compute_rewards``) are in tests/test_rewards.py.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import yaml
from rel_helpers import StepRecorder, assert_one_line_error, tiny_data, tiny_fit_args, tiny_trainer
from rel_plugins import (
    RELEASE_HANGS,
    BadScoreAtSample,
    ExplodingReward,
    FlakyReward,
    NaNAtSample,
    WrongLengthReward,
)

from drpo_lightning.cli import main
from drpo_lightning.module import RLModule
from drpo_lightning.rewards.combine import RewardError
from drpo_lightning.rollouts.hf import HFRollout


@pytest.fixture(autouse=True)
def release_hung_rewards():
    RELEASE_HANGS.clear()
    yield
    RELEASE_HANGS.set()  # the abandoned reward threads return now instead of sleeping on


def module(model_dir: str, reward, **kwargs) -> RLModule:
    return RLModule(model_name_or_path=model_dir, rollout=HFRollout(max_new_tokens=3), rewards=[reward],
                    num_generations=2, export_dir="", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), **kwargs)


@pytest.mark.parametrize(
    ("reward", "fragments"),
    [
        pytest.param(NaNAtSample(index=1), ["'NaNAtSample' returned nan (not a finite number) at sample 1 (completion "],
                     id="nan"),
        pytest.param(ExplodingReward(), ["'ExplodingReward' raised KeyError: 'grader lost its answer key' (all 4 "
                                         "completions; first: "], id="raises"),
        pytest.param(FlakyReward(start=2), ["'FlakyReward' timed out after 0.5 s", "(all 4 completions"], id="hangs"),
        pytest.param(BadScoreAtSample(float("inf"), index=2),
                     ["'BadScoreAtSample' returned inf (not a finite number) at sample 2 (completion "], id="inf"),
        pytest.param(BadScoreAtSample(None, index=0),
                     ["'BadScoreAtSample' returned None (not a finite number) at sample 0 (completion "], id="none"),
        pytest.param(BadScoreAtSample("0.5", index=3),
                     ["'BadScoreAtSample' returned '0.5' (not a finite number) at sample 3"], id="string"),
        pytest.param(WrongLengthReward(), ["'WrongLengthReward' returned 3 scores for 4 completions"], id="wrong-length"),
    ],
)
def test_raise_policy_stops_with_one_line_naming_plugin_and_sample(reward, fragments, tiny_model_dir, tmp_path):
    rl = module(tiny_model_dir, reward, reward_on_error="raise", reward_timeout=0.5)
    recorder = StepRecorder()
    with pytest.raises(RewardError) as info:
        tiny_trainer(tmp_path, steps=2, callbacks=[recorder]).fit(rl, datamodule=tiny_data())
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert recorder.moved == []  # stopped inside the first step, before any update


def test_raise_policy_through_the_cli_is_one_line_and_debug_chains_the_cause(tmp_path, capsys):
    config = tmp_path / "exploding.yaml"
    config.write_text(yaml.safe_dump({"model": {"rewards": [{"class_path": "rel_plugins.ExplodingReward"}]}}))
    args = tiny_fit_args(tmp_path, "--config", str(config))
    code = main(args)
    assert_one_line_error(code, capsys.readouterr().err,
                          "reward function 'ExplodingReward' raised KeyError: 'grader lost its answer key'")
    with pytest.raises(RewardError) as info:
        main([*args, "--debug"])
    assert isinstance(info.value.__cause__, KeyError)  # the plugin's own traceback is kept for --debug


def test_fallback_policy_scores_failures_and_counts_them(tiny_model_dir, tmp_path):
    # Call 1: NaN, None, inf for three of the four samples; call 2 raises; call 3 hangs past the timeout;
    # call 4 is fine. Every failed score becomes -1 and is counted; training goes on.
    reward = FlakyReward()
    rl = module(tiny_model_dir, reward, reward_on_error="fallback", reward_fallback=-1.0, reward_timeout=0.5)
    recorder = StepRecorder()
    start = time.monotonic()
    tiny_trainer(tmp_path, steps=4, callbacks=[recorder]).fit(rl, datamodule=tiny_data())
    assert time.monotonic() - start < 25  # the hung call was not waited for (it sleeps for 30 s)
    assert reward.expected_fallbacks == [3, 4, 4, 0]
    assert [m["reward/fallbacks"] for m in recorder.metrics] == [3.0, 4.0, 4.0, 0.0]
    assert [m["reward/FlakyReward"] for m in recorder.metrics] == [(-3 + 1) / 4, -1.0, -1.0, 0.5]
    assert all(math.isfinite(m["reward"]) for m in recorder.metrics)
    assert recorder.moved[-1]  # the last step, with real rewards, trained the policy
