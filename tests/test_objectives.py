"""Numerics of the built-in objectives (DRPO, DPPO, PPO) through their public call.

Per-token conventions: z = log pi_theta (the leaf we differentiate), y = log mu (anchor), r = exp(z - y), A the
advantage. "grad" is d loss / d z for one token with token-mean aggregation, i.e. the per-token gradient.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from drpo_lightning.objectives.base import LOG_RATIO_CLAMP
from drpo_lightning.objectives.dppo import DPPO
from drpo_lightning.objectives.drpo import DRPO
from drpo_lightning.objectives.ppo import PPO
from drpo_lightning.registry import OBJECTIVES

_IN_REPO = Path(__file__).parent / "data" / "objective_cases.json"
_SHARED = Path(__file__).parents[2] / "shared" / "reference" / "objective_cases.json"
CASES_PATH = _IN_REPO if _IN_REPO.exists() else _SHARED
CASES = [c for c in json.loads(CASES_PATH.read_text())["cases"] if c["objective"] != "spo"]
# The reference DPPO values are those of the untruncated estimator (pi 0.01 / mu 0.0001 has r = 100, past the
# default ratio_cap of 20): the cases pass ratio_cap=None explicitly, the cap has its own tests.
REFERENCE_DEFAULTS = {"dppo": {"ratio_cap": None}}

# (rtol, atol) per dtype; the atol only matters for gradients that are exactly zero.
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-9, 1e-12)}

# Every configuration the finiteness properties must hold for.
ALL_CONFIGS = [
    ("drpo", {"delta": 0.2}),
    ("drpo", {"delta": 12.5}),
    ("dppo", {"divergence": "tv"}),
    ("dppo", {"divergence": "kl", "delta_low": 0.05, "delta_high": 0.05}),
    ("dppo", {"divergence": "tv", "ratio_cap": 2.0}),
    ("dppo", {"divergence": "topk", "topk": 3}),
    ("dppo", {"divergence": "topk", "topk": 3, "topk_sampled_bucket": True}),
    ("dppo", {"divergence": "topk_kl", "topk": 3, "delta_low": 0.05, "delta_high": 0.05}),
    ("dppo", {"divergence": "tv", "ratio_cap": None}),
    ("ppo", {}),
    ("ppo", {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0}),
]


def one_token(name: str, params: dict, pi: float, mu: float, advantage: float, dtype=torch.float64):
    """Loss and d loss / d log pi for a single token through the registry and the public call."""
    objective = OBJECTIVES.get(name)(**params)
    # Log-probs are taken in float64 and then rounded, as a model's float32 log-softmax would be.
    logprobs = torch.tensor([[math.log(pi)]], dtype=torch.float64).to(dtype).requires_grad_()
    old_logprobs = torch.tensor([[math.log(mu)]], dtype=torch.float64).to(dtype)
    out = objective(
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        advantages=torch.tensor([[advantage]], dtype=dtype),
        mask=torch.ones(1, 1, dtype=dtype),
    )
    out.loss.backward()
    return out, logprobs.grad


def assert_value(actual: torch.Tensor, expected: float, dtype: torch.dtype) -> None:
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.reshape(()), torch.tensor(expected, dtype=dtype), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "case",
    CASES,
    ids=[f"{c['objective']}-{c['params']}-pi{c['pi']}-mu{c['mu']}-A{c['advantage']}" for c in CASES],
)
def test_reference_cases(case, dtype):
    params = {**REFERENCE_DEFAULTS.get(case["objective"], {}), **case["params"]}
    out, grad = one_token(case["objective"], params, case["pi"], case["mu"], case["advantage"], dtype)
    if case["loss"] is not None:
        assert_value(out.loss, case["loss"], dtype)
    assert_value(grad, case["grad"], dtype)


def test_reference_copy_matches_shared():
    """The in-repo copy must not drift from the shared reference when both are present."""
    if not (_IN_REPO.exists() and _SHARED.exists()):
        pytest.skip("only one copy of objective_cases.json is available")
    assert json.loads(_IN_REPO.read_text()) == json.loads(_SHARED.read_text())


# --------------------------------------------------------------------------------- hand-derived extras
# Each value is worked out in the comment; all stay clear of the mask/clip boundaries.
HAND_CASES = [
    # DRPO: loss = -A r + |A| mu (r-1)^2 / (2 delta); grad = -A r w, w = 1 - sign(A(r-1)) |pi-mu| / delta.
    # r = 1.2: loss = -1.2 + 0.5*0.04/0.4 = -1.15; w = 1 - 0.1/0.2 = 0.5, grad = -1.2*0.5 = -0.6.
    ("drpo", {"delta": 0.2}, 0.6, 0.5, 1.0, -1.15, -0.6),
    # r = 0.5, moving back (A>0, r<1): loss = -0.25 + 0.5*0.4*0.25/1.0 = -0.2; w = 1 + 0.2/0.5 = 1.4,
    # grad = -0.5*0.5*1.4 = -0.35.
    ("drpo", {"delta": 0.5}, 0.2, 0.4, 0.5, -0.2, -0.35),
    # r = 1.5, A<0 moving back: loss = 3 + 2*0.6*0.25/0.5 = 3.6; w = 1 + 0.3/0.25 = 2.2, grad = 2*1.5*2.2 = 6.6.
    ("drpo", {"delta": 0.25}, 0.9, 0.6, -2.0, 3.6, 6.6),
    # A = 0: nothing to learn, no regulariser either (it is scaled by |A|).
    ("drpo", {"delta": 0.2}, 0.9, 0.3, 0.0, 0.0, 0.0),
    # delta = 12.5, far beyond: r = 3, loss = -3 + 0.3*4/25 = -2.952; w = 1 - 0.6/12.5 = 0.952, grad -2.856.
    ("drpo", {"delta": 12.5}, 0.9, 0.3, 1.0, -2.952, -2.856),
    # PPO clip-higher: r = 1.3 > 1.28 with A>0 -> loss -1.28, no gradient.
    ("ppo", {"clip_low": 0.2, "clip_high": 0.28}, 0.65, 0.5, 1.0, -1.28, 0.0),
    # r = 0.7 < 0.8 with A<0 -> loss -A*0.8 = 1.6, no gradient.
    ("ppo", {"clip_low": 0.2, "clip_high": 0.28}, 0.35, 0.5, -2.0, 1.6, 0.0),
    # r = 4 with A<0 and no dual clip: loss = -A r = 4, gradient -A r = 4.
    ("ppo", {}, 0.4, 0.1, -1.0, 4.0, 4.0),
    # ... with dual_clip 5 > r nothing changes; with 3 < r the loss is capped at 3 and the gradient vanishes.
    ("ppo", {"dual_clip": 5.0}, 0.4, 0.1, -1.0, 4.0, 4.0),
    ("ppo", {"dual_clip": 3.0}, 0.4, 0.1, -1.0, 3.0, 0.0),
    # r = 0.7 < 0.8 with A>0: the unclipped term is the max -> loss = grad = -0.7.
    ("ppo", {}, 0.35, 0.5, 1.0, -0.7, -0.7),
    # DPPO-TV, asymmetric: D = 0.12 > delta_high = 0.1 moving up with A>0 -> masked.
    ("dppo", {"delta_high": 0.1, "delta_low": 0.3}, 0.62, 0.5, 1.0, 0.0, 0.0),
    # Same token with A<0: moving up is moving back for A<0, never masked: grad = -A r = 1.24.
    ("dppo", {"delta_high": 0.1, "delta_low": 0.3}, 0.62, 0.5, -1.0, 1.24, 1.24),
    # A<0 moving down by D = 0.2 < delta_low = 0.3: kept, grad = r = 0.6; by 0.35 > 0.3: masked.
    ("dppo", {"delta_high": 0.1, "delta_low": 0.3}, 0.3, 0.5, -1.0, 0.6, 0.6),
    ("dppo", {"delta_high": 0.1, "delta_low": 0.3}, 0.15, 0.5, -1.0, 0.0, 0.0),
    # ratio_cap 2: A<0 with r = 3 moving back (kept): grad = -A min(r, 2) = 2, loss -A min(r, C) = 2.
    ("dppo", {"ratio_cap": 2.0}, 0.3, 0.1, -1.0, 2.0, 2.0),
    # ratio_cap 2 with r = 1.5 < 2, D = 0.05 < 0.15: untouched, grad = -1.5.
    ("dppo", {"ratio_cap": 2.0}, 0.15, 0.1, 1.0, -1.5, -1.5),
    # Binary-KL: D = 0.1 ln(0.1/0.2) + 0.9 ln(0.9/0.8) = 0.03669 < 0.05 -> kept, grad = -r = -2 ...
    ("dppo", {"divergence": "kl", "delta_low": 0.05, "delta_high": 0.05}, 0.2, 0.1, 1.0, -2.0, -2.0),
    # ... and > 0.03 -> masked.
    ("dppo", {"divergence": "kl", "delta_low": 0.03, "delta_high": 0.03}, 0.2, 0.1, 1.0, 0.0, 0.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,params,pi,mu,advantage,loss,grad", HAND_CASES)
def test_hand_derived_cases(name, params, pi, mu, advantage, loss, grad, dtype):
    out, actual_grad = one_token(name, params, pi, mu, advantage, dtype)
    assert_value(out.loss, loss, dtype)
    assert_value(actual_grad, grad, dtype)


def test_binary_kl_value_of_hand_case():
    out, _ = one_token("dppo", {"divergence": "kl", "delta_low": 0.05, "delta_high": 0.05}, 0.2, 0.1, 1.0)
    expected = 0.1 * math.log(0.1 / 0.2) + 0.9 * math.log(0.9 / 0.8)
    assert out.metrics["dppo/divergence_mean"].item() == pytest.approx(expected, rel=1e-12)


def test_drpo_metrics_hand_values():
    # Three tokens with delta = 0.2, one padded:
    #   pi .6 mu .5 A  1 -> away,  |d| .1 -> w = 0.5
    #   pi .8 mu .5 A  1 -> away,  |d| .3 -> w = -0.5 (corrective, beyond the boundary)
    #   pi .3 mu .5 A  1 -> back,  |d| .2 -> w = 2.0
    #   pi .9 mu .1 A -1 -> padded, must not count
    logprobs = torch.tensor([[0.6, 0.8, 0.3, 0.9]], dtype=torch.float64).log().requires_grad_()
    old = torch.tensor([[0.5, 0.5, 0.5, 0.1]], dtype=torch.float64).log()
    out = DRPO(delta=0.2)(
        logprobs=logprobs,
        old_logprobs=old,
        advantages=torch.tensor([[1.0, 1.0, 1.0, -1.0]], dtype=torch.float64),
        mask=torch.tensor([[1, 1, 1, 0]], dtype=torch.float64),
    )
    assert out.metrics["drpo/weight_mean"].item() == pytest.approx((0.5 - 0.5 + 2.0) / 3, rel=1e-12)
    assert out.metrics["drpo/corrective_frac"].item() == pytest.approx(1 / 3, rel=1e-12)
    assert out.metrics["drpo/beyond_boundary_frac"].item() == pytest.approx(1 / 3, rel=1e-12)
    # The autograd gradient is -A r w / 3 (token-mean over 3 valid tokens), and 0 on the padded token.
    expected = torch.tensor([[-1.2 * 0.5, -1.6 * -0.5, -0.6 * 2.0, 0.0]], dtype=torch.float64) / 3
    out.loss.backward()
    torch.testing.assert_close(logprobs.grad, expected, rtol=1e-12, atol=1e-14)


def test_ppo_metrics_hand_values():
    # clip 0.2, dual 3: r = 1.4 A>0 (high clip), r = 0.6 A<0 (low clip), r = 4 A<0 (dual), r = 1.1 (none).
    pi = torch.tensor([[0.7, 0.3, 0.4, 0.55]], dtype=torch.float64)
    mu = torch.tensor([[0.5, 0.5, 0.1, 0.5]], dtype=torch.float64)
    out = PPO(dual_clip=3.0)(
        logprobs=pi.log().requires_grad_(),
        old_logprobs=mu.log(),
        advantages=torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=torch.float64),
        mask=torch.ones(1, 4, dtype=torch.float64),
    )
    assert out.metrics["ppo/clip_frac_high"].item() == pytest.approx(0.25)
    assert out.metrics["ppo/clip_frac_low"].item() == pytest.approx(0.25)
    assert out.metrics["ppo/dual_clip_frac"].item() == pytest.approx(0.25)


def test_dppo_masked_frac_hand_values():
    # TV 0.15: masked (A>0, +0.2), kept (A<0, +0.2 is moving back), masked (A<0, -0.2), kept (A>0, +0.1).
    pi = torch.tensor([[0.7, 0.7, 0.3, 0.6]], dtype=torch.float64)
    mu = torch.full((1, 4), 0.5, dtype=torch.float64)
    out = DPPO()(
        logprobs=pi.log().requires_grad_(),
        old_logprobs=mu.log(),
        advantages=torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=torch.float64),
        mask=torch.ones(1, 4, dtype=torch.float64),
    )
    assert out.metrics["dppo/masked_frac"].item() == pytest.approx(0.5)
    assert out.metrics["dppo/divergence_mean"].item() == pytest.approx((0.2 + 0.2 + 0.2 + 0.1) / 4)


# ------------------------------------------------------------------------------------------ DPPO top-K
def _topk_inputs(pi_vocab, mu_vocab, sampled, k, dtype=torch.float64):
    """Per-position inputs of the top-K divergence from full distributions ``[B, T, V]``."""
    old_topk_logprobs, topk_ids = mu_vocab.log().topk(k, dim=-1)  # [B, T, K]
    return {
        "logprobs": pi_vocab.log().gather(-1, sampled.unsqueeze(-1)).squeeze(-1).to(dtype),
        "old_logprobs": mu_vocab.log().gather(-1, sampled.unsqueeze(-1)).squeeze(-1).to(dtype),
        "old_topk_logprobs": old_topk_logprobs.to(dtype),
        "topk_logprobs": pi_vocab.log().gather(-1, topk_ids).to(dtype),
        "topk_ids": topk_ids,
        "token_ids": sampled,
    }


def _hand_topk_tv(pi: list[float], mu: list[float], sampled: int, k: int) -> float:
    """TV over {mu's top-K} | {sampled} | {everything else} (the ``topk_sampled_bucket`` form), by enumerating
    the vocabulary. The reference (Stable-RL) form is checked in tests/test_reference_parity.py."""
    top = sorted(range(len(mu)), key=lambda i: -mu[i])[:k]
    kept = set(top) | {sampled}
    other_pi = sum(p for i, p in enumerate(pi) if i not in kept)
    other_mu = sum(m for i, m in enumerate(mu) if i not in kept)
    return 0.5 * (sum(abs(pi[i] - mu[i]) for i in kept) + abs(other_pi - other_mu))


@pytest.mark.parametrize(
    "sampled,advantage,delta,expected_grad",
    [
        # Sampled token 2 is outside mu's top-2 {0, 1}: D = 0.5 * (.1 + .15 + .05 + 0) = 0.15.
        # It moved down (0.1 < 0.15): masked for A<0 when delta_low = 0.1 < D ...
        (2, -1.0, 0.1, 0.0),
        # ... kept when delta_low = 0.2 > D: grad = -A r = 0.1/0.15.
        (2, -1.0, 0.2, 0.1 / 0.15),
        # ... and never masked for A>0 (moving back): grad = -r.
        (2, 1.0, 0.1, -0.1 / 0.15),
        # Sampled token 1 is inside the top-2: set {0, 1, other}, D = 0.5 * (.1 + .15 + .05) = 0.15; counting
        # it twice would give 0.225 and mask it at delta_high = 0.2. Correct: kept, grad = -r = -1.5.
        (1, 1.0, 0.2, -1.5),
        # With delta_high = 0.1 < D it moved up with A>0: masked.
        (1, 1.0, 0.1, 0.0),
    ],
)
def test_dppo_topk_hand_case(sampled, advantage, delta, expected_grad):
    mu = [0.5, 0.3, 0.15, 0.05]
    pi = [0.4, 0.45, 0.1, 0.05]
    assert _hand_topk_tv(pi, mu, sampled, 2) == pytest.approx(0.15)
    inputs = _topk_inputs(
        torch.tensor([[pi]], dtype=torch.float64),
        torch.tensor([[mu]], dtype=torch.float64),
        torch.tensor([[sampled]]),
        2,
    )
    logprobs = inputs.pop("logprobs").requires_grad_()
    objective = DPPO(divergence="topk", topk=2, delta_low=delta, delta_high=delta, topk_sampled_bucket=True)
    assert objective.requires_topk == 2
    out = objective(
        logprobs=logprobs,
        advantages=torch.tensor([advantage], dtype=torch.float64),
        mask=torch.ones(1, 1, dtype=torch.float64),
        **inputs,
    )
    out.loss.backward()
    assert out.metrics["dppo/divergence_mean"].item() == pytest.approx(0.15, rel=1e-12)
    assert logprobs.grad.item() == pytest.approx(expected_grad, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_dppo_topk_matches_float64_enumeration(dtype):
    gen = torch.Generator().manual_seed(0)
    batch, length, vocab, k, delta = 3, 5, 12, 4, 0.1
    mu_vocab = torch.softmax(2 * torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64), -1)
    pi_vocab = torch.softmax(
        mu_vocab.log() + torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64), -1
    )
    sampled = torch.multinomial(mu_vocab.reshape(-1, vocab), 1, generator=gen).reshape(batch, length)
    sampled[0, 0] = mu_vocab[0, 0].argmax()  # make sure both the inside and the outside path run
    sampled[0, 1] = mu_vocab[0, 1].argmin()
    advantages = torch.randn(batch, length, generator=gen, dtype=torch.float64)

    expected_grad = torch.zeros(batch, length, dtype=torch.float64)
    divergences = []
    for b in range(batch):
        for t in range(length):
            pi, mu, s = pi_vocab[b, t].tolist(), mu_vocab[b, t].tolist(), int(sampled[b, t])
            d = _hand_topk_tv(pi, mu, s, k)
            divergences.append(d)
            a = advantages[b, t].item()
            assert abs(d - delta) > 1e-4, "test data landed on the boundary; change the seed"
            masked = (a > 0 and pi[s] > mu[s] and d > delta) or (a <= 0 and pi[s] < mu[s] and d > delta)
            expected_grad[b, t] = 0.0 if masked else -a * pi[s] / mu[s]
    expected_grad /= batch * length  # token-mean

    inputs = _topk_inputs(pi_vocab, mu_vocab, sampled, k, dtype)
    logprobs = inputs.pop("logprobs").requires_grad_()
    objective = DPPO(
        divergence="topk", topk=k, delta_low=delta, delta_high=delta, ratio_cap=None, topk_sampled_bucket=True
    )
    out = objective(
        logprobs=logprobs,
        advantages=advantages.to(dtype),
        mask=torch.ones(batch, length, dtype=dtype),
        **inputs,
    )
    out.loss.backward()
    assert 0 < out.metrics["dppo/masked_frac"].item() < 1  # both outcomes are exercised
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(logprobs.grad, expected_grad.to(dtype), rtol=rtol, atol=rtol * 1e-2)
    assert out.metrics["dppo/divergence_mean"].item() == pytest.approx(
        sum(divergences) / len(divergences), rel=rtol
    )


def test_dppo_topk_requires_its_inputs():
    args = {
        "logprobs": torch.zeros(1, 2),
        "old_logprobs": torch.zeros(1, 2),
        "advantages": torch.ones(1),
        "mask": torch.ones(1, 2),
    }
    top = {"topk_logprobs": torch.zeros(1, 2, 3), "old_topk_logprobs": torch.zeros(1, 2, 3)}
    ids = {
        "topk_ids": torch.zeros(1, 2, 3, dtype=torch.long),
        "token_ids": torch.zeros(1, 2, dtype=torch.long),
    }
    for divergence in ("topk", "topk_kl"):
        with pytest.raises(
            ValueError, match=r"needs the call arguments .*missing \['topk_logprobs', 'old_top"
        ):
            DPPO(divergence=divergence, topk=3)(**args)
    # The reference form needs no ids; the sampled-bucket form needs both.
    DPPO(divergence="topk", topk=3)(**args, **top)
    sampled_bucket = DPPO(divergence="topk", topk=3, topk_sampled_bucket=True)
    with pytest.raises(ValueError, match=r"missing \['token_ids'\]"):
        sampled_bucket(**args, **top, topk_ids=ids["topk_ids"])
    with pytest.raises(ValueError, match=r"old_topk_logprobs must be the shape of topk_logprobs \(1, 2, 3\)"):
        sampled_bucket(
            **args, **ids, topk_logprobs=top["topk_logprobs"], old_topk_logprobs=torch.zeros(1, 2, 4)
        )
    with pytest.raises(ValueError, match=r"topk_ids must be the shape of topk_logprobs"):
        sampled_bucket(
            **args, **top, topk_ids=torch.zeros(1, 2, 4, dtype=torch.long), token_ids=ids["token_ids"]
        )
    with pytest.raises(ValueError, match=r"token_ids must be \[B, T\]"):
        sampled_bucket(**args, **top, topk_ids=ids["topk_ids"], token_ids=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"topk_logprobs must be \[B, T, K\]"):
        sampled_bucket(
            **args, **ids, topk_logprobs=torch.zeros(1, 3, 3), old_topk_logprobs=torch.zeros(1, 3, 3)
        )


def test_requires_topk_only_for_topk_divergence():
    assert DPPO(divergence="topk", topk=7).requires_topk == 7
    assert DPPO(divergence="topk_kl", topk=5).requires_topk == 5
    assert DPPO(divergence="tv", topk=7).requires_topk == 0
    assert DRPO().requires_topk == 0 and PPO().requires_topk == 0


# ---------------------------------------------------------------------------------------- properties
@settings(max_examples=60, deadline=None)
@given(
    z=st.floats(-30, 0),
    y=st.floats(-30, 0),
    advantage=st.floats(-5, 5),
    delta=st.floats(0.05, 20),
)
def test_drpo_weight_is_bounded(z, y, advantage, delta):
    """w = grad / (-A r) stays within [1 - 1/delta, 1 + 1/delta] and equals the closed form."""
    assume(abs(advantage) > 1e-3 and abs(z - y) < LOG_RATIO_CLAMP - 0.5)
    _, grad = one_token("drpo", {"delta": delta}, math.exp(z), math.exp(y), advantage)
    ratio = math.exp(z - y)
    weight = grad.item() / (-advantage * ratio)
    slack = 1e-9 * (1 + 1 / delta)
    assert 1 - 1 / delta - slack <= weight <= 1 + 1 / delta + slack
    closed_form = 1 - math.copysign(1, advantage) * (math.exp(z) - math.exp(y)) / delta
    assert weight == pytest.approx(closed_form, rel=1e-7, abs=1e-7 / delta)


def _call(name, params, logprobs, old_logprobs, advantages, mask, seed=0):
    objective = OBJECTIVES.get(name)(**params)
    extras = {}
    if objective.requires_topk:
        # Any finite log-probs for the top-K entries: the divergence must stay finite whatever they hold.
        gen = torch.Generator().manual_seed(seed)
        shape = (*logprobs.shape, objective.requires_topk)
        extras = {
            "topk_logprobs": -60 * torch.rand(shape, generator=gen),
            "old_topk_logprobs": -60 * torch.rand(shape, generator=gen),
            "topk_ids": torch.randint(0, 5, shape, generator=gen),
            "token_ids": torch.randint(0, 5, logprobs.shape, generator=gen),
        }
    return objective(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask, **extras)


logprob_lists = st.lists(st.floats(-60, 0, width=32), min_size=6, max_size=6)


@settings(max_examples=25, deadline=None)
@given(
    z=logprob_lists,
    y=logprob_lists,
    advantages=st.lists(st.floats(-10, 10, width=32), min_size=6, max_size=6),
)
@pytest.mark.parametrize("name,params", ALL_CONFIGS)
def test_finite_loss_and_gradient_for_any_finite_input(name, params, z, y, advantages):
    logprobs = torch.tensor(z, dtype=torch.float32).reshape(2, 3).requires_grad_()
    out = _call(
        name,
        params,
        logprobs,
        torch.tensor(y, dtype=torch.float32).reshape(2, 3),
        torch.tensor(advantages, dtype=torch.float32).reshape(2, 3),
        torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
    )
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(logprobs.grad).all()
    for key, value in out.metrics.items():
        assert torch.isfinite(value), key


@pytest.mark.parametrize("name,params", ALL_CONFIGS)
def test_log_prob_gaps_of_50_nats(name, params):
    # Every combination of pi and mu at 1, e^-25 and e^-50: gaps of 0, +-25 and +-50 nats, both advantage signs.
    levels = torch.tensor([0.0, -25.0, -50.0])
    z, y = torch.meshgrid(levels, levels, indexing="ij")
    z, y = z.reshape(1, -1).repeat(2, 1), y.reshape(1, -1).repeat(2, 1)  # [2, 9]
    advantages = torch.tensor([3.0, -3.0])
    logprobs = z.clone().requires_grad_()
    out = _call(name, params, logprobs, y, advantages, torch.ones_like(z))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(logprobs.grad).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())


def test_drpo_gradient_beyond_the_clamp_is_zero_and_inside_is_exact():
    # Documented behaviour: inside |z - y| < 20 the gradient is -A r w; beyond, the token's loss is constant.
    logprobs = torch.tensor([[-1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-19.0, -22.0]], dtype=torch.float64)
    DRPO(delta=12.5)(
        logprobs=logprobs,
        old_logprobs=old,
        advantages=torch.ones(1, dtype=torch.float64),
        mask=torch.ones(1, 2, dtype=torch.float64),
    ).loss.backward()
    ratio = math.exp(18.0)
    weight = 1 - (math.exp(-1) - math.exp(-19)) / 12.5
    assert logprobs.grad[0, 0].item() == pytest.approx(-ratio * weight / 2, rel=1e-12)
    assert logprobs.grad[0, 1].item() == 0.0


# ------------------------------------------------------------------------------------- input handling
@pytest.mark.parametrize(
    "cls,kwargs,argument",
    [
        (DRPO, {"delta": 0.0}, "delta"),
        (DRPO, {"delta": -1.0}, "delta"),
        (DPPO, {"delta_low": 0.0}, "delta_low"),
        (DPPO, {"delta_high": -0.1}, "delta_high"),
        (DPPO, {"divergence": "js"}, "divergence"),
        (DPPO, {"ratio_cap": 0.0}, "ratio_cap"),
        (DPPO, {"ratio_cap": -2.0}, "ratio_cap"),
        (DPPO, {"divergence": "topk", "topk": 0}, "topk"),
        (PPO, {"clip_low": 0.0}, "clip_low"),
        (PPO, {"clip_low": 1.0}, "clip_low"),
        (PPO, {"clip_low": 1.5}, "clip_low"),
        (PPO, {"clip_high": 0.0}, "clip_high"),
        (PPO, {"dual_clip": 1.0}, "dual_clip"),
        (PPO, {"dual_clip": 0.5}, "dual_clip"),
        (DRPO, {"loss_agg_mode": "mean"}, "loss_agg_mode"),
        (PPO, {"loss_agg_horizon": 0}, "loss_agg_horizon"),
        (DPPO, {"topk_sampled_bucket": "yes"}, "topk_sampled_bucket"),
        # Issue 13: NaN and inf are refused by name for every float argument (NaN slips through any
        # comparison-based range check, inf through "> 0").
        *(
            (cls, {argument: value}, argument)
            for cls, arguments in (
                (DRPO, ("delta",)),
                (DPPO, ("delta_low", "delta_high", "ratio_cap")),
                (PPO, ("clip_low", "clip_high", "dual_clip")),
            )
            for argument in arguments
            for value in (math.nan, math.inf, -math.inf)
        ),
    ],
)
def test_bad_arguments_name_argument_and_value(cls, kwargs, argument):
    (value,) = [v for k, v in kwargs.items() if k == argument]
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    message = str(info.value)
    assert argument in message
    assert repr(value) in message


def _inputs(batch=2, length=3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return {
        "logprobs": -torch.rand(batch, length, generator=gen, dtype=dtype),
        "old_logprobs": -torch.rand(batch, length, generator=gen, dtype=dtype),
        "advantages": torch.randn(batch, generator=gen, dtype=dtype),
        "mask": torch.ones(batch, length, dtype=dtype),
    }


@pytest.mark.parametrize(
    "field,value,pattern",
    [
        (
            "old_logprobs",
            torch.zeros(2, 4),
            r"old_logprobs must have the shape of logprobs \(2, 3\), got \(2, 4\)",
        ),
        ("mask", torch.ones(3, 3), r"mask must have the shape of logprobs \(2, 3\), got \(3, 3\)"),
        ("advantages", torch.ones(3), r"advantages must be \[B\]=2 or \[B, T\]=\(2, 3\), got \(3,\)"),
        ("advantages", torch.ones(2, 4), r"advantages must be .* got \(2, 4\)"),
        ("logprobs", torch.zeros(6), r"logprobs must be \[B, T\], got shape \(6,\)"),
        (
            "mask",
            torch.tensor([[1.0, 0.5, 1.0], [1.0, 1.0, 1.0]]),
            r"mask must hold only 0 and 1, got a value 0.5",
        ),
        (
            "mask",
            torch.tensor([[1.0, 2.0, 1.0], [1.0, 1.0, 1.0]]),
            r"mask must hold only 0 and 1, got a value 2.0",
        ),
    ],
)
@pytest.mark.parametrize("cls", [DRPO, DPPO, PPO])
def test_bad_inputs(cls, field, value, pattern):
    inputs = _inputs()
    inputs[field] = value
    with pytest.raises(ValueError, match=pattern):
        cls()(**inputs)


@pytest.mark.parametrize("name,params", ALL_CONFIGS)
def test_metrics_are_detached_scalars(name, params):
    inputs = _inputs()
    logprobs = inputs.pop("logprobs").requires_grad_()
    out = _call(name, params, logprobs, **inputs)
    assert out.loss.dim() == 0 and out.loss.requires_grad
    prefix = name + "/"
    assert any(k.startswith(prefix) for k in out.metrics), f"no {prefix}* metric"
    for key, value in out.metrics.items():
        assert isinstance(value, torch.Tensor), key
        assert value.dim() == 0, key
        assert not value.requires_grad and value.grad_fn is None, key


@pytest.mark.parametrize("name,params", ALL_CONFIGS)
def test_sequence_advantages_equal_broadcast_token_advantages(name, params):
    inputs = _inputs(batch=3, length=4, dtype=torch.float64)
    inputs["mask"][1, 2:] = 0
    results = []
    for advantages in (inputs["advantages"], inputs["advantages"][:, None].expand(3, 4).clone()):
        logprobs = inputs["logprobs"].clone().requires_grad_()
        out = _call(name, params, logprobs, inputs["old_logprobs"], advantages, inputs["mask"])
        out.loss.backward()
        results.append((out.loss.detach(), logprobs.grad, out.metrics))
    (loss_a, grad_a, metrics_a), (loss_b, grad_b, metrics_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=0)
    assert metrics_a.keys() == metrics_b.keys()
    for key in metrics_a:
        torch.testing.assert_close(metrics_a[key], metrics_b[key], rtol=0, atol=0)


@pytest.mark.parametrize("name,params", ALL_CONFIGS)
def test_padding_gets_no_gradient_and_bool_mask_works(name, params):
    inputs = _inputs(dtype=torch.float64)
    float_mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    grads = []
    for mask in (float_mask, float_mask.bool()):
        logprobs = inputs["logprobs"].clone().requires_grad_()
        _call(name, params, logprobs, inputs["old_logprobs"], inputs["advantages"], mask).loss.backward()
        grads.append(logprobs.grad)
    assert (grads[0][float_mask == 0] == 0).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("name,params", ALL_CONFIGS)
def test_no_gradient_flows_into_anchor_or_advantages(name, params):
    inputs = _inputs(dtype=torch.float64)
    logprobs = inputs["logprobs"].clone().requires_grad_()
    old = inputs["old_logprobs"].clone().requires_grad_()
    advantages = inputs["advantages"].clone().requires_grad_()
    _call(name, params, logprobs, old, advantages, inputs["mask"]).loss.backward()
    assert logprobs.grad is not None
    assert old.grad is None and advantages.grad is None


@pytest.mark.parametrize("cls", [DRPO, PPO, DPPO])
def test_float64_stays_float64(cls):
    inputs = _inputs(dtype=torch.float64)
    out = cls()(**inputs)
    assert out.loss.dtype == torch.float64


def test_error_message_patterns_are_exact():
    # Guards the regexes above: a message like "delta must be > 0, got 0.0" names argument and value.
    with pytest.raises(ValueError, match=re.escape("delta must be > 0, got 0.0")):
        DRPO(delta=0.0)
