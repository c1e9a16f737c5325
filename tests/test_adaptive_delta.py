"""DRPO's adaptive delta (``target_divergence``): the controller's rule, its bounds, the delta the loss uses,
its state, and its argument checks. Values are derived by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from drpo_lightning.objectives.drpo import DRPO


def _feed(objective: DRPO, shift: float, tokens: int = 6) -> None:
    """One minibatch whose valid tokens all moved by ``shift`` in probability: mu = 0.5, pi = 0.5 + shift.
    The last column is padding with a huge shift, which must not count."""
    mu = torch.full((2, tokens // 2 + 1), 0.5, dtype=torch.float64)
    pi = mu + shift
    pi[:, -1] = 0.99
    mask = torch.ones_like(mu)
    mask[:, -1] = 0
    objective(logprobs=pi.log().requires_grad_(), old_logprobs=mu.log(), advantages=torch.ones(2, dtype=torch.float64),
              mask=mask)


def test_delta_halves_above_1_5x_target_doubles_below_target_over_1_5_and_holds_between():
    drpo = DRPO(delta=0.2, target_divergence=0.01)
    _feed(drpo, 0.016)  # 0.016 > 1.5 * 0.01
    assert drpo.end_rollout()["drpo/measured_divergence"].item() == pytest.approx(0.016, abs=1e-12)
    assert drpo.delta == pytest.approx(0.1)
    _feed(drpo, 0.006)  # 0.006 < 0.01 / 1.5 = 0.00667
    drpo.end_rollout()
    assert drpo.delta == pytest.approx(0.2)
    for shift in (0.0145, 0.0068, 0.01):  # inside [0.00667, 0.015]: no move
        _feed(drpo, shift)
        drpo.end_rollout()
        assert drpo.delta == pytest.approx(0.2)


def test_the_measure_is_the_token_mean_over_every_minibatch_since_the_last_call():
    drpo = DRPO(delta=0.2, target_divergence=0.01)
    _feed(drpo, 0.02, tokens=6)  # 6 tokens at 0.02
    _feed(drpo, 0.002, tokens=2)  # 2 tokens at 0.002 -> (6 * 0.02 + 2 * 0.002) / 8 = 0.0155
    assert drpo.end_rollout()["drpo/measured_divergence"].item() == pytest.approx(0.0155, abs=1e-12)
    assert drpo.delta == pytest.approx(0.1)  # 0.0155 > 0.015
    assert drpo.end_rollout() == {} and drpo.delta == pytest.approx(0.1)  # nothing measured: no move


def test_delta_stays_within_its_bounds():
    drpo = DRPO(delta=0.2, target_divergence=0.01, delta_min=0.05, delta_max=0.5)
    for expected in (0.1, 0.05, 0.05):
        _feed(drpo, 0.5)
        drpo.end_rollout()
        assert drpo.delta == pytest.approx(expected)
    for expected in (0.1, 0.2, 0.4, 0.5, 0.5):
        _feed(drpo, 0.0)
        drpo.end_rollout()
        assert drpo.delta == pytest.approx(expected)


def test_every_rank_decides_on_the_sum_over_ranks():
    """Rank 0 measured 0.006 on 6 tokens; the other rank (simulated by the reduction) 0.03 on 6 tokens: the
    global mean 0.018 > 0.015 halves delta, though rank 0 alone would have doubled it."""
    drpo = DRPO(delta=0.2, target_divergence=0.01)
    _feed(drpo, 0.006)
    seen = []

    def reduce_sum(totals: torch.Tensor) -> torch.Tensor:
        seen.append(totals.clone())
        return totals + torch.tensor([6 * 0.03, 6.0], dtype=totals.dtype)

    assert drpo.end_rollout(reduce_sum)["drpo/measured_divergence"].item() == pytest.approx(0.018, abs=1e-12)
    assert seen[0].tolist() == pytest.approx([6 * 0.006, 6.0], abs=1e-12)
    assert drpo.delta == pytest.approx(0.1)


def test_the_loss_uses_the_current_delta():
    """One token, A = 1, mu = 0.5, pi = 0.6 (r = 1.2): loss = -A r + |A| mu (r - 1)^2 / (2 delta)
    = -1.2 + 0.5 * 0.04 / (2 delta): -1.15 at delta 0.2, -1.1 at delta 0.1 (after one halving)."""
    drpo = DRPO(delta=0.2, target_divergence=0.01)

    def loss() -> float:
        out = drpo(logprobs=torch.tensor([[math.log(0.6)]], dtype=torch.float64),
                   old_logprobs=torch.tensor([[math.log(0.5)]], dtype=torch.float64),
                   advantages=torch.ones(1, dtype=torch.float64), mask=torch.ones(1, 1, dtype=torch.float64))
        assert out.metrics["drpo/delta"].item() == pytest.approx(drpo.delta)
        return out.loss.item()

    assert loss() == pytest.approx(-1.15, abs=1e-12)
    drpo.end_rollout()  # measured 0.1 > 0.015
    assert loss() == pytest.approx(-1.1, abs=1e-12)


def test_state_round_trip_and_a_fixed_delta_has_no_state():
    drpo = DRPO(delta=0.2, target_divergence=0.01)
    _feed(drpo, 0.5)
    drpo.end_rollout()
    fresh = DRPO(delta=0.2, target_divergence=0.01)
    fresh.load_state_dict(drpo.state_dict())
    assert drpo.state_dict() == {"delta": pytest.approx(0.1)} and fresh.delta == pytest.approx(0.1)
    fixed = DRPO(delta=0.2)
    assert fixed.state_dict() == {} and fixed.end_rollout() == {}
    fixed.load_state_dict({"delta": 0.1})  # a fixed delta is the config's: a checkpoint does not move it
    assert fixed.delta == 0.2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target_divergence": 0.0}, "target_divergence must be > 0"),
    ({"target_divergence": float("nan")}, "target_divergence must be a finite number"),
    ({"target_divergence": 0.01, "delta": 0.2, "delta_min": 0.3}, "must lie within [delta_min, delta_max]"),
    ({"target_divergence": 0.01, "delta": 20.0}, "must lie within [delta_min, delta_max]"),
    ({"delta_min": -1.0}, "delta_min must be > 0"),
])
def test_bad_adaptive_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=rf"^.*{__import__('re').escape(message)}"):
        DRPO(**kwargs)
