"""Non-finite losses and gradients skip the update (counted); K in a row stop the run; +-50-nat gaps stay finite.

An update whose loss or gradient norm is not finite is dropped (``optimizer.zero_grad``, no optimizer or
scheduler step) and counted in ``train/skipped_updates``; ``model.max_consecutive_skips`` skips in a row stop
the run with one line. Lightning's ``global_step`` counts optimizer steps, so a skipped update does not count
toward ``trainer.max_steps``: the run draws another batch instead.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from rel_helpers import StepRecorder, assert_one_line_error, tiny_data, tiny_fit_args, tiny_trainer
from rel_plugins import PoisonedDRPO, ShiftedRollout

from drpo_lightning.cli import main
from drpo_lightning.errors import UserError
from drpo_lightning.module import RLModule
from drpo_lightning.objectives.dppo import DPPO
from drpo_lightning.objectives.drpo import DRPO
from drpo_lightning.objectives.ppo import PPO
from drpo_lightning.rewards.base import RewardFunction
from drpo_lightning.rollouts.hf import HFRollout


class AlternatingReward(RewardFunction):
    """0, 1, 0, 1, ...: every group of two has distinct rewards, so every update has a gradient."""

    def __call__(self, *, prompts, completions, **columns):
        return [float(i % 2) for i in range(len(completions))]


def module(model_dir: str, objective, rollout=None, **kwargs) -> RLModule:
    return RLModule(model_name_or_path=model_dir, objective=objective, rollout=rollout or HFRollout(max_new_tokens=3),
                    rewards=[AlternatingReward()], num_generations=2, export_dir="",
                    optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), **kwargs)


@pytest.mark.parametrize("mode", ["loss", "grad"])
def test_non_finite_update_is_skipped_counted_and_training_goes_on(mode, tiny_model_dir, tmp_path):
    # Update 1 (the second) gets a NaN loss, or a finite loss whose gradient is NaN.
    rl = module(tiny_model_dir, PoisonedDRPO(mode=mode, poison_updates=[1]),
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1)))
    recorder = StepRecorder()
    trainer = tiny_trainer(tmp_path, steps=3, callbacks=[recorder])
    trainer.fit(rl, datamodule=tiny_data())
    # 4 batches for 3 optimizer steps: the poisoned one left the weights alone and did not count.
    assert recorder.moved == [True, False, True, True]
    assert [m["train/skipped_updates"] for m in recorder.metrics] == [0.0, 1.0, 1.0, 1.0]
    skipped = recorder.metrics[1]
    bad = skipped["train/loss"] if mode == "loss" else skipped["train/grad_norm"]
    assert not math.isfinite(bad)
    assert all(math.isfinite(m["train/loss"]) and math.isfinite(m["train/grad_norm"])
               for i, m in enumerate(recorder.metrics) if i != 1)
    assert trainer.global_step == 3 and rl.skipped_updates == 1
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3  # the scheduler skipped it too
    assert all(torch.isfinite(p).all() for p in rl.policy.parameters())
    # The count survives a checkpoint (plain values: loads with weights_only=True).
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    saved = torch.load(tmp_path / "after.ckpt", weights_only=True)
    assert saved["drpo_counters"]["skipped_updates"] == 1 and saved["drpo_counters"]["consecutive_skips"] == 0


def test_k_consecutive_skips_stop_the_run_with_a_clear_message(tiny_model_dir, tmp_path):
    rl = module(tiny_model_dir, PoisonedDRPO(mode="loss"), max_consecutive_skips=3)  # every update is NaN
    recorder = StepRecorder()
    with pytest.raises(UserError) as info:
        tiny_trainer(tmp_path, steps=10, callbacks=[recorder]).fit(rl, datamodule=tiny_data())
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("3 consecutive updates had a non-finite loss or gradient (loss=nan")
    assert "model.max_consecutive_skips" in message
    assert recorder.moved == [False, False]  # the third skip raised inside its step; nothing ever moved
    assert rl.skipped_updates == 3 and rl.trainer.global_step == 0


def test_the_consecutive_count_resets_after_a_good_update(tiny_model_dir, tmp_path):
    # skip, skip, ok, skip, skip, ok, ok with K=3: never three in a row, so the run finishes.
    rl = module(tiny_model_dir, PoisonedDRPO(mode="grad", poison_updates=[0, 1, 3, 4]), max_consecutive_skips=3)
    recorder = StepRecorder()
    tiny_trainer(tmp_path, steps=3, callbacks=[recorder]).fit(rl, datamodule=tiny_data())
    assert recorder.moved == [False, False, True, False, False, True, True]
    assert rl.skipped_updates == 4 and rl._consecutive_skips == 0


def test_the_skip_limit_through_the_cli_is_one_line(tmp_path, capsys):
    config = tmp_path / "poisoned.yaml"
    config.write_text(yaml.safe_dump({"model": {"objective": {"class_path": "rel_plugins.PoisonedDRPO"}}}))
    code = main(tiny_fit_args(tmp_path, "--config", str(config), "--model.max_consecutive_skips=2"))
    assert_one_line_error(code, capsys.readouterr().err,
                          "2 consecutive updates had a non-finite loss or gradient", "model.max_consecutive_skips")


@pytest.mark.parametrize(
    "objective",
    [pytest.param(DRPO(delta=0.2), id="drpo"), pytest.param(DPPO(divergence="kl"), id="dppo-kl"),
     pytest.param(DPPO(divergence="tv", ratio_cap=2.0), id="dppo-tv-cap"),
     pytest.param(PPO(dual_clip=3.0), id="ppo-dual-clip")],
)
def test_log_prob_gaps_of_50_nats_stay_finite_in_training(objective, tiny_model_dir, tmp_path):
    # Two of every four completions come with behaviour log-probs 50 nats off (ratio e^50 and e^-50).
    rl = module(tiny_model_dir, objective, rollout=ShiftedRollout(gap=50.0), max_consecutive_skips=1)
    recorder = StepRecorder()
    tiny_trainer(tmp_path, steps=2, callbacks=[recorder]).fit(rl, datamodule=tiny_data())
    assert len(recorder.metrics) == 2  # no update skipped (one skip would have stopped the run)
    for m in recorder.metrics:
        assert m["train/skipped_updates"] == 0.0
        train = {k: v for k, v in m.items() if k.startswith("train/")}
        assert all(math.isfinite(v) for v in train.values()), train
        assert m["train/ratio_mean"] > 1e20  # the gap really reached the objective
        assert m["train/grad_norm"] > 0  # the honest completions still carry a gradient
    assert all(torch.isfinite(p).all() for p in rl.policy.parameters())
