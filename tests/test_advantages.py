"""Advantage estimators: hand-computed values, edge cases, invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drpo_lightning.advantages.base import AdvantageEstimator
from drpo_lightning.advantages.dr_grpo import DrGRPOAdvantage
from drpo_lightning.advantages.grpo import GRPOAdvantage
from drpo_lightning.advantages.reinforce_pp import ReinforcePlusPlusAdvantage
from drpo_lightning.advantages.rloo import RLOOAdvantage
from drpo_lightning.registry import ADVANTAGES

R = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
G = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])

ALL = [GRPOAdvantage, DrGRPOAdvantage, RLOOAdvantage, ReinforcePlusPlusAdvantage]


def test_registered_by_entry_points():
    expected = {
        "grpo": GRPOAdvantage,
        "dr_grpo": DrGRPOAdvantage,
        "rloo": RLOOAdvantage,
        "reinforce_pp": ReinforcePlusPlusAdvantage,
    }
    for name, cls in expected.items():
        assert ADVANTAGES.get(name) is cls
        assert issubclass(cls, AdvantageEstimator)


def test_grpo_hand_values():
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3); (1 - 0.5) / sqrt(1/3) = sqrt(3)/2
    a = GRPOAdvantage(epsilon=0.0)(R, G)
    s = math.sqrt(3) / 2
    torch.testing.assert_close(a, torch.tensor([s, -s, -s, s, 0, 0, 0, 0]), rtol=0, atol=1e-6)
    assert a.dtype == torch.float32


def test_grpo_population_std_and_epsilon():
    # population std of [1, 0, 0, 1] is 0.5 -> 0.5 / (0.5 + 0.5) = 0.5 with epsilon 0.5
    a = GRPOAdvantage(epsilon=0.5, std_unbiased=False)(R, G)
    torch.testing.assert_close(a, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    # default epsilon is tiny: close to 0.5 / 0.5 = 1
    a = GRPOAdvantage(std_unbiased=False)(R, G)
    torch.testing.assert_close(a[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), rtol=0, atol=1e-5)


def test_dr_grpo_hand_values():
    a = DrGRPOAdvantage()(R, G)
    assert a.tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]


def test_rloo_hand_values():
    # reward 1: others are (0, 0, 1) -> 1 - 1/3 = 2/3; reward 0: others (0, 1, 1) -> 0 - 2/3
    a = RLOOAdvantage()(R, G)
    t = 2 / 3
    torch.testing.assert_close(a, torch.tensor([t, -t, -t, t, 0, 0, 0, 0]))
    # unequal group sizes: [3, 1, 2] -> 3 - 1.5, 1 - 2.5, 2 - 2; singleton -> 0
    a = RLOOAdvantage()(torch.tensor([3.0, 1.0, 2.0, 7.0], dtype=torch.float64), torch.tensor([5, 5, 5, 9]))
    assert a.tolist() == [1.5, -1.5, 0.0, 0.0]


def test_group_estimators_declare_they_need_two_samples_per_prompt():
    assert GRPOAdvantage.min_group_size == DrGRPOAdvantage.min_group_size == RLOOAdvantage.min_group_size == 2
    assert ReinforcePlusPlusAdvantage.min_group_size == AdvantageEstimator.min_group_size == 1
    assert ReinforcePlusPlusAdvantage.uses_lengths and not GRPOAdvantage.uses_lengths


def reinforce_pp_reference(rewards, ids, lengths=None, epsilon=1e-6):
    """REINFORCE++-baseline written out in Python floats: group baseline (0 for a lone sample), then whitening
    with the token-weighted mean and unbiased token-weighted variance."""
    rewards, ids = [float(r) for r in rewards], [int(k) for k in ids]
    lengths = [1.0] * len(rewards) if lengths is None else [float(n) for n in lengths]
    members: dict[int, list[float]] = {}
    for r, k in zip(rewards, ids):
        members.setdefault(k, []).append(r)
    centred = [r - (sum(members[k]) / len(members[k]) if len(members[k]) > 1 else 0.0) for r, k in zip(rewards, ids)]
    tokens = sum(lengths)
    if tokens <= 1 or len(set(c for n, c in zip(lengths, centred) if n > 0)) <= 1:
        return [0.0] * len(rewards)  # nothing to whiten
    mean = sum(n * c for n, c in zip(lengths, centred)) / tokens
    var = sum(n * (c - mean) ** 2 for n, c in zip(lengths, centred)) / (tokens - 1)
    return [(c - mean) / (math.sqrt(var) + epsilon) for c in centred]


def test_reinforce_pp_token_whitening_hand_values():
    # A' = [.5, -.5, -.5, .5, 0, 0, 0, 0]; tokens [4, 1, 1, 4, 2, 2, 2, 2] = 18; token mean 3/18 = 1/6;
    # deviations 1/3, -2/3, -2/3, 1/3, -1/6 x4; sum of n * dev^2 = 8/9 + 8/9 + 2/9 = 2; var 2/17.
    lengths = torch.tensor([4, 1, 1, 4, 2, 2, 2, 2])
    a = ReinforcePlusPlusAdvantage(epsilon=0.0)(R.double(), G, lengths=lengths)
    k = math.sqrt(17 / 2)
    expected = torch.tensor([k / 3, -2 * k / 3, -2 * k / 3, k / 3] + [-k / 6] * 4, dtype=torch.float64)
    torch.testing.assert_close(a, expected, rtol=1e-12, atol=1e-12)
    # The all-equal group moves with the token mean, as in the reference implementations (not 0).
    assert a[4:].tolist() == [a[4].item()] * 4 and a[4] < -0.4
    # A lone sample has baseline 0: A' = [3, .5, -.5], tokens [2, 1, 1], mean 6/4, var (4.5 + 1 + 4) / 3.
    a = ReinforcePlusPlusAdvantage(epsilon=0.0)(torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64),
                                                torch.tensor([0, 1, 1]), lengths=torch.tensor([2, 1, 1]))
    sd = math.sqrt(9.5 / 3)
    torch.testing.assert_close(a, torch.tensor([1.5, -1.0, -2.0], dtype=torch.float64) / sd, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_reinforce_pp_matches_the_reference_formula(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, 3, 4, 1, 2, 5]
    ids = torch.tensor([g * 7 for g, n in enumerate(sizes) for _ in range(n)])[torch.randperm(16, generator=gen)]
    rewards = torch.randn(16, generator=gen, dtype=torch.float64)
    rewards[ids == 14] = 0.25  # one all-equal group
    lengths = torch.randint(0, 50, (16,), generator=gen)
    for weights in (lengths, None):
        expected = torch.tensor(reinforce_pp_reference(rewards, ids, weights), dtype=torch.float64)
        out = ReinforcePlusPlusAdvantage()(rewards, ids, lengths=weights)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        out32 = ReinforcePlusPlusAdvantage()(rewards.float(), ids, lengths=weights)
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32.double(), expected, rtol=1e-5, atol=1e-5)
    # No lengths is the same as one token each.
    torch.testing.assert_close(ReinforcePlusPlusAdvantage()(rewards, ids),
                               ReinforcePlusPlusAdvantage()(rewards, ids, lengths=torch.ones(16)), rtol=0, atol=0)


def test_reinforce_pp_all_equal_values_and_bad_lengths():
    est = ReinforcePlusPlusAdvantage(epsilon=0.0)
    # Lone samples with equal rewards: A' all 0.1, whose weighted mean is not 0.1 bit for bit: exactly 0.
    out = est(torch.full((3,), 0.1, dtype=torch.float64), torch.arange(3), lengths=torch.tensor([1, 2, 3]))
    assert out.tolist() == [0.0, 0.0, 0.0]
    assert est(torch.tensor([4.0]), torch.tensor([7]), lengths=torch.tensor([1])).tolist() == [0.0]
    with pytest.raises(ValueError, match="lengths must be a tensor of shape"):
        est(R, G, lengths=torch.ones(3))
    with pytest.raises(ValueError, match="lengths must be finite token counts"):
        est(R, G, lengths=torch.tensor([1.0, -1, 1, 1, 1, 1, 1, 1]))


def test_reinforce_pp_hand_values():
    # group-centred: [.5, -.5, -.5, .5, 0, 0, 0, 0]; batch unbiased std = sqrt(1 / 7); .5 * sqrt(7)
    a = ReinforcePlusPlusAdvantage(epsilon=0.0)(R, G)
    s = 0.5 * math.sqrt(7)
    torch.testing.assert_close(a, torch.tensor([s, -s, -s, s, 0, 0, 0, 0]))
    # normalisation is over the batch: a second informative group changes the first group's scale
    r2 = torch.cat([R[:4], torch.tensor([3.0, 1.0, 3.0, 1.0])])
    a2 = ReinforcePlusPlusAdvantage(epsilon=0.0)(r2, G)
    # centred [.5, -.5, -.5, .5, 1, -1, 1, -1]: sum of squares 5, std sqrt(5/7)
    sd = math.sqrt(5 / 7)
    torch.testing.assert_close(a2, torch.tensor([0.5, -0.5, -0.5, 0.5, 1, -1, 1, -1]) / sd)


@pytest.mark.parametrize("cls", ALL)
def test_constant_groups_give_exact_zero(cls):
    # 0.1 * 3 is not 0.3 in floating point: the mean of a constant group must still cancel exactly
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.3, 0.9], dtype=torch.float64)
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    for eps in (0.0, 1e-6):
        est = cls(epsilon=eps) if cls in (GRPOAdvantage, ReinforcePlusPlusAdvantage) else cls()
        a = est(r, g)
        assert torch.isfinite(a).all()
        if cls is ReinforcePlusPlusAdvantage:
            # Shifted by the batch mean of the centred rewards, which is 0 up to rounding here.
            assert (a[:6].abs() < 1e-15).all()
        else:
            assert (a[:6] == 0).all()
        assert (a[6:] != 0).all()
        # all groups constant -> all zero, no NaN even with epsilon 0
        a = est(torch.full((6,), 0.1), torch.tensor([0, 0, 0, 1, 1, 1]))
        assert (a == 0).all()


@pytest.mark.parametrize("cls", ALL)
def test_singletons_and_empty(cls):
    a = cls()(torch.tensor([3.0, -2.0, 5.0], dtype=torch.float64), torch.tensor([0, 1, 2]))
    if cls is ReinforcePlusPlusAdvantage:
        # baseline 0 for lone samples: [3, -2, 5] whitened, mean 2, unbiased variance 26 / 2
        expected = [d / (math.sqrt(13) + 1e-6) for d in (1.0, -4.0, 3.0)]
        torch.testing.assert_close(a, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    else:
        assert a.tolist() == [0.0, 0.0, 0.0]
    a = cls()(torch.tensor([4.0]), torch.tensor([7]))
    assert a.tolist() == [0.0]
    a = cls()(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert a.shape == (0,)


@pytest.mark.parametrize("cls", ALL)
def test_non_contiguous_unsorted_group_ids(cls):
    # same data as (R, G) with groups renamed 0 -> 17, 1 -> 3 and rows shuffled
    perm = torch.tensor([4, 0, 7, 1, 2, 5, 3, 6])
    ids = torch.where(G == 0, 17, 3)
    ref = cls()(R, G)
    out = cls()(R[perm], ids[perm])
    torch.testing.assert_close(out, ref[perm])


@pytest.mark.parametrize("cls", ALL)
def test_float64_matches_python_reference(cls):
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(24, generator=gen, dtype=torch.float64)
    g = torch.tensor([0] * 5 + [4] * 8 + [2] * 3 + [9] * 8)
    out = cls()(r, g)
    assert out.dtype == torch.float64
    rows = r.tolist()
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(g.tolist()):
        groups.setdefault(k, []).append(i)
    ref = [0.0] * len(rows)
    for idx in groups.values():
        vals = [rows[i] for i in idx]
        n = len(vals)
        mean = sum(vals) / n
        for i in idx:
            if cls is GRPOAdvantage:
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
                ref[i] = (rows[i] - mean) / (std + 1e-6)
            elif cls is RLOOAdvantage:
                ref[i] = rows[i] - (sum(vals) - rows[i]) / (n - 1)
            else:
                ref[i] = rows[i] - mean
    if cls is ReinforcePlusPlusAdvantage:
        m = sum(ref) / len(ref)
        sd = math.sqrt(sum((x - m) ** 2 for x in ref) / (len(ref) - 1))
        ref = [(x - m) / (sd + 1e-6) for x in ref]
    torch.testing.assert_close(out, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", ALL)
def test_integer_rewards_and_int32_ids(cls):
    out = cls()(torch.tensor([1, 0, 0, 1]), torch.tensor([0, 0, 1, 1], dtype=torch.int32))
    assert out.dtype == torch.get_default_dtype()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("cls", [GRPOAdvantage, ReinforcePlusPlusAdvantage])
@pytest.mark.parametrize("eps", [-1e-6, float("nan"), float("inf")])
def test_bad_epsilon(cls, eps):
    with pytest.raises(ValueError, match="epsilon"):
        cls(epsilon=eps)


@pytest.mark.parametrize("cls", ALL)
def test_bad_inputs(cls):
    est = cls()
    with pytest.raises(ValueError, match="shape"):
        est(torch.zeros(4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        est(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        est(torch.zeros(2), torch.zeros(2))
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="finite.*index 1"):
            est(torch.tensor([0.0, bad, 1.0]), torch.tensor([0, 0, 0]))


_groups = st.lists(
    st.tuples(
        st.integers(0, 1000),
        st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=6),
    ),
    min_size=1,
    max_size=5,
    unique_by=lambda t: t[0],
)


@settings(max_examples=60, deadline=None)
@given(_groups)
def test_property_finite_and_zero_group_mean(groups):
    rewards = torch.tensor([v for _, vals in groups for v in vals], dtype=torch.float64)
    ids = torch.tensor([k for k, vals in groups for _ in vals])
    for est in (GRPOAdvantage(), DrGRPOAdvantage(), RLOOAdvantage(), ReinforcePlusPlusAdvantage()):
        a = est(rewards, ids)
        assert a.shape == rewards.shape
        assert torch.isfinite(a).all()
        if isinstance(est, ReinforcePlusPlusAdvantage):
            continue  # centred per group too, but scaled by a batch statistic; covered below
        for k, vals in groups:
            sel = a[ids == k]
            scale = max(1.0, max(abs(v) for v in vals))
            assert abs(sel.mean().item()) <= 1e-9 * scale * (1e6 if isinstance(est, GRPOAdvantage) else 1)
            if len(set(vals)) == 1:
                assert (sel == 0).all()
    a = ReinforcePlusPlusAdvantage()(rewards, ids)
    torch.testing.assert_close(a, torch.tensor(reinforce_pp_reference(rewards, ids), dtype=torch.float64),
                               rtol=1e-9, atol=1e-9)
    for k, vals in groups:
        if len(vals) > 1 and len(set(vals)) == 1:
            assert (a[ids == k] == a[ids == k][0]).all()  # every all-equal group gets the same shift
