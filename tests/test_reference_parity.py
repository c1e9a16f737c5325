"""Parity of DPPO with its reference implementations (verl's ``dppo_tv``/``dppo_kl``, Stable-RL's top-K).

Each reference formula is written out here independently, per token in float64 Python arithmetic, and
compared with the objective's autograd gradient evaluated in float32 (1e-5) and float64 (1e-12). What the
references do:

- Ratio truncation: gradient ``-A min(r, C) M`` w.r.t. log pi for every kept token, both advantage signs
  (truncated importance sampling, not a dual clip). ``C`` = ``clip_ratio_c``: verl 20, Stable-RL 10.
- Binary-TV / Binary-KL masks: ``A > 0`` drops the token iff it moved up past ``delta_high``, ``A <= 0`` iff
  it moved down past ``delta_low``.
- Top-K (Stable-RL ``compute_topk_kl``): TV and KL(mu || pi) over mu's top-K tokens plus one bucket holding
  the rest of the mass; the mask's direction is that of the sampled token.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from drpo_lightning.objectives.dppo import DEFAULT_RATIO_CAP, DPPO

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
QUICKSTART = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
# Decisions (mask, cap) must not sit on a boundary, where float32 rounding could flip them.
MARGIN = 1e-4


def _f64(values: torch.Tensor) -> list:
    return values.to(torch.float64).tolist()


# ------------------------------------------------------------------------------------------ the references
def reference_binary_divergence(divergence: str, p: float, q: float) -> float:
    """Binary-TV ``|p - q|`` or Binary-KL ``KL(Bernoulli(q) || Bernoulli(p))`` (q = mu, p = pi)."""
    if divergence == "tv":
        return abs(p - q)
    return q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))


def reference_topk_divergence(
    divergence: str, pi: list[float], mu: list[float], buckets: list[set[int]]
) -> float:
    """TV or KL(mu || pi) after collapsing the vocabulary into ``buckets`` and one bucket of the rest."""
    named = set().union(*buckets)
    rest = [i for i in range(len(mu)) if i not in named]
    p = [sum(pi[i] for i in b) for b in buckets] + [sum(pi[i] for i in rest)]
    q = [sum(mu[i] for i in b) for b in buckets] + [sum(mu[i] for i in rest)]
    if divergence == "tv":
        return 0.5 * sum(abs(a - b) for a, b in zip(p, q))
    return sum(b * math.log(b / a) for a, b in zip(p, q) if b > 0)


def reference_kept(advantage: float, p: float, q: float, div: float, low: float, high: float) -> bool:
    if advantage > 0:
        return not (p > q and div > high)
    return not (p < q and div > low)


def reference_grad(advantage: float, z: float, y: float, kept: bool, cap: float | None) -> float:
    """d loss / d log pi of one token: -A min(r, C) M, r from the log-ratio clamped to [-20, 20]."""
    ratio = math.exp(min(max(z - y, -20.0), 20.0))
    weight = ratio if cap is None else min(ratio, cap)
    return -advantage * weight if kept else 0.0


def _assert_off_boundaries(ratios: list[float], divs: list[float], deltas: tuple[float, float], cap) -> None:
    for r, d in zip(ratios, divs):
        assert all(abs(d - delta) > MARGIN for delta in deltas), (
            "a divergence sits on a threshold: change the seed"
        )
        assert cap is None or abs(r / cap - 1) > MARGIN, "a ratio sits on the cap: change the seed"


# ---------------------------------------------------------------------------------- ratio cap: the default
def test_default_ratio_cap_is_the_reference_truncation():
    assert DEFAULT_RATIO_CAP == 20.0 and DPPO().ratio_cap == 20.0
    assert DPPO(ratio_cap=None).ratio_cap is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "params,pi,mu,advantage,expected",
    [
        # The reference case pi .01 / mu .0001 (r = 100, TV 0.0099 < 0.15: kept): verl truncates at 20 ...
        ({}, 0.01, 0.0001, 1.0, -20.0),
        # ... Stable-RL at 10, and no truncation gives the plain -A r.
        ({"ratio_cap": 10.0}, 0.01, 0.0001, 1.0, -10.0),
        ({"ratio_cap": None}, 0.01, 0.0001, 1.0, -100.0),
        # The case: A < 0 and the probability rose (moving back, never masked), r = 300.
        ({}, 0.3, 0.001, -1.0, 20.0),
        ({"ratio_cap": None}, 0.3, 0.001, -1.0, 300.0),
        # Below the cap nothing changes: r = 1.2 -> -A r.
        ({}, 0.6, 0.5, 1.0, -1.2),
        # A masked token stays masked whatever the cap (A > 0, moved up by 0.25 > 0.15).
        ({}, 0.75, 0.5, 1.0, 0.0),
    ],
)
def test_ratio_cap_single_tokens(params, pi, mu, advantage, expected, dtype):
    logprobs = torch.tensor([[math.log(pi)]], dtype=torch.float64).to(dtype).requires_grad_()
    old = torch.tensor([[math.log(mu)]], dtype=torch.float64).to(dtype)
    out = DPPO(**params)(
        logprobs=logprobs,
        old_logprobs=old,
        advantages=torch.tensor([advantage], dtype=dtype),
        mask=torch.ones(1, 1, dtype=dtype),
    )
    out.loss.backward()
    torch.testing.assert_close(
        logprobs.grad, torch.tensor([[expected]], dtype=dtype), rtol=RTOL[dtype], atol=0
    )
    capped = params.get("ratio_cap", DEFAULT_RATIO_CAP)
    expected_capped = capped is not None and pi / mu > capped and expected != 0
    assert out.metrics["dppo/capped_frac"].item() == float(expected_capped)


# ------------------------------------------------------------------------------ Binary-TV/KL with the cap
def _binary_batch(seed: int):
    """Probabilities spread log-uniformly over [1e-5, 0.95] so that ratios run from ~1e-4 to ~1e5 (past both
    caps, inside the log-ratio clamp), with both advantage signs and a padded tail on every row but one."""
    gen = torch.Generator().manual_seed(seed)
    shape = (4, 24)
    low, high = math.log(1e-5), math.log(0.95)
    z = low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)
    y = low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)
    # A third of the tokens close to mu, so that the thresholds cut through the batch.
    near = torch.rand(shape, generator=gen, dtype=torch.float64) < 0.35
    z = torch.where(
        near,
        (y.exp() * (1 + 0.6 * torch.randn(shape, generator=gen, dtype=torch.float64)))
        .clamp(1e-5, 0.95)
        .log(),
        z,
    )
    advantages = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = torch.ones(shape, dtype=torch.float64)
    mask[1:, -5:] = 0
    return z, y, advantages, mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cap", [DEFAULT_RATIO_CAP, 10.0, None], ids=["verl-20", "stable-rl-10", "none"])
@pytest.mark.parametrize("divergence,delta", [("tv", 0.15), ("kl", 0.05)])
def test_binary_divergences_match_the_reference(divergence, delta, cap, dtype):
    z, y, advantages, mask = _binary_batch(seed=3)
    # The objective sees the inputs rounded to ``dtype``; the reference is computed from those same values.
    z, y, advantages = z.to(dtype), y.to(dtype), advantages.to(dtype)
    flat = list(zip(_f64(z.flatten()), _f64(y.flatten()), _f64(advantages.flatten()), _f64(mask.flatten())))
    count = sum(m for *_, m in flat)
    divs, ratios, grads, kept_flags = [], [], [], []
    for zi, yi, a, m in flat:
        p, q = math.exp(zi), math.exp(yi)
        d = reference_binary_divergence(divergence, p, q)
        kept = reference_kept(a, p, q, d, delta, delta)
        grads.append(reference_grad(a, zi, yi, kept, cap) * m / count)
        if m:
            divs.append(d)
            ratios.append(math.exp(zi - yi))
            kept_flags.append(kept)
    _assert_off_boundaries(ratios, divs, (delta,), cap)
    n_capped = sum(k and cap is not None and r > cap for k, r in zip(kept_flags, ratios))
    assert 0 < kept_flags.count(False) < len(kept_flags)  # both outcomes of the mask are exercised
    assert any(r > 20 for r in ratios) and any(r < 1 / 20 for r in ratios)

    logprobs = z.clone().requires_grad_()
    out = DPPO(divergence=divergence, delta_low=delta, delta_high=delta, ratio_cap=cap)(
        logprobs=logprobs, old_logprobs=y, advantages=advantages, mask=mask.to(dtype)
    )
    out.loss.backward()
    expected = torch.tensor(grads, dtype=torch.float64).reshape(z.shape).to(dtype)
    torch.testing.assert_close(logprobs.grad, expected, rtol=RTOL[dtype], atol=RTOL[dtype] * 1e-3)
    assert out.metrics["dppo/masked_frac"].item() == pytest.approx(kept_flags.count(False) / count, rel=1e-6)
    assert out.metrics["dppo/capped_frac"].item() == pytest.approx(n_capped / count, rel=1e-6)
    if cap is not None:
        assert n_capped > 0
    assert out.metrics["dppo/divergence_mean"].item() == pytest.approx(sum(divs) / len(divs), rel=RTOL[dtype])


# ------------------------------------------------------------------------------------------------- top-K
def _topk_batch(seed: int, batch=3, length=6, vocab=12, k=4):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.softmax(2 * torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64), -1)
    pi = torch.softmax(
        mu.log() + 0.8 * torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64), -1
    )
    sampled = torch.multinomial(mu.reshape(-1, vocab), 1, generator=gen).reshape(batch, length)
    sampled[0, 0] = mu[0, 0].argmax()  # both the inside and the outside case run
    sampled[0, 1] = mu[0, 1].argmin()
    advantages = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    return pi, mu, sampled, advantages, k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sampled_bucket", [False, True], ids=["stable-rl", "sampled-bucket"])
@pytest.mark.parametrize("divergence,delta", [("topk", 0.1), ("topk_kl", 0.05)])
def test_topk_divergences_match_the_reference(divergence, delta, sampled_bucket, dtype):
    pi_vocab, mu_vocab, sampled, advantages, k = _topk_batch(seed=5)
    batch, length, _ = pi_vocab.shape
    old_topk, topk_ids = mu_vocab.log().topk(k, dim=-1)  # [B, T, K]
    inputs = {
        "old_logprobs": mu_vocab.log().gather(-1, sampled.unsqueeze(-1)).squeeze(-1).to(dtype),
        "old_topk_logprobs": old_topk.to(dtype),
        "topk_logprobs": pi_vocab.log().gather(-1, topk_ids).to(dtype),
        "topk_ids": topk_ids,
        "token_ids": sampled,
        "advantages": advantages.to(dtype),
        "mask": torch.ones(batch, length, dtype=dtype),
    }
    logprobs = pi_vocab.log().gather(-1, sampled.unsqueeze(-1)).squeeze(-1).to(dtype).requires_grad_()

    kind = "tv" if divergence == "topk" else "kl"
    grads, divs, ratios, n_masked = [], [], [], 0
    for b in range(batch):
        for t in range(length):
            pi, mu, s = pi_vocab[b, t].tolist(), mu_vocab[b, t].tolist(), int(sampled[b, t])
            buckets = [{i} for i in topk_ids[b, t].tolist()]
            if sampled_bucket and s not in topk_ids[b, t].tolist():
                buckets.append({s})
            d = reference_topk_divergence(kind, pi, mu, buckets)
            a = advantages[b, t].item()
            kept = reference_kept(a, pi[s], mu[s], d, delta, delta)
            n_masked += not kept
            grads.append(reference_grad(a, math.log(pi[s]), math.log(mu[s]), kept, DEFAULT_RATIO_CAP))
            divs.append(d)
            ratios.append(pi[s] / mu[s])
    _assert_off_boundaries(ratios, divs, (delta,), DEFAULT_RATIO_CAP)
    assert 0 < n_masked < len(divs)

    objective = DPPO(
        divergence=divergence, topk=k, delta_low=delta, delta_high=delta, topk_sampled_bucket=sampled_bucket
    )
    out = objective(logprobs=logprobs, **inputs)
    out.loss.backward()
    expected = torch.tensor(grads, dtype=torch.float64).reshape(batch, length) / (batch * length)
    # float32 top-K inputs leave ~1e-7 in the rest bucket's mass: the divergence's tolerance is absolute.
    torch.testing.assert_close(logprobs.grad, expected.to(dtype), rtol=RTOL[dtype], atol=RTOL[dtype] * 1e-3)
    assert out.metrics["dppo/masked_frac"].item() == pytest.approx(n_masked / len(divs), rel=1e-6)
    assert out.metrics["dppo/divergence_mean"].item() == pytest.approx(
        sum(divs) / len(divs), rel=RTOL[dtype], abs=RTOL[dtype] * 1e-2
    )


@pytest.mark.parametrize("divergence", ["topk", "topk_kl"])
def test_sampled_bucket_never_gives_a_smaller_divergence(divergence):
    """A finer partition can only raise TV and KL: the sampled-bucket form masks a superset of the tokens."""
    pi_vocab, mu_vocab, sampled, advantages, k = _topk_batch(seed=11, batch=4, length=16)
    old_topk, topk_ids = mu_vocab.log().topk(k, dim=-1)
    divergences = {}
    for sampled_bucket in (False, True):
        divs = []
        for b in range(4):
            for t in range(16):
                logprobs = pi_vocab[b, t].log()[sampled[b, t]].reshape(1, 1)
                out = DPPO(divergence=divergence, topk=k, topk_sampled_bucket=sampled_bucket)(
                    logprobs=logprobs,
                    old_logprobs=mu_vocab[b, t].log()[sampled[b, t]].reshape(1, 1),
                    advantages=advantages[b, t].reshape(1),
                    mask=torch.ones(1, 1, dtype=torch.float64),
                    old_topk_logprobs=old_topk[b, t].reshape(1, 1, k),
                    topk_logprobs=pi_vocab[b, t].log()[topk_ids[b, t]].reshape(1, 1, k),
                    topk_ids=topk_ids[b, t].reshape(1, 1, k),
                    token_ids=sampled[b, t].reshape(1, 1),
                )
                divs.append(out.metrics["dppo/divergence_mean"].item())
        divergences[sampled_bucket] = torch.tensor(divs)
    outside = ~(topk_ids == sampled.unsqueeze(-1)).any(-1).flatten()
    assert outside.any() and (~outside).any()
    coarse, fine = divergences[False], divergences[True]
    assert (fine >= coarse - 1e-15).all()
    torch.testing.assert_close(fine[~outside], coarse[~outside], rtol=0, atol=0)  # same partition inside
    assert (fine[outside] > coarse[outside]).any()


@pytest.mark.parametrize("divergence", ["topk", "topk_kl"])
@pytest.mark.parametrize("sampled_bucket", [False, True], ids=["stable-rl", "sampled-bucket"])
def test_topk_padding_may_hold_any_value(divergence, sampled_bucket):
    """NaN/inf log-probs on padded positions change neither the loss, the gradient nor the metrics."""
    pi_vocab, mu_vocab, sampled, advantages, k = _topk_batch(seed=2, batch=2, length=4)
    old_topk, topk_ids = mu_vocab.log().topk(k, dim=-1)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    pad = mask == 0
    base = {
        "old_logprobs": mu_vocab.log().gather(-1, sampled.unsqueeze(-1)).squeeze(-1),
        "old_topk_logprobs": old_topk,
        "topk_logprobs": pi_vocab.log().gather(-1, topk_ids),
    }
    garbage = {
        "old_logprobs": base["old_logprobs"].masked_fill(pad, math.nan),
        "old_topk_logprobs": base["old_topk_logprobs"].masked_fill(pad.unsqueeze(-1), -math.inf),
        "topk_logprobs": base["topk_logprobs"].masked_fill(pad.unsqueeze(-1), math.nan),
    }
    results = []
    for tensors in (base, garbage):
        logprobs = pi_vocab.log().gather(-1, sampled.unsqueeze(-1)).squeeze(-1).requires_grad_()
        out = DPPO(divergence=divergence, topk=k, topk_sampled_bucket=sampled_bucket)(
            logprobs=logprobs,
            advantages=advantages,
            mask=mask,
            topk_ids=topk_ids,
            token_ids=sampled,
            **tensors,
        )
        out.loss.backward()
        results.append((out.loss.detach(), logprobs.grad, out.metrics))
    (loss_a, grad_a, metrics_a), (loss_b, grad_b, metrics_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    torch.testing.assert_close(grad_b, grad_a, rtol=0, atol=0)
    for key in ("dppo/masked_frac", "dppo/divergence_mean", "dppo/capped_frac"):
        torch.testing.assert_close(metrics_b[key], metrics_a[key], rtol=0, atol=0)


# --------------------------------------------------------------------------------- issue 13: NaN / inf
@pytest.mark.parametrize(
    "option,value",
    [("ratio_cap", ".inf"), ("delta_low", ".nan"), ("delta_high", "-.inf")],
)
def test_non_finite_objective_argument_is_one_line_before_the_model_loads(
    option, value, tmp_path, capsys, monkeypatch
):
    from drpo_lightning.cli import main

    def trap(*args, **kwargs):
        pytest.fail("the policy was loaded before the objective's argument was refused")

    monkeypatch.setattr("drpo_lightning.models.load_policy", trap)
    code = main(
        [
            "fit",
            "--config",
            str(QUICKSTART),
            "--trainer.logger=false",
            "--trainer.callbacks=null",
            f"--trainer.default_root_dir={tmp_path}",
            "--model.export_dir=",
            "--model.objective=dppo",
            f"--model.objective.init_args.{option}={value}",
        ]
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("drpo: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"DPPO: {option} must be a finite number, got" in lines[0]
    assert ("ratio_cap: null turns truncation off" in lines[0]) == (option == "ratio_cap")


# ------------------------------------------------------------- docs/plugins.md: the sequence-level example
def _docs_gspo():
    """The GSPO class of docs/plugins.md, run as written there."""
    text = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    (block,) = [b.split("\n", 1)[1] for b in text.split("```")[1::2] if "class GSPO(Objective)" in b]
    namespace: dict = {}
    exec(compile(block, "docs/plugins.md (GSPO)", "exec"), namespace)
    return namespace["GSPO"]


def test_docs_sequence_level_example_passes_the_conformance_kit():
    from drpo_lightning.testing import check_objective

    check_objective(_docs_gspo()(clip_low=0.2, clip_high=0.2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_docs_sequence_level_example_matches_the_sequence_formula(dtype):
    """l_i = max(-A s_i, -A clip(s_i)), s_i = exp(mean of z - y over sequence i's tokens), averaged over the
    non-empty sequences; d l / d z_t = -A s_i / |y_i| / n_seq where the unclipped term is active."""
    gen = torch.Generator().manual_seed(7)
    z = -3 * torch.rand(4, 6, generator=gen, dtype=torch.float64)
    y = z + 0.3 * torch.randn(4, 6, generator=gen, dtype=torch.float64)
    advantages = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [0] * 6], dtype=torch.float64)
    y = torch.where(mask > 0, y, math.nan)  # padding may hold anything
    z, y, advantages = z.to(dtype), y.to(dtype), advantages.to(dtype)
    clip = 0.1
    losses, grads = [], torch.zeros(4, 6, dtype=torch.float64)
    seqs = [i for i in range(4) if mask[i].sum() > 0]
    for i in seqs:
        n = int(mask[i].sum())
        log_ratio = sum(zt - yt for zt, yt in zip(_f64(z[i, :n]), _f64(y[i, :n]))) / n
        s, a = math.exp(log_ratio), float(advantages[i])
        unclipped, clipped = -a * s, -a * min(max(s, 1 - clip), 1 + clip)
        assert abs(abs(s - 1) - clip) > MARGIN, "a sequence ratio sits on the clip: change the seed"
        losses.append(max(unclipped, clipped))
        if unclipped >= clipped:
            grads[i, :n] = -a * s / n / len(seqs)
    assert 0 < int((grads != 0).any(-1).sum()) < len(seqs)  # clipped and unclipped sequences both occur

    logprobs = z.clone().requires_grad_()
    out = _docs_gspo()(clip_low=clip, clip_high=clip)(
        logprobs=logprobs, old_logprobs=y, advantages=advantages, mask=mask.to(dtype)
    )
    out.loss.backward()
    assert out.loss.item() == pytest.approx(sum(losses) / len(seqs), rel=RTOL[dtype])
    torch.testing.assert_close(logprobs.grad, grads.to(dtype), rtol=RTOL[dtype], atol=RTOL[dtype] * 1e-3)
