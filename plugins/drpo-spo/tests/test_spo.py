"""The SPO plugin: reference values, the drpo-lightning conformance kit, and selection by name."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from drpo_spo.objective import SPO

from drpo_lightning.registry import OBJECTIVES
from drpo_lightning.testing import check_objective

# Float64 reference values (per-token loss and d loss / d log pi_theta for one token, no aggregation), shipped
# next to this file: the plugin's tests need nothing outside its own folder.
CASES_FILE = Path(__file__).with_name("spo_cases.json")
CASES = json.loads(CASES_FILE.read_text())["cases"]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"eps{c['params']['epsilon']}-pi{c['pi']}-A{c['advantage']}"
)
def test_reference_cases(case, dtype):
    z = torch.tensor([[math.log(case["pi"])]], dtype=dtype, requires_grad=True)
    y = torch.tensor([[math.log(case["mu"])]], dtype=dtype)
    out = SPO(**case["params"])(
        logprobs=z,
        old_logprobs=y,
        advantages=torch.tensor([case["advantage"]], dtype=dtype),
        mask=torch.ones(1, 1, dtype=dtype),
    )
    out.loss.backward()
    assert out.loss.dtype == dtype
    assert out.loss.item() == pytest.approx(case["loss"], rel=TOLERANCE[dtype])
    assert z.grad.item() == pytest.approx(case["grad"], rel=TOLERANCE[dtype])


def test_weight_metric_and_finite_at_large_gaps():
    # w = 1 - sign(A) (r - 1) / epsilon: r = 1.4, A = 1, epsilon = 0.2 -> w = -1 (corrective)
    z = torch.tensor([[math.log(0.7), 0.0]], requires_grad=True)
    y = torch.tensor([[math.log(0.5), -50.0]])
    out = SPO(epsilon=0.2)(
        logprobs=z, old_logprobs=y, advantages=torch.tensor([1.0]), mask=torch.tensor([[1.0, 0.0]])
    )
    assert out.metrics["spo/weight_mean"].item() == pytest.approx(-1.0, rel=1e-5)
    assert out.metrics["spo/corrective_frac"].item() == 1.0
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(z.grad).all()


def test_cases_match_the_drpo_lightning_reference():
    """The shipped copy must not drift from the reference of the drpo-lightning tree this plugin sits in."""
    for parent in Path(__file__).resolve().parents:
        reference = parent / "tests" / "data" / "objective_cases.json"
        if reference.is_file():
            break
    else:
        pytest.skip("drpo-lightning's tests/data/objective_cases.json not found (plugin used on its own)")
    expected = [c for c in json.loads(reference.read_text())["cases"] if c["objective"] == "spo"]
    assert expected and expected == CASES


def test_metrics_ignore_a_nan_anchor_on_padding():
    # Padded positions may hold any log-prob; NaN * 0 is NaN, so the metrics must select, not multiply.
    z = torch.tensor([[math.log(0.7), -1.0, -2.0]], requires_grad=True)
    y = torch.tensor([[math.log(0.5), math.nan, math.inf]])
    out = SPO(epsilon=0.2)(
        logprobs=z, old_logprobs=y, advantages=torch.tensor([1.0]), mask=torch.tensor([[1.0, 0.0, 0.0]])
    )
    assert out.metrics["spo/weight_mean"].item() == pytest.approx(-1.0, rel=1e-5)
    assert out.metrics["spo/corrective_frac"].item() == 1.0
    out.loss.backward()
    assert torch.isfinite(out.loss) and z.grad[0, 1:].eq(0).all()


def test_epsilon_must_be_positive():
    for bad in (0, -0.1):
        with pytest.raises(ValueError, match="epsilon"):
            SPO(epsilon=bad)


@pytest.mark.parametrize(
    "objective", [SPO(), SPO(epsilon=12.5), SPO(epsilon=0.1, loss_agg_mode="seq-mean-token-sum")], ids=repr
)
def test_conformance_kit(objective):
    check_objective(objective)


def test_registered_through_its_entry_point():
    OBJECTIVES.load()
    assert OBJECTIVES.get("spo") is SPO
    info = OBJECTIVES.available()["spo"]
    assert info.package == "drpo-spo" and info.target == "drpo_spo.objective:SPO"


def _quickstart() -> Path:
    """configs/quickstart.yaml of the drpo-lightning source tree this plugin sits in."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "configs" / "quickstart.yaml"
        if candidate.is_file():
            return candidate
    pytest.skip("configs/quickstart.yaml of drpo-lightning not found")


def test_fit_selects_spo_by_name(tmp_path):
    from drpo_lightning.cli import main

    code = main(
        [
            "fit",
            "--config",
            str(_quickstart()),
            "--model.objective=spo",
            "--trainer.max_steps=2",
            "--model.num_minibatches=1",
            "--trainer.val_check_interval=2",
            "--trainer.enable_progress_bar=false",
            "--trainer.num_sanity_val_steps=0",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.callbacks.init_args.every_n_train_steps=1",
            f"--trainer.callbacks.init_args.dirpath={tmp_path / 'ckpt'}",
            "--data.task_size=64",
            "--data.val_size=8",
            "--data.val_batch_size=8",
            "--data.batch_size=4",
            "--model.num_generations=4",
            "--model.export_dir=",
        ]
    )
    assert code == 0
    config = (next(tmp_path.rglob("config.yaml"))).read_text()
    assert "drpo_spo.objective.SPO" in config
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        metrics = list(csv.DictReader(f))
    rewards = [float(r["reward"]) for r in metrics if r.get("reward")]
    assert len(rewards) == 2
    spo_columns = [k for k in metrics[0] if "spo/weight_mean" in k]
    assert spo_columns, f"no spo/* metric logged; columns: {sorted(metrics[0])}"
