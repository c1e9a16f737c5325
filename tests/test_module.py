"""RLModule end to end on tiny offline models: the loop runs, learns, and rejects bad configs early."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from rl_helpers import CountOnes

from drpo_lightning.advantages.reinforce_pp import ReinforcePlusPlusAdvantage
from drpo_lightning.data import PromptDataModule
from drpo_lightning.errors import ConfigError
from drpo_lightning.module import RLModule
from drpo_lightning.objectives.dppo import DPPO
from drpo_lightning.objectives.drpo import DRPO
from drpo_lightning.objectives.ppo import PPO
from drpo_lightning.rollouts.hf import HFRollout


class RewardHistory(pl.Callback):
    def __init__(self):
        self.rewards: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rewards.append(float(trainer.callback_metrics["reward"]))


def fit(module: RLModule, steps: int, tmp_path, batch_size: int = 8, **trainer_kwargs) -> RewardHistory:
    history = RewardHistory()
    data = PromptDataModule(task="arithmetic", task_size=400, val_size=16, batch_size=batch_size,
                            val_batch_size=16, seed=0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=[history], default_root_dir=tmp_path, **trainer_kwargs,
    )
    trainer.fit(module, datamodule=data)
    return history


@pytest.mark.parametrize(
    "objective",
    [DRPO(delta=0.2), DPPO(divergence="tv", delta_low=0.15, delta_high=0.15), PPO(clip_low=0.2, clip_high=0.28)],
    ids=["drpo", "dppo", "ppo"],
)
def test_each_objective_raises_reward_on_a_trivially_learnable_task(objective, tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    module = RLModule(
        model_name_or_path=tiny_model_dir,
        objective=objective,
        rollout=HFRollout(max_new_tokens=4, temperature=1.0),
        rewards=[CountOnes()],
        num_generations=8,
        num_minibatches=2,
        export_dir="",
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-2),
    )
    history = fit(module, steps=30, tmp_path=tmp_path)  # 15 rollouts x 2 minibatch updates
    first, last = sum(history.rewards[:3]) / 3, sum(history.rewards[-3:]) / 3
    # A random 21-token policy emits '1' with p ~ 1/21 (reward ~0.05); the policy must learn it.
    assert last > first + 0.3, (first, last, history.rewards)


def test_recompute_anchor_tis_kl_and_micro_batches_run(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    module = RLModule(
        model_name_or_path=tiny_model_dir,
        objective=PPO(dual_clip=3.0),
        rollout=HFRollout(max_new_tokens=4),
        rewards=[CountOnes()],
        num_generations=4,
        ppo_epochs=2,
        num_minibatches=2,
        micro_batch_size=4,
        anchor="recompute",
        tis_cap=2.0,
        kl_beta=0.1,
        kl_estimator="k3",
        entropy_coef=0.01,
        export_dir="",
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )
    history = fit(module, steps=8, tmp_path=tmp_path, batch_size=4)
    assert len(history.rewards) == 2  # 2 rollouts x (2 epochs x 2 minibatches) = 8 updates
    assert module.reference is not None
    assert all(torch.isfinite(torch.tensor(history.rewards)))


def test_dppo_topk_gets_topk_inputs_from_the_rollout(tiny_model_dir, tmp_path):
    module = RLModule(
        model_name_or_path=tiny_model_dir,
        objective=DPPO(divergence="topk", topk=3),
        rollout=HFRollout(max_new_tokens=3),
        rewards=[CountOnes()],
        num_generations=2,
        export_dir="",
    )
    history = fit(module, steps=2, tmp_path=tmp_path, batch_size=2)
    assert len(history.rewards) == 2


class RecordingRollout(HFRollout):
    """HFRollout that keeps the completion mask of its last batch."""

    def generate(self, *args, **kwargs):
        self.last = super().generate(*args, **kwargs)
        return self.last


class RecordingReinforcePP(ReinforcePlusPlusAdvantage):
    """REINFORCE++ that keeps the token counts the trainer passed."""

    def __call__(self, rewards, group_ids, lengths=None):
        self.lengths = lengths
        return super().__call__(rewards, group_ids, lengths=lengths)


def test_an_estimator_that_uses_lengths_gets_the_completion_token_counts(tiny_model_dir, tmp_path):
    rollout, advantage = RecordingRollout(max_new_tokens=4), RecordingReinforcePP()
    module = RLModule(model_name_or_path=tiny_model_dir, rollout=rollout, advantage=advantage,
                      rewards=[CountOnes()], num_generations=2, export_dir="")
    fit(module, steps=1, tmp_path=tmp_path, batch_size=4)
    expected = rollout.last.completion_mask.sum(-1)
    assert advantage.lengths is not None and expected.shape == (8,)
    torch.testing.assert_close(advantage.lengths.float(), expected.float(), rtol=0, atol=0)


def test_inconsistent_minibatch_split_fails_before_the_model_loads(tiny_model_dir, tmp_path):
    module = RLModule(model_name_or_path=tiny_model_dir, num_generations=3, num_minibatches=2, export_dir="")
    with pytest.raises(ConfigError, match=r"data.batch_size \* model.num_generations = 5 \* 3 = 15"):
        fit(module, steps=1, tmp_path=tmp_path, batch_size=5)
    assert module.policy is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_generations": 0}, "model.num_generations must be >= 1, got 0"),
        ({"anchor": "pi_old"}, "model.anchor must be 'behavior' or 'recompute', got 'pi_old'"),
        ({"tis_cap": 2.0}, "model.tis_cap corrects pi_old/mu and needs model.anchor: recompute"),
        ({"kl_beta": -1.0}, "model.kl_beta must be >= 0, got -1.0"),
        ({"kl_beta": float("nan")}, "model.kl_beta must be a finite number, got nan"),
        ({"max_grad_norm": float("nan")}, "model.max_grad_norm must be a number or null, got nan"),
        ({"num_generations": 1}, "model.num_generations: advantage 'grpo' compares the completions of a prompt"),
        ({"optimizer": lambda p: torch.optim.SGD(p, lr=0.1, momentum=-1)}, "model.optimizer: Invalid momentum value"),
        ({"reward_weights": [1.0, 2.0]}, "model.reward_weights has 2 entries for 1 reward functions"),
        ({"model_name_or_path": "/nonexistent/model"}, "'/nonexistent/model' is not a local folder"),
    ],
)
def test_bad_config_is_one_clear_error(kwargs, message):
    with pytest.raises(ConfigError) as err:
        RLModule(**kwargs)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_the_loop_names_no_concrete_plugin():
    """module.py gets its defaults from the registries by name: it imports no objective, rollout, reward or
    advantage implementation (only their base classes)."""
    import ast
    from pathlib import Path

    import drpo_lightning.module as loop

    tree = ast.parse(Path(loop.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    plugin_modules = {m for m in imported if m.split(".")[1:2] in (["objectives"], ["rollouts"], ["rewards"],
                                                                    ["advantages"])}
    assert plugin_modules and all(m.endswith(".base") for m in plugin_modules), plugin_modules
    module = RLModule()
    assert (type(module.objective).__name__, type(module.rollout).__name__, type(module.advantage).__name__,
            [type(r).__name__ for r in module.rewards]) == ("DRPO", "HFRollout", "GRPOAdvantage", ["ExactMatch"])
