"""The report of a finished ``drpo sweep``: per-arm tables with confidence intervals, paired differences
against the best non-DRPO arm, collapses, curves over time, and a verdict written from the numbers.

Reads every finished run's ``result.json`` (see :mod:`drpo_lightning.sweep`) and writes, for a grid file
``<stem>.yaml``, ``<stem>.md``, one ``<stem>_<setting>.png`` per setting (condition) and ``<stem>_runs.json``
(every run's metrics) into one folder. Definitions, stated again in the report itself:

- **accuracy**: held-out ``val/accuracy``; evaluation 0 is the one before training.
- **final**: mean of a run's last two evaluations (one evaluation swings by a few points).
- **AUC accuracy**: mean held-out accuracy over all evaluations, the one before training included.
- **collapse**: see ``COLLAPSE_DEFINITION``.
- **trust-region fraction**: what the objective did to tokens: DRPO's corrective fraction (w < 0), DPPO's
  masked fraction, PPO's clipped fraction (low + high).
- **DRPO arm**: an arm whose objective ``class_path`` is ``drpo``; every other arm (the on-policy reference
  included) is a non-DRPO arm.

Statistics are over seeds: a mean with a 95% confidence interval from Student's t with n - 1 degrees of
freedom. A seed fixes the prompt order and data of every arm alike, so arms are compared seed by seed (paired
differences). The t distribution is computed here (a finite sum for integer degrees of freedom) rather than
taken from scipy, which is not a dependency.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drpo_lightning.sweep import REPORT_PRIMARY, Grid, read_result

__all__ = ["COLLAPSE_DEFINITION", "PRIMARY_METRICS", "Estimate", "PairedDiff", "mean_ci", "paired_diff",
           "paired_test", "run_summary", "summarise", "t_quantile", "verdict", "write_report"]

COLLAPSE_FRACTION = 0.5
COLLAPSE_DEFINITION = (f"a run collapses when, after its best held-out evaluation (the one before training "
                       f"included), it falls below {COLLAPSE_FRACTION:g} x that best at a later evaluation")

# report.primary in the grid file -> (key of run_summary, name in the report, definition)
PRIMARY_METRICS = {
    "auc_acc": ("auc_accuracy", "AUC accuracy",
                "mean held-out accuracy over all evaluations, the one before training included"),
    "final": ("final", "final accuracy", "mean of a run's last two held-out evaluations"),
}
DEFAULT_PRIMARY = "final"  # what the first report's verdict used; said to be a default when a grid has none
assert set(PRIMARY_METRICS) == set(REPORT_PRIMARY)

LEVEL = 0.95  # confidence level of every interval and test in the report

TRUST_REGION_KEYS = (("drpo/corrective_frac",), ("dppo/masked_frac",), ("ppo/clip_frac_low", "ppo/clip_frac_high"),
                     ("spo/corrective_frac",))


# ---------------------------------------------------------------------------------------------- statistics


def t_central(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with integer ``df``, exactly: with ``theta = atan(t / sqrt(df))`` it is
    a finite trigonometric sum (Abramowitz & Stegun 26.7.3 for odd, 26.7.4 for even ``df``)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if math.isinf(t):
        return 1.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sin(theta) * (1 + 1/2 c^2 + (1*3)/(2*4) c^4 + ...), df/2 terms
        term, total = 1.0, 1.0
        for j in range(df // 2 - 1):
            term *= c2 * (2 * j + 1) / (2 * j + 2)
            total += term
        return min(1.0, s * total)
    term, total = math.cos(theta), 0.0  # (2/pi) (theta + sin cos (1 + 2/3 c^2 + ...)), (df-1)/2 terms
    for j in range((df - 1) // 2):
        if j:
            term *= c2 * (2 * j) / (2 * j + 1)
        total += term
    return min(1.0, 2 / math.pi * (theta + s * total))


def t_quantile(level: float, df: int) -> float:
    """The ``q`` with ``P(|T| <= q) = level`` (two-sided critical value; ``t_quantile(0.95, 2) = 4.303``),
    by bisection on :func:`t_central`, which increases with ``q``."""
    lo, hi = 0.0, 1.0
    while t_central(hi, df) < level:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_central(mid, df) < level else (lo, mid)
        if hi - lo < 1e-12 * hi:
            break
    return (lo + hi) / 2


def p_value(t: float, df: int) -> float:
    """Two-sided p of a t statistic."""
    return max(0.0, 1.0 - t_central(t, df))


@dataclass(frozen=True)
class Estimate:
    """Mean over ``n`` seeds and the half-width of its 95% confidence interval (nan with fewer than 2)."""

    mean: float
    half_width: float
    n: int


def mean_ci(values: list[float]) -> Estimate:
    """Mean and 95% t interval of the finite values (a run without the metric contributes nothing)."""
    xs = [x for x in values if not math.isnan(x)]
    if not xs:
        return Estimate(float("nan"), float("nan"), 0)
    if len(xs) == 1:
        return Estimate(xs[0], float("nan"), 1)
    half = t_quantile(LEVEL, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return Estimate(statistics.fmean(xs), half, len(xs))


@dataclass(frozen=True)
class PairedDiff:
    """``a - b`` over the seeds both arms finished: mean, 95% CI half-width, paired t, two-sided p."""

    mean: float
    half_width: float
    t: float
    p: float
    n: int

    @property
    def significant(self) -> bool:
        return self.p < 1 - LEVEL


def paired_diff(a: dict[int, float], b: dict[int, float]) -> PairedDiff:
    """Same seed = same data order and the same evaluation before training, so differencing seed by seed
    removes the seed-to-seed spread that both arms share."""
    diffs = [a[s] - b[s] for s in sorted(set(a) & set(b)) if not (math.isnan(a[s]) or math.isnan(b[s]))]
    nan = float("nan")
    if len(diffs) < 2:
        return PairedDiff(diffs[0] if diffs else nan, nan, nan, nan, len(diffs))
    mean, n = statistics.fmean(diffs), len(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n)
    t, _ = paired_test(mean, se, n)
    if se == 0:  # every seed moved by exactly the same amount
        return PairedDiff(mean, 0.0, t, 0.0 if mean else 1.0, n)
    return PairedDiff(mean, t_quantile(LEVEL, n - 1) * se, t, p_value(t, n - 1), n)


def paired_test(diff: float, se: float, n: int) -> tuple[float, bool]:
    """Paired t statistic and whether it clears the two-sided 95% level for ``n - 1`` degrees of freedom."""
    if n < 2 or math.isnan(se):
        return float("nan"), False
    if se == 0:
        return (math.copysign(math.inf, diff) if diff else 0.0), diff != 0
    t = diff / se
    return t, abs(t) > t_quantile(LEVEL, n - 1)


# ---------------------------------------------------------------------------------------------- per run


def _values(series: list[list[float]]) -> list[float]:
    return [v for _, v in series]


def trust_region_series(metrics: dict[str, list[list[float]]]) -> list[list[float]]:
    """``[[step, fraction]]`` of the tokens the objective clipped, masked or corrected (summed over keys)."""
    for keys in TRUST_REGION_KEYS:
        if all(k in metrics for k in keys):
            steps = [s for s, _ in metrics[keys[0]]]
            return [[s, sum(metrics[k][i][1] for k in keys)] for i, s in enumerate(steps)]
    return []


def accuracy_curve(result: dict[str, Any]) -> list[list[float]]:
    """``[[rollouts done, accuracy]]`` with the before-training evaluation at 0. Lightning logs a validation
    with the index of the batch it follows (9 after the tenth rollout): shifted by one to count rollouts."""
    curve = [[step + 1, value] for step, value in result["metrics"].get("val/accuracy", [])]
    if result.get("val_accuracy_before") is not None:
        curve.insert(0, [0, result["val_accuracy_before"]])
    return curve


def collapsed(accuracy: list[float]) -> bool:
    """``COLLAPSE_DEFINITION`` on a run's evaluations in order (before training first)."""
    if not accuracy:
        return False
    best_i = max(range(len(accuracy)), key=accuracy.__getitem__)
    best = accuracy[best_i]
    return best > 0 and min(accuracy[best_i:]) < COLLAPSE_FRACTION * best


def run_summary(result: dict[str, Any]) -> dict[str, float]:
    """The per-run numbers of the tables (see the module docstring for definitions); nan where not logged."""
    metrics = result["metrics"]
    acc = _values(accuracy_curve(result))
    after = _values(metrics.get("val/accuracy", []))  # evaluations during training only
    before = result.get("val_accuracy_before")
    nan = float("nan")

    def mean_of(key: str) -> float:
        values = _values(metrics.get(key, []))
        return statistics.fmean(values) if values else nan

    trust = _values(trust_region_series(metrics))
    staleness_max = _values(metrics.get("rollout/staleness_max", []))
    delta = _values(metrics.get("drpo/delta", []))
    return {
        "before": float(before) if before is not None else nan,
        "final": statistics.fmean(after[-2:]) if after else nan,
        "best": max(acc) if acc else nan,
        "auc_accuracy": statistics.fmean(acc) if acc else nan,
        "auc_reward": mean_of("reward"),
        "collapsed": float(collapsed(acc)),
        "abs_prob_diff": mean_of("train/abs_prob_diff"),
        "trust_frac": statistics.fmean(trust) if trust else nan,
        "mismatch_mean": mean_of("rollout/mismatch_mean"),
        "mismatch_p99": mean_of("rollout/mismatch_p99"),
        "staleness_mean": mean_of("rollout/staleness_mean"),
        "staleness_max": max(staleness_max) if staleness_max else nan,
        "final_delta": delta[-1] if delta else nan,
        "seconds": float(result.get("seconds", nan)),
    }


def objective_class(config: dict[str, Any]) -> str:
    """The ``class_path`` of a run's objective (``drpo``, or a dotted path such as ``pkg.mod.DRPO``)."""
    objective = (config.get("model") or {}).get("objective")
    if isinstance(objective, dict):
        objective = objective.get("class_path")
    return str(objective) if objective else "?"


def is_drpo(class_path: str) -> bool:
    return class_path.rsplit(".", 1)[-1].lower() == "drpo"


def summarise(grid: Grid) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(setting, arm): cell}``; a cell holds the finished ``runs`` (results), their ``per_run`` summaries,
    their ``seeds``, ``n`` finished, ``missing`` (not finished), the objective ``class_path`` and ``drpo``."""
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for run in grid.runs:
        class_path = objective_class(run.config)
        cell = cells.setdefault((run.setting, run.objective), {
            "runs": [], "per_run": [], "seeds": [], "missing": 0, "class_path": class_path,
            "drpo": is_drpo(class_path)})
        if run.state() != "done":
            cell["missing"] += 1
            continue
        result = read_result(run)
        cell["runs"].append(result)
        cell["per_run"].append(run_summary(result))
        cell["seeds"].append(run.seed)
    for cell in cells.values():
        cell["n"] = len(cell["runs"])
    return cells


def _by_seed(cell: dict[str, Any], key: str) -> dict[int, float]:
    return {seed: row[key] for seed, row in zip(cell["seeds"], cell["per_run"])}


# ---------------------------------------------------------------------------------------------- verdict


def _points(x: float) -> str:
    return f"{x * 100:+.1f}"


def _ci_range(d: PairedDiff) -> str:
    return f"95% CI {_points(d.mean - d.half_width)} to {_points(d.mean + d.half_width)}"


def _describe_diff(d: PairedDiff) -> str:
    """``higher by 10.0 points (95% CI ..., t(2) = 8.66, p = 0.013): significant at the 5% level``."""
    if d.n < 2:
        return f"{_points(d.mean) if d.n else 'n/a'} points over {d.n} paired seed(s): too few to test"
    direction = "higher" if d.mean > 0 else "lower" if d.mean < 0 else "no different"
    size = f" by {abs(d.mean) * 100:.1f} points" if d.mean else ""
    test = f"{_ci_range(d)}, t({d.n - 1}) = {d.t:.2f}, p = {_p(d.p)}"
    outcome = "significant" if d.significant else "not significant"
    return f"{direction}{size} ({test}): {outcome} at the {100 - LEVEL * 100:.0f}% level"


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def reference_arm(cells: dict[str, dict[str, Any]], key: str) -> str | None:
    """The non-DRPO arm with the highest mean of ``key`` (first in grid order on a tie)."""
    means = {arm: mean_ci([r[key] for r in c["per_run"]]).mean for arm, c in cells.items() if not c["drpo"]}
    means = {arm: m for arm, m in means.items() if not math.isnan(m)}
    return max(means, key=means.__getitem__) if means else None


def verdict(cells: dict[str, dict[str, Any]], primary: str) -> str:
    """One paragraph for one setting, from the numbers only: the arm with the highest mean on the primary
    metric, and every DRPO arm's paired difference to the best non-DRPO arm with its test."""
    key, label, _ = PRIMARY_METRICS[primary]
    estimates = {arm: mean_ci([r[key] for r in c["per_run"]]) for arm, c in cells.items()}
    estimates = {arm: e for arm, e in estimates.items() if e.n}
    if not estimates:
        return "No finished runs."
    best = max(estimates, key=lambda arm: estimates[arm].mean)
    kind = "a DRPO arm" if cells[best]["drpo"] else "a non-DRPO arm"
    parts = [f"Highest mean {label}: **{best}** ({kind}, {_pct(estimates[best])} %, {estimates[best].n} seeds)."]
    reference = reference_arm(cells, key)
    drpo_arms = [arm for arm in estimates if cells[arm]["drpo"]]
    if reference is None or not drpo_arms:
        parts.append("No DRPO arm to compare with a non-DRPO arm." if reference else
                     "No non-DRPO arm finished: nothing to compare the DRPO arms with.")
        return " ".join(parts)
    parts.append(f"Best non-DRPO arm: **{reference}** ({_pct(estimates[reference])} %). Paired by seed, "
                 f"{label} of each DRPO arm minus {reference}:")
    significant = 0
    for arm in drpo_arms:
        d = paired_diff(_by_seed(cells[arm], key), _by_seed(cells[reference], key))
        significant += d.n >= 2 and d.significant
        parts.append(f"{arm} is {_describe_diff(d)}{';' if arm != drpo_arms[-1] else '.'}")
    parts.append(f"{significant} of {len(drpo_arms)} DRPO arm(s) differ from {reference} at the 5% level "
                 "(tests not corrected for multiple comparisons).")
    collapses = {arm: int(sum(r["collapsed"] for r in c["per_run"])) for arm, c in cells.items() if c["n"]}
    if any(collapses.values()):
        parts.append("Collapsed runs: " + ", ".join(f"{arm} {k}/{cells[arm]['n']}"
                                                      for arm, k in collapses.items() if k) + ".")
    else:
        parts.append("No run collapsed.")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------- tables


def _pct(e: Estimate) -> str:
    return _num(e, scale=100, digits=1)


def _num(e: Estimate, scale: float = 1.0, digits: int = 3) -> str:
    if math.isnan(e.mean):
        return "n/a"
    if math.isnan(e.half_width):
        return f"{e.mean * scale:.{digits}f}"
    return f"{e.mean * scale:.{digits}f} ± {e.half_width * scale:.{digits}f}"


def _logged(cells: dict[str, dict[str, Any]], key: str) -> bool:
    return any(not math.isnan(r[key]) for c in cells.values() for r in c["per_run"])


def arm_table(cells: dict[str, dict[str, Any]], primary: str) -> list[str]:
    """One row per arm; optional columns (mismatch, staleness, DRPO's delta) only where some run logged them."""
    primary_key = PRIMARY_METRICS[primary][0]
    columns: list[tuple[str, str, Any]] = [  # header, run_summary key, formatter
        ("before", "before", _pct), ("final", "final", _pct), ("AUC acc", "auc_accuracy", _pct),
        ("best", "best", _pct),
        ("\\|π−μ\\|", "abs_prob_diff", _num), ("TR frac", "trust_frac", _pct)]
    if _logged(cells, "mismatch_mean"):
        columns += [("mismatch mean", "mismatch_mean", lambda e: _num(e, digits=4)),
                    ("mismatch p99", "mismatch_p99", lambda e: _num(e, digits=4))]
    if _logged(cells, "staleness_mean"):
        columns += [("staleness mean", "staleness_mean", lambda e: _num(e, digits=2)),
                    ("staleness max", "staleness_max", lambda e: _num(e, digits=0))]
    show_delta = any(c["drpo"] for c in cells.values()) and _logged(cells, "final_delta")
    if show_delta:
        columns.append(("final δ", "final_delta", _num))
    headers = [h + (" (primary)" if key == primary_key else "") for h, key, _ in columns]
    lines = ["| arm | objective | seeds | " + " | ".join(headers[:4]) + " | collapses | " + " | ".join(headers[4:])
             + " |", "|" + "---|" * (len(columns) + 4)]
    for arm, cell in cells.items():
        rows = cell["per_run"]
        values = []
        for _, key, fmt in columns:
            if key == "final_delta" and not cell["drpo"]:
                values.append("—")
            else:
                values.append(fmt(mean_ci([r[key] for r in rows])))
        seeds = f"{cell['n']}" + (f" (+{cell['missing']} missing)" if cell["missing"] else "")
        collapses = f"{int(sum(r['collapsed'] for r in rows))}/{cell['n']}"
        lines.append(f"| {arm} | {cell['class_path']} | {seeds} | " + " | ".join(values[:4]) + f" | {collapses} | "
                     + " | ".join(values[4:]) + " |")
    return lines


def paired_table(cells: dict[str, dict[str, Any]], primary: str, reference: str) -> list[str]:
    """Every other arm minus ``reference`` on the primary metric, then on the other accuracy metric."""
    keys = [primary] + [k for k in PRIMARY_METRICS if k != primary]
    header = "| arm | paired seeds |"
    for k in keys:
        label = PRIMARY_METRICS[k][1] + (" (primary)" if k == primary else "")
        header += f" Δ {label} | 95% CI | t (df) | p |"
    lines = [header, "|" + "---|" * (2 + 4 * len(keys))]
    for arm, cell in cells.items():
        if arm == reference or not cell["n"]:
            continue
        row, n = [], 0
        for k in keys:
            metric = PRIMARY_METRICS[k][0]
            d = paired_diff(_by_seed(cell, metric), _by_seed(cells[reference], metric))
            n = max(n, d.n)
            if d.n < 2:
                row += [_points(d.mean) if d.n else "n/a", "n/a", "n/a", "n/a"]
                continue
            mark = " *" if d.significant else ""
            row += [f"{_points(d.mean)}{mark}", f"{_points(d.mean - d.half_width)} to {_points(d.mean + d.half_width)}",
                    f"{d.t:.2f} ({d.n - 1})", _p(d.p)]
        lines.append(f"| {arm} | {n} | " + " | ".join(row) + " |")
    return lines


def collapse_lines(cells: dict[str, dict[str, Any]]) -> list[str]:
    runs = [f"{arm} seed {seed}" for arm, c in cells.items()
            for seed, r in zip(c["seeds"], c["per_run"]) if r["collapsed"]]
    return [f"Collapsed runs ({len(runs)}): {', '.join(runs)}." if runs else "No run collapsed."]


# ---------------------------------------------------------------------------------------------- plots


def _mean_curve(curves: list[list[list[float]]]) -> tuple[list[float], list[float], list[float]]:
    """Mean over runs and the 95% CI half-width at the steps every run has."""
    steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves])) if curves else []
    lookup = [dict((s, v) for s, v in c) for c in curves]
    estimates = [mean_ci([d[s] for d in lookup]) for s in steps]
    return steps, [e.mean for e in estimates], [e.half_width for e in estimates]


def _smooth(steps: list[float], values: list[float], window: int) -> tuple[list[float], list[float]]:
    if window <= 1 or len(values) < window:
        return steps, values
    out = [statistics.fmean(values[i - window + 1 : i + 1]) for i in range(window - 1, len(values))]
    return steps[window - 1 :], out


def _varies(series: list[list[float]]) -> bool:
    values = _values(series)
    return bool(values) and max(values) != min(values)


def _metric(key: str):
    return lambda r: r["metrics"].get(key, [])


# (title, [(getter, line style, legend suffix)], smoothing window, which runs take part)
PANELS = (
    ("held-out accuracy (mean over seeds, shaded 95% CI)", [(accuracy_curve, "-", "")], 1, None),
    ("training reward (moving mean of 10)", [(_metric("reward"), "-", "")], 10, None),
    ("|π − μ| of sampled tokens (moving mean of 10)", [(_metric("train/abs_prob_diff"), "-", "")], 10, None),
    ("trust-region fraction (moving mean of 10)", [(lambda r: trust_region_series(r["metrics"]), "-", "")], 10,
     None),
    ("DRPO δ, arms whose δ moves", [(_metric("drpo/delta"), "-", "")], 1,
     lambda r: _varies(r["metrics"].get("drpo/delta", []))),
    ("rollout mismatch |log π − log μ| (— mean, -- p99)",
     [(_metric("rollout/mismatch_mean"), "-", ""), (_metric("rollout/mismatch_p99"), "--", " p99")], 10, None),
)


def plot_setting(cells: dict[str, dict[str, Any]], colours: dict[str, str], setting: str, path: Path) -> bool:
    """One figure per setting: a panel per metric some run logged, a line per arm. False if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for title, series, window, keep in PANELS:
        lines = []
        for arm, cell in cells.items():
            runs = [r for r in cell["runs"] if keep is None or keep(r)]
            for get, style, suffix in series:
                curves = [c for c in (get(r) for r in runs) if c]
                if curves:
                    lines.append((arm, style, suffix, window, curves))
        if lines:
            panels.append((title, lines))
    if not panels:
        return False
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, lines) in zip(axes.flat, panels):
        for arm, style, suffix, window, curves in lines:
            steps, mean, half = _mean_curve(curves)
            ax.plot(*_smooth(steps, mean, window), style, color=colours[arm], lw=1.5, ms=3,
                    marker="o" if window == 1 and len(steps) < 30 else None, label=arm + suffix)
            if window == 1 and not all(math.isnan(h) for h in half):
                ax.fill_between(steps, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                                color=colours[arm], alpha=0.12)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("rollout step")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    fig.suptitle(f"setting {setting}", y=0.995, fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.93 if nrows == 1 else 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- report


def _definitions(primary: str) -> str:
    return (
        "Definitions: *before* = held-out accuracy before training; *final* = mean of a run's last two held-out "
        "evaluations; *AUC acc* = mean held-out accuracy over all evaluations, before training included; "
        "*best* = highest evaluation, before training included; "
        f"*collapse*: {COLLAPSE_DEFINITION}; "
        "*|π−μ|* = mean over training steps of the mean absolute probability shift of the sampled tokens from "
        "the behaviour policy; *TR frac* = tokens DRPO corrected (w < 0), DPPO masked, or PPO clipped; "
        "*mismatch* = |log π − log μ| per token at the first update on each rollout, mean of its per-rollout "
        "mean and of its per-rollout 99th percentile; *staleness* = policy versions between sampling and "
        "training (mean of the per-rollout mean; max over the run); *final δ* = DRPO's δ at the last step "
        "(DRPO arms only). *DRPO arms* are arms whose objective `class_path` is `drpo`; all others, the "
        "on-policy reference included, are non-DRPO arms. "
        f"Each cell is the mean over seeds ± the half-width of its {LEVEL:.0%} confidence interval (Student's t, "
        "n − 1 degrees of freedom; no interval with one seed), in percent except |π−μ|, mismatch, staleness "
        "and δ. A seed fixes the prompt order and data of every arm alike, so arms are compared seed by seed: "
        "paired differences, their t interval and a two-sided paired t-test; * = p < 0.05."
    )


def _primary_lines(report: dict[str, str], primary: str) -> list[str]:
    _, label, definition = PRIMARY_METRICS[primary]
    if "primary" in report:
        lines = [f"**Primary metric: {label}** ({definition}), as the grid file declares it "
                 f"(`report.primary: {primary}`); the verdicts below are decided on it. (The report cannot tell "
                 "when that line was written: the grid file's history says whether it came before the runs.)"]
    else:
        lines = [f"**Primary metric: {label}** ({definition}). The grid file declares none (`report.primary`), "
                 "so this is the report's default, not a choice fixed before the runs."]
    if report.get("eval_noise"):
        lines += ["", f"Evaluation noise: {report['eval_noise']}"]
    if report.get("description"):
        lines += ["", report["description"]]
    return lines


def write_report(grid: Grid, out: Path, command: str | None = None) -> Path:
    """Write ``out/<stem>.md``, its PNGs and ``<stem>_runs.json`` from the finished runs of ``grid``;
    returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    stem = grid.path.stem
    report = grid.meta.get("report") or {}
    primary = report.get("primary", DEFAULT_PRIMARY)
    primary_key = PRIMARY_METRICS[primary][0]
    cells = summarise(grid)
    settings = list(dict.fromkeys(r.setting for r in grid.runs))
    arms = list(dict.fromkeys(r.objective for r in grid.runs))
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf"]
    colours = {arm: palette[i % len(palette)] for i, arm in enumerate(arms)}
    meta = grid.meta
    command = command or f"drpo sweep run --grid {grid.path} && drpo sweep report --grid {grid.path} --out {out}"
    overrides = ", ".join(f"`{k}={v}`" for k, v in (meta.get("overrides") or {}).items())
    lines = [
        f"# {report.get('title', 'Does DRPO deliver? Stability under off-policy training')}",
        "",
        "Reproduce this report (every number and plot below comes from one run of it):",
        "",
        "```bash",
        command,
        "```",
        "",
        *_primary_lines(report, primary),
        "",
        f"Grid: `{grid.path}` (base config `{meta.get('base')}`, seeds {meta.get('seeds')}"
        + (f"; every run: {overrides})." if overrides else ")."),
    ]
    if meta.get("description"):
        lines += ["", str(meta["description"]).strip()]
    lines += ["", _definitions(primary)]
    for setting in settings:
        setting_cells = {arm: cells[(setting, arm)] for arm in arms if (setting, arm) in cells}
        reference = reference_arm(setting_cells, primary_key)
        lines += ["", f"## Setting `{setting}`", "", f"**Verdict ({setting}).** {verdict(setting_cells, primary)}",
                  "", "### Arms", "", *arm_table(setting_cells, primary), ""]
        if reference is not None:
            comparisons = sum(1 for arm, c in setting_cells.items() if arm != reference and c["n"])
            lines += [f"### Paired differences against `{reference}`, the best non-DRPO arm on "
                      f"{PRIMARY_METRICS[primary][1]}", "",
                      f"Arm minus `{reference}`, same seeds, in points of accuracy. Not corrected for multiple "
                      f"comparisons: of these {comparisons} comparisons per metric, about {comparisons / 20:.1f} "
                      "would be marked * by chance alone if no arm differed. The reference is the best of the "
                      "non-DRPO arms *on these same runs*, so its lead over the others is biased upward (the "
                      "winner's curse): a DRPO arm's deficit against it is an upper bound.", "",
                      *paired_table(setting_cells, primary, reference), ""]
        lines += ["### Collapses", "", f"Definition: {COLLAPSE_DEFINITION}.", "",
                  *collapse_lines(setting_cells), ""]
        png = f"{stem}_{setting}.png"
        if plot_setting(setting_cells, colours, setting, out / png):
            lines += ["### Over time", "", f"![{setting}: curves over rollout steps]({png})", ""]
    raw = out / f"{stem}_runs.json"
    raw.write_text(json.dumps({r["name"]: r for cell in cells.values() for r in cell["runs"]}))
    lines += [f"Every run's metrics, step by step, as collected by the sweep: [`{raw.name}`]({raw.name})."]
    path = out / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path
