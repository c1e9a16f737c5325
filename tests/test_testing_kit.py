"""The plugin-author conformance kit: the built-ins pass it, deliberately broken plugins fail it."""

from __future__ import annotations

import pytest
import torch

from drpo_lightning.advantages.dr_grpo import DrGRPOAdvantage
from drpo_lightning.advantages.grpo import GRPOAdvantage
from drpo_lightning.advantages.reinforce_pp import ReinforcePlusPlusAdvantage
from drpo_lightning.advantages.rloo import RLOOAdvantage
from drpo_lightning.objectives.base import AGG_MODES, Objective, clamped_ratio
from drpo_lightning.objectives.dppo import DPPO
from drpo_lightning.objectives.drpo import DRPO
from drpo_lightning.objectives.ppo import PPO
from drpo_lightning.rewards.base import RewardFunction
from drpo_lightning.rewards.exact_match import ExactMatch
from drpo_lightning.rewards.format import FormatReward
from drpo_lightning.testing import check_advantage, check_objective, check_reward
from drpo_lightning.types import ObjectiveOutput

# ------------------------------------------------------------------------------------------ the built-ins pass


@pytest.mark.parametrize(
    "objective",
    [
        DRPO(delta=0.2),
        DRPO(delta=12.5),
        DRPO(delta=0.2, loss_agg_mode="seq-mean-token-mean"),
        DPPO(divergence="tv", delta_low=0.2, delta_high=0.2),
        DPPO(divergence="kl", delta_low=0.05, delta_high=0.05, ratio_cap=2.0),
        PPO(),
        PPO(clip_low=0.2, clip_high=0.28, dual_clip=3.0),
        *(PPO(loss_agg_mode=mode, loss_agg_horizon=8) for mode in AGG_MODES),
    ],
    ids=repr,
)
def test_builtin_objectives_pass(objective):
    check_objective(objective)


@pytest.mark.parametrize(
    "estimator", [GRPOAdvantage(), DrGRPOAdvantage(), RLOOAdvantage(), ReinforcePlusPlusAdvantage()], ids=repr
)
def test_builtin_advantages_pass(estimator):
    check_advantage(estimator)


def test_builtin_rewards_pass():
    scores = check_reward(
        ExactMatch(), prompts=["1+1=", "2+2=", "3+3="], completions=["2", "5", "x"], answer=["2", "4", "6"]
    )
    assert scores == [1.0, 0.0, 0.0]
    assert check_reward(FormatReward(), prompts=["a", "b"], completions=["12", "twelve"]) == [1.0, 0.0]


def test_topk_objective_is_refused_with_a_clear_message():
    with pytest.raises(AssertionError, match="top-K inputs"):
        check_objective(DPPO(divergence="topk"))


# ----------------------------------------------------------------------------------- broken plugins fail it


class Reinforce(Objective):
    """A correct minimal objective the broken ones below start from."""

    def token_loss(self, logprobs, old_logprobs, advantages, mask, **extras):
        return -advantages * clamped_ratio(logprobs, old_logprobs), {}


class LeakyMetric(Reinforce):
    """Overrides the call and forgets to detach its metric."""

    def __call__(self, **inputs):
        out = super().__call__(**inputs)
        return ObjectiveOutput(out.loss, {**out.metrics, "leak": out.loss * 2})


class IgnoresMask(Reinforce):
    """A sequence-level ratio averaged over *all* positions, padding included (a real-world bug)."""

    def token_loss(self, logprobs, old_logprobs, advantages, mask, **extras):
        seq_ratio = (logprobs - old_logprobs).clamp(-20, 20).mean(-1, keepdim=True).exp()
        return -advantages * seq_ratio.expand_as(logprobs), {}


class MaskLeaksIntoWeight(Reinforce):
    """Scales each sequence by a statistic of the anchor over every position, padding included."""

    def token_loss(self, logprobs, old_logprobs, advantages, mask, **extras):
        scale = 1 + old_logprobs.exp().mean(-1, keepdim=True)  # [B, 1]: should be a masked mean
        return -advantages * scale * clamped_ratio(logprobs, old_logprobs), {}


class Unclamped(Objective):
    """DRPO-like quadratic term without the log-ratio clamp: overflows at a +50 gap."""

    def token_loss(self, logprobs, old_logprobs, advantages, mask, **extras):
        ratio = (logprobs - old_logprobs).exp()
        return -advantages * ratio + advantages.abs() * (ratio - 1) ** 2, {}


class _WrongBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.exp()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x.exp() * 0.5  # off by a factor of two


class WrongGradient(Objective):
    def token_loss(self, logprobs, old_logprobs, advantages, mask, **extras):
        return -advantages * _WrongBackward.apply((logprobs - old_logprobs).clamp(-20, 20)), {}


class LocalMean(Reinforce):
    """Normalises each minibatch by its own token count, ignoring global_count."""

    def __call__(self, *, global_count=None, **inputs):
        return super().__call__(**inputs)


class PositionalOnly(Reinforce):
    def __call__(self, logprobs, old_logprobs, advantages, mask, /):
        return super().__call__(
            logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask
        )


class GradIntoAnchor(Objective):
    """Overrides the call and lets the gradient reach old_logprobs."""

    def token_loss(self, logprobs, old_logprobs, advantages, mask, **extras):
        return -advantages * clamped_ratio(logprobs, old_logprobs), {}

    def __call__(self, *, logprobs, old_logprobs, advantages, mask, global_count=None):
        adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(-1).expand_as(logprobs)
        loss = (-adv.detach() * (logprobs - old_logprobs).clamp(-20, 20).exp() * mask).sum()
        count = mask.sum() if global_count is None else global_count
        return ObjectiveOutput(loss / torch.as_tensor(count).clamp(min=1), {})


@pytest.mark.parametrize(
    ("objective", "message"),
    [
        (LeakyMetric(), "metric 'leak' is not detached"),
        (IgnoresMask(), r"changing only masked-out positions changed the result|padded \(mask = 0\) tokens"),
        (MaskLeaksIntoWeight(), "changing only masked-out positions changed the result"),
        (Unclamped(), "not finite"),
        (WrongGradient(), "autograd and finite differences disagree"),
        (LocalMean(), "split invariance"),
        (PositionalOnly(), "the public call objective"),
        (GradIntoAnchor(), "a gradient flows into old_logprobs"),
    ],
    ids=lambda x: type(x).__name__ if not isinstance(x, str) else "",
)
def test_broken_objectives_fail(objective, message):
    with pytest.raises(AssertionError, match=message):
        check_objective(objective)


class NoKwargs(RewardFunction):
    def __call__(self, *, prompts, completions):
        return [0.0] * len(completions)


class WrongLength(RewardFunction):
    def __call__(self, *, prompts, completions, **columns):
        return [0.0]


class NanScore(RewardFunction):
    def __call__(self, *, prompts, completions, **columns):
        return [float("nan")] * len(completions)


class ReadsEveryColumn(RewardFunction):
    def __call__(self, *, prompts, completions, **columns):
        return [float(len(columns))] * len(completions)


class BoolScore(RewardFunction):
    def __call__(self, *, prompts, completions, **columns):
        return [True] * len(completions)


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        (NoKwargs(), r"must accept \*\*columns"),
        (WrongLength(), "one score per completion"),
        (NanScore(), "not finite"),
        (ReadsEveryColumn(), "unknown extra column"),
        (BoolScore(), "must be a float or None"),
    ],
    ids=lambda x: type(x).__name__ if not isinstance(x, str) else "",
)
def test_broken_rewards_fail(reward, message):
    with pytest.raises(AssertionError, match=message):
        check_reward(reward, ["p", "q"], ["a", "b"], answer=["a", "c"])


class ZScoreOverBatch(GRPOAdvantage):
    """(r - batch mean) / batch std: gives all-equal groups a nonzero advantage."""

    def __call__(self, rewards, group_ids):
        return (rewards - rewards.mean()) / (rewards.std() + 1e-6)


class NanForEqualGroups(GRPOAdvantage):
    def __call__(self, rewards, group_ids):
        out = torch.empty_like(rewards)
        for g in group_ids.unique():
            r = rewards[group_ids == g]
            out[group_ids == g] = (r - r.mean()) / r.std()
        return out


@pytest.mark.parametrize(
    ("estimator", "message"),
    [(ZScoreOverBatch(), "must get zero advantage"), (NanForEqualGroups(), "not finite")],
    ids=lambda x: type(x).__name__ if not isinstance(x, str) else "",
)
def test_broken_advantages_fail(estimator, message):
    with pytest.raises(AssertionError, match=message):
        check_advantage(estimator)


class MutatesMask(Reinforce):
    def __call__(self, *, mask, **inputs):
        mask[:, 0] = 1  # "fixes" the mask in place: the trainer's mask changes under its feet
        return super().__call__(mask=mask, **inputs)


def test_in_place_modification_fails():
    with pytest.raises(AssertionError, match="modified its input 'mask' in place"):
        check_objective(MutatesMask())
