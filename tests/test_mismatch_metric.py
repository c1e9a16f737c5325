"""rollout/mismatch_mean and rollout/mismatch_p99: |log pi - log mu| over the valid tokens of a rollout's first
minibatch (values derived by hand)."""

from __future__ import annotations

import math

import pytest
import torch

from drpo_lightning.loop.pieces import mismatch_metrics, percentile, token_gaps


def test_mean_and_p99_over_valid_tokens_only_across_micro_batches():
    # two micro-batches of one minibatch; padding holds garbage (NaN, a huge gap) that must not count
    logprobs = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, -0.1, -0.2], [-3.0, -1.0, 0.0]])
    behaviour = torch.tensor([[-1.1, -1.7, -1.0], [-0.5, -0.3, -50.0], [-2.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0]])
    gaps = [token_gaps(logprobs[:2], behaviour[:2]), token_gaps(logprobs[2:], behaviour[2:])]
    metrics = mismatch_metrics(gaps, mask)
    # valid gaps: 0.1, 0.3, 0.0, 0.2, 1.0 -> mean 0.32; sorted 0, .1, .2, .3, 1: p99 at position 0.99 * 4 = 3.96
    # -> 0.3 + 0.96 * (1.0 - 0.3) = 0.972
    assert metrics["rollout/mismatch_mean"][0].item() == pytest.approx(0.32, abs=1e-6)
    assert metrics["rollout/mismatch_p99"][0].item() == pytest.approx(0.972, abs=1e-6)


def test_no_valid_token_logs_nothing():
    assert mismatch_metrics([torch.ones(2, 3)], torch.zeros(2, 3)) == {}


def test_percentile_equals_torch_quantile_and_takes_any_length():
    generator = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 1001):
        values = torch.rand(n, generator=generator)
        assert percentile(values, 0.99).item() == pytest.approx(torch.quantile(values.double(), 0.99).item(), abs=1e-7)
    # beyond torch.quantile's 2**24-element limit: 0, 1, ..., n - 1 has its p99 at 0.99 * (n - 1)
    n = 2**24 + 3
    values = torch.arange(n, dtype=torch.float32).flip(0)
    assert percentile(values, 0.99).item() == pytest.approx(0.99 * (n - 1), rel=1e-7)
    assert not math.isnan(percentile(torch.tensor([0.5]), 0.99).item())
