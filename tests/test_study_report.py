"""`drpo sweep report` on a fake finished grid (2 settings x 3 arms x 3 seeds, metrics written by hand): the
numbers in the report are checked against values computed by hand, not against the code that made them."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from drpo_lightning.errors import ConfigError
from drpo_lightning.study import (
    COLLAPSE_DEFINITION,
    _primary_lines,
    collapsed,
    mean_ci,
    p_value,
    paired_diff,
    t_quantile,
)
from drpo_lightning.sweep import load_grid, read_metrics
from drpo_lightning.sweep_cli import main

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "drpo_a": {"model.objective": {"class_path": "drpo", "init_args": {"delta": 0.2}}},
    "dppo_a": {"model.objective": "dppo"},
    "ppo_a": {"model.objective": {"class_path": "ppo", "init_args": {"clip_high": 0.28}}},
}
TRUST_KEYS = {"drpo_a": ["drpo/corrective_frac"], "dppo_a": ["dppo/masked_frac"],
              "ppo_a": ["ppo/clip_frac_low", "ppo/clip_frac_high"]}


def const(v: float) -> list[float]:
    return [v, v, v, v]


# Held-out accuracy of each run: [before, after rollout 10, 20, 30]. AUC = mean of the four; final = mean of
# the last two. Seed 3 is in the grid but never ran (a missing run).
CURVES = {
    # c1: constant curves, so AUC = final = the value. Best non-DRPO arm: ppo_a (mean 0.6 vs 0.2).
    ("c1", "dppo_a"): [const(0.1), const(0.2), const(0.3)],
    ("c1", "ppo_a"): [const(0.4), const(0.5), const(0.9)],
    ("c1", "drpo_a"): [const(0.5), const(0.62), const(0.98)],  # ppo_a + (0.10, 0.12, 0.08)
    # c2: best non-DRPO arm is dppo_a (AUC 0.35 vs ppo_a 0.305).
    ("c2", "dppo_a"): [const(0.35), const(0.35), const(0.35)],
    ("c2", "ppo_a"): [[0.4, 0.6, 0.31, 0.35], const(0.3), const(0.2)],  # 0.31 >= 0.6 / 2: no collapse
    ("c2", "drpo_a"): [const(0.29), [0.4, 0.6, 0.2, 0.25], const(0.2)],  # 0.2 < 0.6 / 2: collapse
}
STEPS = 30


def write_metrics(path: Path, setting: str, arm: str, seed: int, curve: list[float]) -> None:
    """A CSVLogger-like metrics.csv: one row per rollout step, and a validation row after rollouts 10, 20, 30."""
    extra = list(TRUST_KEYS[arm])
    if arm == "drpo_a":
        extra.append("drpo/delta")
    extra += ["rollout/mismatch_mean", "rollout/mismatch_p99"] if setting == "c1" else \
        ["rollout/staleness_mean", "rollout/staleness_max"]
    columns = ["step", "reward", "train/abs_prob_diff", *extra, "val/accuracy"]
    rows = [",".join(columns)]
    final_delta = {"c1": 0.3 + 0.1 * seed, "c2": 0.2}[setting]  # c1: delta moves from 0.2 (adaptive)
    for step in range(STEPS):
        values = {"reward": 0.5, "train/abs_prob_diff": 0.01 * (seed + 1), "drpo/corrective_frac": 0.02,
                  "dppo/masked_frac": 0.03, "ppo/clip_frac_low": 0.01, "ppo/clip_frac_high": 0.02,
                  "drpo/delta": 0.2 + (final_delta - 0.2) * step / (STEPS - 1),
                  "rollout/mismatch_mean": 0.01, "rollout/mismatch_p99": 0.2,
                  "rollout/staleness_mean": 1.0, "rollout/staleness_max": 1 + step % 3}
        rows.append(",".join([str(step)] + [str(values[c]) for c in columns[1:-1]] + [""]))
        if step in (9, 19, 29):
            rows.append(",".join([str(step)] + [""] * (len(columns) - 2) + [str(curve[(step + 1) // 10])]))
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(rows) + "\n")


def make_grid(tmp_path: Path, report: dict | None) -> Path:
    spec = {
        "base": str(ROOT / "configs" / "quickstart.yaml"),
        "out_dir": str(tmp_path / "runs"),
        "seeds": [0, 1, 2, 3],
        "settings": {"c1": {"model.num_minibatches": 2}, "c2": {"model.num_minibatches": 4}},
        "objectives": ARMS,
    }
    if report is not None:
        spec["report"] = report
    path = tmp_path / "toy_study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def fake_finished_runs(grid_path: Path) -> None:
    """What `drpo sweep run` leaves behind for seeds 0-2 (config.yaml, metrics.csv, result.json)."""
    for run in load_grid(grid_path).runs:
        if run.seed == 3:
            continue
        curve = CURVES[(run.setting, run.objective)][run.seed]
        csv_path = run.folder / "logs" / "version_0" / "metrics.csv"
        write_metrics(csv_path, run.setting, run.objective, run.seed, curve)
        (run.folder / "config.yaml").write_text(yaml.safe_dump(run.config, sort_keys=False))
        result = {"name": run.name, "setting": run.setting, "objective": run.objective, "seed": run.seed,
                  "seconds": 1.0, "val_accuracy_before": curve[0], "metrics": read_metrics(csv_path)}
        run.result_path.write_text(json.dumps(result))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    grid = make_grid(tmp, {"primary": "auc_acc", "eval_noise": "mean@4 over 500 prompts: about ±1.5 points."})
    fake_finished_runs(grid)
    out = tmp / "report"
    assert main(["report", "--grid", str(grid), "--out", str(out)]) == 0
    text = (out / "toy_study.md").read_text()
    c1, c2 = text.split("## Setting `c2`")
    return {"out": out, "text": text, "c1": c1.split("## Setting `c1`")[1], "c2": c2}


def row(section: str, start: str) -> list[str]:
    """The cells of the first table row of ``section`` that starts with ``| start |`` (``\\|`` is a
    pipe inside a cell)."""
    line = next(x for x in section.splitlines() if x.startswith(f"| {start} |"))
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip("|"))]


def paired_part(section: str) -> str:
    return section.split("### Paired differences")[1]


def test_t_distribution_matches_the_published_table():
    for df, q in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (10, 2.228), (30, 2.042), (100, 1.984)):
        assert t_quantile(0.95, df) == pytest.approx(q, abs=5e-4)
    assert t_quantile(0.99, 5) == pytest.approx(4.032, abs=5e-4)
    # df 2: P(|T| <= t) = t / sqrt(t^2 + 2) exactly
    assert p_value(4.0, 2) == pytest.approx(1 - 4 / math.sqrt(18), abs=1e-12)
    assert p_value(-4.0, 2) == p_value(4.0, 2)
    assert p_value(2.0, 5) == pytest.approx(0.101939, abs=1e-6)


def test_confidence_interval_and_paired_difference_by_hand():
    e = mean_ci([1.0, 2.0, 3.0])  # sd 1: half-width t(0.975, 2) / sqrt(3) = 4.3027 * 0.57735
    assert (e.mean, e.n) == (2.0, 3) and e.half_width == pytest.approx(2.48414, abs=1e-5)
    assert math.isnan(mean_ci([0.4]).half_width) and mean_ci([float("nan"), 0.4]).n == 1
    # diffs 0.10, 0.12, 0.08 (seed 3 only in one arm: not paired): mean 0.10, se 0.02 / sqrt(3)
    d = paired_diff({0: 0.5, 1: 0.62, 2: 0.98, 3: 0.1}, {0: 0.4, 1: 0.5, 2: 0.9})
    assert d.n == 3 and d.mean == pytest.approx(0.10) and d.t == pytest.approx(8.660254, abs=1e-6)
    assert d.half_width == pytest.approx(4.302653 * 0.02 / math.sqrt(3), abs=1e-6)
    assert d.p == pytest.approx(1 - 8.660254 / math.sqrt(8.660254**2 + 2), abs=1e-6) and d.significant
    assert not paired_diff({0: 0.1}, {0: 0.2}).significant  # one pair: no test


def test_collapse_definition():
    assert collapsed([0.4, 0.6, 0.2, 0.25])  # 0.2 < 0.6 / 2 after the best
    assert not collapsed([0.4, 0.6, 0.31, 0.35])
    assert collapsed([0.4, 0.1])  # the best can be the evaluation before training
    assert not collapsed([0.0, 0.0])
    assert "below 0.5 x that best" in COLLAPSE_DEFINITION


def test_report_files_and_primary_metric_line(report):
    out, text = report["out"], report["text"]
    for name in ("toy_study_c1.png", "toy_study_c2.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text
    runs = json.loads((out / "toy_study_runs.json").read_text())
    assert len(runs) == 18 and runs["c2/drpo_a/seed1"]["val_accuracy_before"] == 0.4
    assert ("**Primary metric: AUC accuracy** (mean held-out accuracy over all evaluations, the one before "
            "training included), as the grid file declares it (`report.primary: auc_acc`)") in text
    assert "Evaluation noise: mean@4 over 500 prompts: about ±1.5 points." in text
    assert f"toy_study.yaml --out {out}" in text  # the reproducing command
    assert COLLAPSE_DEFINITION in text and "not corrected for multiple comparisons" in text.lower()


def test_arm_table_values(report):
    c1, c2 = report["c1"], report["c2"]
    header = row(c1, "arm")
    assert header[:10] == ["arm", "objective", "seeds", "before", "final", "AUC acc (primary)", "best",
                           "collapses", "\\|π−μ\\|", "TR frac"]
    assert "mismatch mean" in header and "staleness mean" not in header and header[-1] == "final δ"
    dppo = dict(zip(header, row(c1, "dppo_a")))
    # AUC 0.1, 0.2, 0.3: mean 20.0, half-width 4.3027 * 0.1 / sqrt(3) = 24.8 points
    assert dppo["AUC acc (primary)"] == "20.0 ± 24.8" and dppo["seeds"] == "3 (+1 missing)"
    assert dppo["objective"] == "dppo" and dppo["TR frac"] == "3.0 ± 0.0" and dppo["final δ"] == "—"
    assert dppo["\\|π−μ\\|"] == "0.020 ± 0.025"  # 0.01, 0.02, 0.03
    drpo = dict(zip(header, row(c1, "drpo_a")))
    assert drpo["final δ"] == "0.400 ± 0.248"  # 0.3, 0.4, 0.5
    assert drpo["mismatch p99"] == "0.2000 ± 0.0000"
    header2 = row(c2, "arm")
    assert "staleness max" in header2 and "mismatch mean" not in header2
    assert dict(zip(header2, row(c2, "drpo_a")))["collapses"] == "1/3"
    assert dict(zip(header2, row(c2, "ppo_a")))["collapses"] == "0/3"  # 0.31 stays above half of 0.6
    assert dict(zip(header2, row(c2, "ppo_a")))["staleness max"] == "3 ± 0"
    assert "Collapsed runs (1): drpo_a seed 1." in c2 and "No run collapsed." in c1


def test_paired_differences_against_the_best_non_drpo_arm(report):
    c1, c2 = report["c1"], report["c2"]
    assert "### Paired differences against `ppo_a`, the best non-DRPO arm on AUC accuracy" in c1
    assert "### Paired differences against `dppo_a`, the best non-DRPO arm on AUC accuracy" in c2
    c1, c2 = paired_part(c1), paired_part(c2)
    # c1 drpo_a - ppo_a: +0.10 +- 4.3027 * 0.02 / sqrt(3) = 0.0497; t = 8.66 (2 df), p = 0.013
    assert row(c1, "drpo_a")[:6] == ["drpo_a", "3", "+10.0 *", "+5.0 to +15.0", "8.66 (2)", "0.013"]
    # c1 dppo_a - ppo_a: -0.3, -0.3, -0.6: mean -0.4, sd 0.1732, se 0.1, t = -4.00, p = 1 - 4/sqrt(18) = 0.057
    assert row(c1, "dppo_a")[:6] == ["dppo_a", "3", "-40.0", "-83.0 to +3.0", "-4.00 (2)", "0.057"]
    assert not any(line.startswith("| ppo_a |") for line in c1.splitlines())  # no row against itself
    # c2 drpo_a - dppo_a: -0.06, +0.0125, -0.15: mean -0.06583, sd 0.08141, se 0.04700, t = -1.40,
    # p = 1 - 1.4007 / sqrt(1.4007^2 + 2) = 0.296, CI -0.06583 +- 4.3027 * 0.04700
    cells = row(c2, "drpo_a")
    assert cells[2:6] == ["-6.6", "-26.8 to +13.6", "-1.40 (2)", "0.296"]
    # the same seeds on the secondary metric (final): c2 ppo_a - dppo_a = -0.02, -0.05, -0.15: mean -0.0733,
    # sd 0.06807, se 0.03930, t = -1.87
    ppo = row(c2, "ppo_a")
    assert ppo[6] == "-7.3" and ppo[8] == "-1.87 (2)"


def test_verdict_paragraphs(report):
    c1, c2 = report["c1"], report["c2"]
    assert "**Verdict (c1).** Highest mean AUC accuracy: **drpo_a** (a DRPO arm, 70.0 ± " in c1
    assert "Best non-DRPO arm: **ppo_a** (60.0 ± " in c1
    assert ("drpo_a is higher by 10.0 points (95% CI +5.0 to +15.0, t(2) = 8.66, p = 0.013): significant at "
            "the 5% level.") in c1
    assert "1 of 1 DRPO arm(s) differ from ppo_a at the 5% level (tests not corrected" in c1
    assert "Highest mean AUC accuracy: **dppo_a** (a non-DRPO arm, 35.0 ± 0.0 %" in c2
    assert "drpo_a is lower by 6.6 points (95% CI -26.8 to +13.6, t(2) = -1.40, p = 0.296): not significant" in c2
    assert "0 of 1 DRPO arm(s) differ" in c2 and "Collapsed runs: drpo_a 1/3." in c2


def test_without_a_declared_primary_the_report_says_so():
    text = "\n".join(_primary_lines({}, "final"))
    assert "**Primary metric: final accuracy**" in text and "not a choice fixed before the runs" in text
    assert "decided before the runs" not in text


def test_grid_report_key_is_checked_when_the_grid_is_loaded(tmp_path):
    assert load_grid(make_grid(tmp_path, {"primary": "final"})).meta["report"] == {"primary": "final"}
    assert load_grid(make_grid(tmp_path, None)).meta["report"] == {}
    assert load_grid(ROOT / "configs" / "study" / "stability.yaml").meta["report"] == {}
    with pytest.raises(ConfigError, match=r"unknown key report\.primry \(expected one of primary, title, "):
        load_grid(make_grid(tmp_path, {"primry": "final"}))
    with pytest.raises(ConfigError, match=r"report\.primary must be one of auc_acc, final, got 'best'"):
        load_grid(make_grid(tmp_path, {"primary": "best"}))
    with pytest.raises(ConfigError, match="report must be a mapping"):
        load_grid(make_grid(tmp_path, "auc_acc"))
    with pytest.raises(ConfigError, match=r"report\.eval_noise must be a non-empty string"):
        load_grid(make_grid(tmp_path, {"eval_noise": 3}))


def test_the_first_studys_grid_still_reports(tmp_path):
    """configs/study/stability.yaml (no ``report:`` block, runs without delta, mismatch or staleness logs)."""
    grid = load_grid(ROOT / "configs" / "study" / "stability.yaml", str(tmp_path / "runs"))
    for run in grid.runs:
        if run.seed > 1:
            continue
        curve = [0.35, 0.5 + 0.05 * run.seed, 0.6, 0.6 - 0.1 * run.seed]
        run.folder.mkdir(parents=True)
        (run.folder / "config.yaml").write_text(yaml.safe_dump(run.config, sort_keys=False))
        metrics = {"reward": [[s, 0.5] for s in range(20)], "train/abs_prob_diff": [[s, 0.01] for s in range(20)],
                   "val/accuracy": [[9, curve[1]], [19, curve[2]], [29, curve[3]]]}
        run.result_path.write_text(json.dumps({"name": run.name, "seed": run.seed, "val_accuracy_before": curve[0],
                                               "metrics": metrics}))
    out = tmp_path / "report"
    assert main(["report", "--grid", str(grid.path), "--out-dir", str(tmp_path / "runs"), "--out", str(out)]) == 0
    text = (out / "stability.md").read_text()
    assert "The grid file declares none (`report.primary`)" in text
    assert "| drpo_0.2 | drpo | 2 (+3 missing) |" in text and "mismatch" not in row(text, "arm")
    # final = (0.6 + 0.6) / 2 and (0.6 + 0.5) / 2 per seed, the same for every arm: the reference is the first
    # non-DRPO arm in grid order, and every difference is 0 with no spread
    assert "### Paired differences against `dppo_tv_0.15`, the best non-DRPO arm on final accuracy" in text
    assert (out / "stability_offpolicy.png").is_file() and (out / "stability_harsh.png").is_file()
