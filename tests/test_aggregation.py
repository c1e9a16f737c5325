"""Loss aggregation: the four modes by hand, and independence from how a batch is split into minibatches."""

from __future__ import annotations

import pytest
import torch

from drpo_lightning.objectives.base import AGG_MODES, aggregate, aggregation_count
from drpo_lightning.objectives.dppo import DPPO
from drpo_lightning.objectives.drpo import DRPO
from drpo_lightning.objectives.ppo import PPO

# Token losses [3, 4]; row 2 is an empty sequence (all padding) and must not count anywhere.
LOSSES = torch.tensor(
    [[1.0, 2.0, 3.0, 10.0], [4.0, 6.0, 7.0, 7.0], [9.0, 9.0, 9.0, 9.0]], dtype=torch.float64
)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
# Valid tokens: row 0 -> 1 + 2 + 3 = 6 over 3 tokens, row 1 -> 4 + 6 = 10 over 2 tokens.
EXPECTED = {
    "token-mean": (6 + 10) / 5,  # 3.2
    "seq-mean-token-sum": (6 + 10) / 2,  # 8.0
    "seq-mean-token-mean": (6 / 3 + 10 / 2) / 2,  # 3.5
    "seq-mean-token-sum-norm": (6 / 4 + 10 / 4) / 2,  # 2.0, horizon = T = 4
}

OBJECTIVES = {
    "drpo-0.2": lambda mode: DRPO(delta=0.2, loss_agg_mode=mode),
    "drpo-12.5": lambda mode: DRPO(delta=12.5, loss_agg_mode=mode),
    "dppo-tv": lambda mode: DPPO(divergence="tv", loss_agg_mode=mode),
    "dppo-kl": lambda mode: DPPO(divergence="kl", delta_low=0.05, delta_high=0.05, loss_agg_mode=mode),
    "ppo-dual": lambda mode: PPO(clip_high=0.28, dual_clip=3.0, loss_agg_mode=mode),
}


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_hand_values(mode):
    assert aggregate(LOSSES, MASK, mode).item() == pytest.approx(EXPECTED[mode], rel=1e-12)


def test_sum_norm_uses_fixed_horizon():
    # Dr. GRPO divides by a constant (max_new_tokens), not by the padded length of this batch.
    value = aggregate(LOSSES, MASK, "seq-mean-token-sum-norm", horizon=8)
    assert value.item() == pytest.approx((6 / 8 + 10 / 8) / 2, rel=1e-12)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objective_aggregates_its_token_losses(objective, mode):
    # On-policy (z = y, so r = 1) every objective's token loss is exactly -A: per-token advantages -LOSSES
    # make the token losses LOSSES, and the objective must reduce them like `aggregate`.
    logprobs = torch.full((3, 4), -0.7, dtype=torch.float64, requires_grad=True)
    out = OBJECTIVES[objective](mode)(
        logprobs=logprobs, old_logprobs=logprobs.detach().clone(), advantages=-LOSSES, mask=MASK
    )
    assert out.loss.item() == pytest.approx(EXPECTED[mode], rel=1e-12)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_objective_horizon_argument(mode):
    logprobs = torch.full((3, 4), -0.7, dtype=torch.float64)
    out = PPO(loss_agg_mode=mode, loss_agg_horizon=8)(
        logprobs=logprobs, old_logprobs=logprobs, advantages=-LOSSES, mask=MASK
    )
    expected = (6 / 8 + 10 / 8) / 2 if mode == "seq-mean-token-sum-norm" else EXPECTED[mode]
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)


def test_counts():
    assert aggregation_count(MASK, "token-mean").item() == 5
    for mode in AGG_MODES[1:]:
        assert aggregation_count(MASK, mode).item() == 2  # the empty row is not a sequence


@pytest.mark.parametrize("mode", AGG_MODES)
def test_all_padding_minibatch_contributes_zero(mode):
    logprobs = torch.zeros(2, 3, requires_grad=True)
    out = DRPO(delta=0.2, loss_agg_mode=mode)(
        logprobs=logprobs,
        old_logprobs=torch.full((2, 3), -1.0),
        advantages=torch.ones(2),
        mask=torch.zeros(2, 3),
    )
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert (logprobs.grad == 0).all()


def _random_batch(seed: int, batch: int = 7, length: int = 9):
    gen = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(batch, length, generator=gen)
    new = (old + 0.5 * torch.randn(batch, length, generator=gen)).clamp(max=0)  # a mix of kept/clipped/masked
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[3] = 0  # one empty completion
    mask = (torch.arange(length) < lengths[:, None]).float()
    return new, old, torch.randn(batch, generator=gen), mask


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_split_invariance(objective, mode):
    """Minibatch losses normalised by the global count sum to the full-batch loss; gradients add up too."""
    make = OBJECTIVES[objective]
    logprobs, old, advantages, mask = _random_batch(seed=sum(map(ord, objective + mode)))

    full_logprobs = logprobs.clone().requires_grad_()
    full = make(mode)(logprobs=full_logprobs, old_logprobs=old, advantages=advantages, mask=mask)
    full.loss.backward()

    splits = [slice(0, 2), slice(2, 3), slice(3, 4), slice(4, 7)]  # uneven, one all-padding minibatch
    counter = make(mode)
    global_count = sum(counter.count(mask[s]) for s in splits)
    assert global_count == counter.count(mask)

    split_logprobs = logprobs.clone().requires_grad_()
    total = torch.zeros(())
    for s in splits:
        out = make(mode)(
            logprobs=split_logprobs[s],
            old_logprobs=old[s],
            advantages=advantages[s],
            mask=mask[s],
            global_count=global_count,
        )
        out.loss.backward()  # one backward per minibatch, as the trainer does: gradients accumulate
        total = total + out.loss.detach()

    torch.testing.assert_close(total, full.loss.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(split_logprobs.grad, full_logprobs.grad, rtol=1e-6, atol=1e-6)
    assert full_logprobs.grad.abs().sum() > 0  # the comparison is not vacuous


@pytest.mark.parametrize("mode", AGG_MODES)
def test_local_count_is_default(mode):
    logprobs, old, advantages, mask = _random_batch(seed=3)
    objective = DRPO(delta=0.2, loss_agg_mode=mode)
    implicit = objective(logprobs=logprobs, old_logprobs=old, advantages=advantages, mask=mask).loss
    explicit = objective(
        logprobs=logprobs,
        old_logprobs=old,
        advantages=advantages,
        mask=mask,
        global_count=objective.count(mask),
    ).loss
    assert implicit.item() == explicit.item()
