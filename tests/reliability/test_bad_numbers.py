"""Bad numbers in the config, the rewards and the Trainer arguments: refused in one line before the model loads,
or skipped and counted during training, never silently trained on.

Scenarios (each failed before its fix): NaN/inf in float options; a NaN gradient made by clipping with a finite
norm; ``num_generations: 1`` with an estimator that needs a group; rewards beyond float32; torch's own optimizer
checks; a DPPO top-K larger than the vocabulary; Trainer arguments RLModule cannot use; k1 as a KL penalty; a
rollout without a temperature.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from rel_helpers import StepRecorder, assert_one_line_error, tiny_data, tiny_fit_args, tiny_trainer

from drpo_lightning import trainer_checks
from drpo_lightning.advantages.reinforce_pp import ReinforcePlusPlusAdvantage
from drpo_lightning.cli import main
from drpo_lightning.errors import ConfigError, UserError
from drpo_lightning.kl import kl_penalty
from drpo_lightning.module import RLModule
from drpo_lightning.objectives.drpo import DRPO
from drpo_lightning.rewards.base import RewardFunction
from drpo_lightning.rewards.combine import RewardError, compute_rewards
from drpo_lightning.rollouts.base import RolloutEngine
from drpo_lightning.rollouts.hf import HFRollout
from drpo_lightning.trainer_checks import check_trainer


@pytest.fixture
def model_must_not_load(monkeypatch):
    def trap(*args, **kwargs):
        pytest.fail("the policy was loaded before the config error was reported")

    monkeypatch.setattr("drpo_lightning.models.load_policy", trap)


class AlternatingReward(RewardFunction):
    """0, 1, 0, 1, ...: with two samples per prompt every group has distinct rewards."""

    def __call__(self, *, prompts, completions, **columns):
        return [float(i % 2) for i in range(len(completions))]


class HugeAtSample(RewardFunction):
    """0.5 for every completion except ``index``, which gets 1e39 (finite in float64, inf in float32)."""

    def __init__(self, index: int = 1) -> None:
        self.index = index

    def __call__(self, *, prompts, completions, **columns):
        return [1e39 if i == self.index else 0.5 for i in range(len(completions))]


def module(model_dir: str, **kwargs) -> RLModule:
    kwargs.setdefault("rewards", [AlternatingReward()])
    kwargs.setdefault("num_generations", 2)
    return RLModule(model_name_or_path=model_dir, objective=DRPO(delta=0.2), rollout=HFRollout(max_new_tokens=3),
                    export_dir="", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), **kwargs)


# ------------------------------------------------------------------------------------------------ 1. NaN / inf

# (id, extra CLI arguments, fragment of the one error line)
NUMBER_SCENARIOS = [
    ("max-grad-norm-nan", ["--model.max_grad_norm=.nan"], "model.max_grad_norm must be a number or null, got nan"),
    ("kl-beta-nan", ["--model.kl_beta=.nan"], "model.kl_beta must be a finite number, got nan"),
    ("kl-beta-inf", ["--model.kl_beta=.inf"], "model.kl_beta must be a finite number, got inf"),
    ("val-threshold-nan", ["--model.val_success_threshold=.nan"],
     "model.val_success_threshold must be a finite number, got nan"),
    ("entropy-coef-inf", ["--model.entropy_coef=-.inf"], "model.entropy_coef must be a finite number, got -inf"),
    ("tis-cap-nan", ["--model.anchor=recompute", "--model.tis_cap=.nan"],
     "model.tis_cap must be a number or null, got nan"),
    ("reward-timeout-inf", ["--model.reward_timeout=.inf"], "model.reward_timeout must be a finite number of seconds"),
    ("reward-fallback-huge", ["--model.reward_fallback=1.0e+39"], "model.reward_fallback = 1e+39 is beyond float32"),
    ("reward-weight-nan", ["--model.reward_weights=[.nan]"], "model.reward_weights[0] must be a finite number"),
    ("reward-weight-huge", ["--model.reward_weights=[1.0e+300]"],
     "model.reward_weights[0] must be a finite number within float32's range (+-3.4e38), got 1e+300"),
]


@pytest.mark.parametrize(("extra", "fragment"), [pytest.param(e, f, id=i) for i, e, f in NUMBER_SCENARIOS])
def test_nan_and_inf_options_are_one_line_before_the_model_loads(extra, fragment, tmp_path, capsys,
                                                                  model_must_not_load):
    code = main(tiny_fit_args(tmp_path, *extra))
    assert_one_line_error(code, capsys.readouterr().err, fragment)


def test_nan_max_grad_norm_in_a_yaml_file_is_one_line(tmp_path, capsys, model_must_not_load):
    config = tmp_path / "nan.yaml"
    config.write_text("model:\n  max_grad_norm: .nan\n")
    code = main(tiny_fit_args(tmp_path, "--config", str(config)))
    assert_one_line_error(code, capsys.readouterr().err, "model.max_grad_norm must be a number or null, got nan")


def test_nan_gradient_made_by_clipping_is_skipped_not_applied(tiny_model_dir, tmp_path):
    # Clipping with a NaN max_norm scales a finite gradient (finite norm) by NaN. Set after the config check,
    # as a callback or a notebook could: the guard must look at the clipped gradient, skip and count.
    rl = module(tiny_model_dir, max_consecutive_skips=2)
    rl.hparams.max_grad_norm = float("nan")
    recorder = StepRecorder()
    with pytest.raises(UserError, match=r"2 consecutive updates had a non-finite loss or gradient \(loss=.*, "
                                        r"grad_norm=.*, after clipping nan\)"):
        tiny_trainer(tmp_path, steps=3, callbacks=[recorder]).fit(rl, datamodule=tiny_data())
    assert recorder.moved == [False]  # the second skip raised inside its step
    assert math.isfinite(recorder.metrics[0]["train/grad_norm"])  # the norm before clipping was finite
    assert rl.skipped_updates == 2
    assert all(torch.isfinite(p).all() for p in rl.policy.parameters())


# ------------------------------------------------------------------------------------------------ 2. group size

@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo", "rloo"])
def test_one_sample_per_prompt_with_a_group_estimator_is_one_line(advantage, tmp_path, capsys, model_must_not_load):
    code = main(tiny_fit_args(tmp_path, f"--model.advantage={advantage}", "--model.num_generations=1"))
    line = assert_one_line_error(code, capsys.readouterr().err,
                                 f"model.num_generations: advantage '{advantage}' compares the completions of a "
                                 "prompt and needs model.num_generations >= 2, got 1",
                                 "model.advantage: reinforce_pp")
    assert "nothing would train" in line


def test_reinforce_pp_with_one_sample_per_prompt_trains(tiny_model_dir, tmp_path):
    # Rewards 0, 1 in groups of one: baseline 0, so the batch whitening gives -1, +1, not 0, 0.
    rl = module(tiny_model_dir, num_generations=1, advantage=ReinforcePlusPlusAdvantage())
    recorder = StepRecorder()
    tiny_trainer(tmp_path, steps=2, callbacks=[recorder]).fit(rl, datamodule=tiny_data())
    for m in recorder.metrics:
        assert m["advantage/abs_mean"] > 0.5
        assert m["train/grad_norm"] > 0


# ------------------------------------------------------------------------------------------------ 3. rewards

def test_reward_beyond_float32_is_one_line_naming_plugin_and_sample(tiny_model_dir, tmp_path):
    rl = module(tiny_model_dir, rewards=[HugeAtSample(index=1)])
    with pytest.raises(RewardError) as info:
        tiny_trainer(tmp_path, steps=1).fit(rl, datamodule=tiny_data())
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("reward function 'HugeAtSample' returned 1e+39 (times its weight 1: beyond float32's "
                              "range, +-3.4e38) at sample 1 (completion ")


def test_reward_beyond_float32_with_fallback_is_replaced_and_counted(tiny_model_dir, tmp_path):
    rl = module(tiny_model_dir, rewards=[HugeAtSample(index=1)], reward_on_error="fallback", reward_fallback=-1.0)
    recorder = StepRecorder()
    tiny_trainer(tmp_path, steps=2, callbacks=[recorder]).fit(rl, datamodule=tiny_data())
    for m in recorder.metrics:
        assert m["reward/fallbacks"] == 1.0
        assert m["reward"] == pytest.approx((0.5 * 3 - 1.0) / 4)
        assert m["train/skipped_updates"] == 0.0
        assert all(math.isfinite(v) for v in m.values()), m


def test_weighted_sum_beyond_float32_is_charged_to_the_largest_term():
    # Every weighted score fits float32 (max 3.4e38), the sums 3.5e38 and 3.9e38 do not.
    big = RewardFunctionOf([2e38, 1.9e38], "big")
    small = RewardFunctionOf([1.5e38, 2e38], "small")
    prompts, completions = ["p", "p"], ["a", "b"]
    with pytest.raises(RewardError, match=r"^the weighted sum of the rewards \(big, small\) is 3.5e\+38 at sample 0 "):
        compute_rewards([big, small], None, prompts, completions)
    out = compute_rewards([big, small], None, prompts, completions, on_error="fallback", fallback=0.0)
    # The larger term of each sum becomes the fallback: big's 2e38 at sample 0, small's 2e38 at sample 1.
    assert out.total.tolist() == pytest.approx([1.5e38, 1.9e38], rel=1e-6)
    assert out.num_fallbacks == {"big": 1, "small": 1}
    assert out.per_function["big"].tolist() == pytest.approx([0.0, 1.9e38], rel=1e-6)


class RewardFunctionOf(RewardFunction):
    """Fixed scores under a given name."""

    def __init__(self, scores, name):
        self.scores, self._name = scores, name

    @property
    def name(self) -> str:
        return self._name

    def __call__(self, *, prompts, completions, **columns):
        return list(self.scores)


# ------------------------------------------------------------------------------------------------ 4. torch checks

@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        pytest.param(["--model.optimizer.init_args.lr=-1"], "model.optimizer: Invalid learning rate: -1.0", id="lr"),
        pytest.param(["--model.lr_scheduler.init_args.start_factor=2"],
                     "model.lr_scheduler: Starting multiplicative factor expected to be greater than 0 and less "
                     "or equal to 1", id="scheduler"),
        pytest.param(["--model.objective=dppo", "--model.objective.init_args.divergence=topk",
                      "--model.objective.init_args.topk=100000"],
                     "model.objective.init_args.topk: DPPO asks for the top 100000 log-probs of each token, but the "
                     "policy's vocabulary has", id="dppo-topk-over-vocab"),
    ],
)
def test_torch_argument_checks_run_before_the_model_loads(extra, fragment, tmp_path, capsys, model_must_not_load):
    code = main(tiny_fit_args(tmp_path, *extra))
    assert_one_line_error(code, capsys.readouterr().err, fragment)


# ------------------------------------------------------------------------------------------------ 5. Trainer

@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(trainer_checks, "_cuda_available", lambda: False)
    monkeypatch.setattr(trainer_checks, "_mps_available", lambda: False)


TRAINER_SCENARIOS = [
    ("cpu-all-devices", {"accelerator": "cpu", "devices": -1},
     ["trainer.devices: -1 means every GPU, but the run is on the CPU", "--trainer.devices 1"]),
    ("accumulate", {"accelerator": "cpu", "accumulate_grad_batches": 4},
     ["trainer.accumulate_grad_batches: 4 is not supported", "model.micro_batch_size"]),
    ("gradient-clip", {"accelerator": "cpu", "gradient_clip_val": 1.0},
     ["trainer.gradient_clip_val: 1.0 is not supported", "model.max_grad_norm"]),
    ("gpu-without-gpu", {"accelerator": "gpu", "devices": -1}, ["trainer.accelerator: gpu but this machine has no GPU",
                                                                 trainer_checks.GPU_HINT]),
    ("cuda-without-gpu", {"accelerator": "cuda"}, ["trainer.accelerator: cuda", trainer_checks.GPU_HINT]),
    ("fsdp-without-gpu", {"accelerator": "auto", "strategy": "fsdp", "precision": "bf16-mixed"},
     ["trainer.strategy: fsdp (FSDP) runs on CUDA GPUs only", trainer_checks.GPU_HINT]),
    ("auto-all-devices-without-gpu", {"accelerator": "auto", "devices": "-1"},
     ["trainer.devices: -1 means every GPU", trainer_checks.GPU_HINT]),
]


@pytest.mark.parametrize(("trainer", "fragments"), [pytest.param(t, f, id=i) for i, t, f in TRAINER_SCENARIOS])
def test_trainer_arguments_rlmodule_cannot_use_are_one_line(trainer, fragments, no_gpu):
    with pytest.raises(ConfigError) as info:
        check_trainer(trainer)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_trainer_checks_pass_good_arguments_and_warn_for_half_precision_on_cpu(no_gpu, monkeypatch):
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies import FSDPStrategy

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_trainer({"accelerator": "cpu", "devices": 2, "strategy": "ddp", "precision": "bf16-mixed",
                       "accumulate_grad_batches": 1, "gradient_clip_val": None})
        check_trainer({"accelerator": CPUAccelerator(), "devices": 1, "gradient_clip_val": 0})
        check_trainer({})
    with pytest.warns(UserWarning, match="trainer.precision: bf16-mixed with trainer.accelerator auto: there is no "
                                         "GPU, so this runs on the CPU"):
        check_trainer({"accelerator": "auto", "precision": "bf16-mixed"})
    with pytest.raises(ConfigError, match="FSDPStrategy \\(FSDP\\) runs on CUDA GPUs only"):
        check_trainer({"strategy": FSDPStrategy()})
    # With a GPU the GPU configs pass.
    monkeypatch.setattr(trainer_checks, "_cuda_available", lambda: True)
    check_trainer({"accelerator": "gpu", "devices": -1, "strategy": "fsdp", "precision": "bf16-mixed"})


# ------------------------------------------------------------------------------------------------ 6. KL estimators

def test_k1_as_a_penalty_warns_once_and_k2_k3_do_not():
    with pytest.warns(UserWarning, match="model.kl_estimator: k1 with model.kl_beta > 0 only adds noise") as record:
        RLModule(kl_beta=0.1, kl_estimator="k1")
    assert len([w for w in record if "k1" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RLModule(kl_beta=0.0, kl_estimator="k1")
        RLModule(kl_beta=0.1, kl_estimator="k2")
        RLModule(kl_beta=0.1, kl_estimator="k3")


def test_expected_gradients_of_the_kl_estimators_match_the_documentation():
    # Exact expectation over a 7-token vocabulary in float64: sum_y pi(y) * grad k(y) with pi held fixed as the
    # sampling weights, against autograd of the closed-form divergences.
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(7, generator=gen, dtype=torch.float64), -1)

    def expected_grad(estimator):
        logp = torch.log_softmax(theta, -1)
        k = kl_penalty(logp.view(1, -1), ref.view(1, -1), estimator).view(-1)
        (grad,) = torch.autograd.grad((logp.exp().detach() * k).sum(), theta)
        return grad

    def grad_of(divergence):
        (grad,) = torch.autograd.grad(divergence(torch.log_softmax(theta, -1)), theta)
        return grad

    reverse = grad_of(lambda logp: (logp.exp() * (logp - ref)).sum())  # KL(pi || ref)
    forward = grad_of(lambda logp: (ref.exp() * (ref - logp)).sum())  # KL(ref || pi)
    assert reverse.abs().max() > 0.05 and forward.abs().max() > 0.05 and (reverse - forward).abs().max() > 0.01
    torch.testing.assert_close(expected_grad("k1"), torch.zeros(7, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(expected_grad("k2"), reverse, rtol=0, atol=1e-12)
    torch.testing.assert_close(expected_grad("k3"), forward, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------ 7. temperature

class NoTemperatureRollout(RolloutEngine):
    max_new_tokens = 3

    def generate(self, policy, prompt_ids, prompt_mask, *, num_generations, eos_token_id, pad_token_id, topk=0):
        raise NotImplementedError


def test_a_rollout_without_temperature_warns_once_naming_its_class():
    rl = RLModule(rollout=NoTemperatureRollout())
    with pytest.warns(UserWarning, match="rollout NoTemperatureRollout has no `temperature` attribute") as record:
        assert rl._rollout_temperature() == 1.0
        assert rl._rollout_temperature() == 1.0
    assert len([w for w in record if "NoTemperatureRollout" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert RLModule(rollout=HFRollout(temperature=0.7))._rollout_temperature() == 0.7
        plain = NoTemperatureRollout()
        plain.temperature = 0.5
        assert RLModule(rollout=plain)._rollout_temperature() == 0.5
