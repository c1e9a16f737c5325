"""`drpo plot-weights`: the PNG it writes and the weights it plots."""

from __future__ import annotations

import sys

import pytest
import torch

from drpo_lightning.objectives.drpo import DRPO
from drpo_lightning.objectives.ppo import PPO
from drpo_lightning.plot import gradient_weights, main
from drpo_lightning.registry import OBJECTIVES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_writes_a_valid_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    names = ["drpo", "ppo", "dppo"] + (["spo"] if "spo" in OBJECTIVES else [])
    out = tmp_path / "weights.png"
    code = main(
        [
            "--mu",
            "0.5",
            "--objectives",
            *names,
            "--out",
            str(out),
            "--param",
            "drpo.delta=0.2",
            "--param",
            "ppo.dual_clip=3",
            "--points",
            "101",
        ]
    )
    assert code == 0, capsys.readouterr().err
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    image = imread(str(out))
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 600
    assert image[..., :3].std() > 0.05  # not a blank canvas
    assert f"wrote {out}" in capsys.readouterr().out


def test_drpo_weights_match_the_closed_form():
    delta, mu = 0.2, 0.5
    pi = torch.tensor([0.05, 0.3, 0.45, 0.6, 0.9], dtype=torch.float64)
    r = pi / mu
    for advantage in (1.0, -1.0):
        expected = 1 - torch.sign(advantage * (r - 1)) * (pi - mu).abs() / delta
        got = gradient_weights(DRPO(delta=delta), mu, pi, advantage)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # the raw coefficient per unit advantage is r * w
        raw = gradient_weights(DRPO(delta=delta), mu, pi, advantage, include_ratio=True)
        torch.testing.assert_close(raw, r * expected, rtol=1e-5, atol=1e-5)


def test_ppo_weights_are_one_inside_the_clip_and_zero_outside():
    pi = torch.tensor([0.2, 0.45, 0.55, 0.8], dtype=torch.float64)  # r = 0.4, 0.9, 1.1, 1.6
    torch.testing.assert_close(
        gradient_weights(PPO(), 0.5, pi, 1.0), torch.tensor([1.0, 1, 1, 0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        gradient_weights(PPO(), 0.5, pi, -1.0), torch.tensor([0.0, 1, 1, 1], dtype=torch.float64)
    )


def test_errors_and_topk_note(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "w.png")
    assert main(["--objectives", "nope", "--out", out]) == 2
    assert "unknown objective 'nope'" in capsys.readouterr().err
    assert main(["--objectives", "drpo", "--param", "ppo.clip_low=0.1", "--out", out]) == 2
    assert "'ppo' is not one of --objectives" in capsys.readouterr().err
    assert main(["--objectives", "drpo", "--param", "drpo.delta=-1", "--out", out]) == 2
    assert "delta must be > 0" in capsys.readouterr().err
    assert main(["--mu", "1.5", "--out", out]) == 2
    assert "--mu must be in (0, 1)" in capsys.readouterr().err
    code = main(
        ["--objectives", "dppo", "drpo", "--param", "dppo.divergence=topk", "--out", out, "--points", "11"]
    )
    assert code == 0
    assert "note: skipping dppo" in capsys.readouterr().out


def test_missing_matplotlib_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    assert main(["--out", str(tmp_path / "w.png")]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == 'drpo plot-weights: error: drpo plot-weights needs matplotlib: pip install "drpo-lightning[plot]"'
    )


def test_dispatched_by_the_drpo_command(tmp_path):
    pytest.importorskip("matplotlib")
    from drpo_lightning.cli import main as drpo

    out = tmp_path / "w.png"
    assert drpo(["plot-weights", "--objectives", "drpo", "--out", str(out), "--points", "11"]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_weights_help_shows_defaults_and_the_legend_names_every_argument(capsys):
    from drpo_lightning.objectives.dppo import DPPO
    from drpo_lightning.objectives.drpo import DRPO
    from drpo_lightning.objectives.ppo import PPO
    from drpo_lightning.plot import _label, main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "(default: 0.5)" in out and "(default: 399)" in out and "1 +- 0.08" in out
    # Defaults included: the near-flat default DRPO line is labelled with its delta.
    assert _label("drpo", DRPO()) == "drpo (delta=12.5)"
    assert _label("ppo", PPO(clip_high=0.28)) == "ppo (clip_low=0.2, clip_high=0.28, dual_clip=None)"
    assert _label("dppo", DPPO()) == "dppo (divergence=tv, delta_low=0.15, delta_high=0.15, ratio_cap=20.0)"
