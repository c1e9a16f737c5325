"""The stability report of a finished ``drpo sweep``: accuracy curves, summary table, and a plain verdict.

Reads every run's ``result.json`` (see :mod:`drpo_lightning.sweep`) and writes ``stability.md`` plus PNG plots
into one folder. Definitions, stated again in the report itself:

- **accuracy**: held-out ``val/accuracy`` (one sample per prompt at the rollout temperature); step 0 is the
  evaluation before training.
- **final**: mean of a run's last two evaluations (one evaluation swings by a few points).
- **AUC reward**: mean training reward over all steps (area under the reward curve / steps).
- **AUC accuracy**: mean held-out accuracy over all evaluations, step 0 included.
- **collapse**: after its best evaluation, a run's accuracy falls below half of that best.
- **trust-region fraction**: what the objective did to tokens: DRPO's corrective fraction (w < 0), DPPO's
  masked fraction, PPO's clipped fraction (low + high).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from drpo_lightning.sweep import Grid, read_result

__all__ = ["run_summary", "summarise", "write_report"]

TRUST_REGION_KEYS = (("drpo/corrective_frac",), ("dppo/masked_frac",), ("ppo/clip_frac_low", "ppo/clip_frac_high"),
                     ("spo/corrective_frac",))


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


def run_summary(result: dict[str, Any]) -> dict[str, float]:
    """The per-run numbers of the table (see the module docstring for definitions)."""
    acc = _values(accuracy_curve(result))
    after = _values(result["metrics"].get("val/accuracy", []))  # evaluations during training only
    before = result.get("val_accuracy_before")
    rewards = _values(result["metrics"].get("reward", []))
    best_i = max(range(len(acc)), key=acc.__getitem__) if acc else 0
    collapsed = bool(acc) and acc[best_i] > 0 and min(acc[best_i:]) < 0.5 * acc[best_i]
    gap = _values(result["metrics"].get("train/abs_prob_diff", []))
    trust = _values(trust_region_series(result["metrics"]))
    nan = float("nan")
    return {
        "before": float(before) if before is not None else nan,
        "final": statistics.fmean(after[-2:]) if after else nan,
        "best": acc[best_i] if acc else nan,
        "auc_accuracy": statistics.fmean(acc) if acc else nan,
        "auc_reward": statistics.fmean(rewards) if rewards else nan,
        "collapsed": float(collapsed),
        "abs_prob_diff": statistics.fmean(gap) if gap else nan,
        "trust_frac": statistics.fmean(trust) if trust else nan,
        "seconds": float(result.get("seconds", nan)),
    }


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(grid: Grid) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(setting, objective): {"runs": [...results], "per_run": [...summaries], "n": seeds done}}``."""
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for run in grid.runs:
        cell = cells.setdefault((run.setting, run.objective), {"runs": [], "per_run": [], "missing": 0})
        if run.state() != "done":
            cell["missing"] += 1
            continue
        result = read_result(run)
        cell["runs"].append(result)
        cell["per_run"].append(run_summary(result))
    for cell in cells.values():
        cell["n"] = len(cell["runs"])
    return cells


def _fmt(mean: float, sd: float, pct: bool = True) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean * 100:.1f} ± {sd * 100:.1f}" if pct else f"{mean:.3f} ± {sd:.3f}"


def _mean_curve(curves: list[list[list[float]]]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Mean, min and max over runs at the steps every run has."""
    steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves])) if curves else []
    lookup = [dict((s, v) for s, v in c) for c in curves]
    mean = [statistics.fmean(d[s] for d in lookup) for s in steps]
    lo = [min(d[s] for d in lookup) for s in steps]
    hi = [max(d[s] for d in lookup) for s in steps]
    return steps, mean, lo, hi


def _smooth(steps: list[float], values: list[float], window: int) -> tuple[list[float], list[float]]:
    if window <= 1 or len(values) < window:
        return steps, values
    out = [statistics.fmean(values[i - window + 1 : i + 1]) for i in range(window - 1, len(values))]
    return steps[window - 1 :], out


def _plot(cells, settings: list[str], objectives: list[str], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    panels = [
        ("accuracy", "held-out accuracy (mean, shaded min-max over seeds)", lambda r: accuracy_curve(r), 1),
        ("abs_prob_diff", "|π − μ| of sampled tokens (moving mean of 10 steps)",
         lambda r: r["metrics"].get("train/abs_prob_diff", []), 10),
        ("trust_frac", "tokens clipped / masked / corrected (moving mean of 10 steps)",
         lambda r: trust_region_series(r["metrics"]), 10),
        ("reward", "training reward (moving mean of 10 steps)", lambda r: r["metrics"].get("reward", []), 10),
    ]
    for key, title, get, window in panels:
        fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.2), squeeze=False)
        for ax, setting in zip(axes[0], settings):
            for objective in objectives:
                cell = cells.get((setting, objective))
                curves = [get(r) for r in cell["runs"]] if cell else []
                curves = [c for c in curves if c]
                if not curves:
                    continue
                steps, mean, lo, hi = _mean_curve(curves)
                s_mean = _smooth(steps, mean, window)
                (line,) = ax.plot(*s_mean, label=objective, lw=1.6, marker="o" if window == 1 else None, ms=3)
                if window == 1:
                    ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.12)
            ax.set_title(f"{setting}: {title}", fontsize=9)
            ax.set_xlabel("rollout step")
            ax.grid(alpha=0.3)
        if axes[0][-1].get_legend_handles_labels()[0]:
            axes[0][-1].legend(fontsize=8, loc="best")
        fig.tight_layout()
        name = f"stability_{key}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def write_report(grid: Grid, out: Path, command: str | None = None) -> Path:
    """Write ``out/stability.md`` and its PNGs from the finished runs of ``grid``; returns the report path."""
    out.mkdir(parents=True, exist_ok=True)
    cells = summarise(grid)
    settings = list(dict.fromkeys(r.setting for r in grid.runs))
    objectives = list(dict.fromkeys(r.objective for r in grid.runs))
    plots = _plot(cells, settings, objectives, out)
    meta = grid.meta
    command = command or f"drpo sweep run --grid {grid.path} && drpo sweep report --grid {grid.path} --out {out}"
    lines = [
        "# Does DRPO deliver? Stability under off-policy training",
        "",
        "Reproduce this report (every number and plot below comes from one run of it):",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Grid: `{grid.path}` (base config `{meta.get('base')}`, seeds {meta.get('seeds')}; every run: "
        + ", ".join(f"`{k}={v}`" for k, v in (meta.get("overrides") or {}).items()) + ").",
    ]
    if meta.get("description"):
        lines += ["", str(meta["description"]).strip()]
    lines += [
        "",
        "Definitions: *final* = mean of a run's last two held-out evaluations; *AUC acc* = mean held-out "
        "accuracy over all evaluations (before training included); *AUC reward* = mean training reward over "
        "all steps; *best* = highest evaluation, before training included; *collapse* = after its best evaluation a run "
        "falls below half of that best; "
        "*|π−μ|* = mean absolute probability shift of the sampled tokens from the behaviour policy; "
        "*TR frac* = tokens DRPO corrected (w < 0), DPPO masked, or PPO clipped. "
        "Values are mean ± standard deviation over seeds, in percent except |π−μ|. *s/run* = wall seconds of "
        "one run as it happened (runs shared the CPU with each other and with other jobs): not a speed "
        "comparison. A seed fixes the prompt order and the data of every objective alike, so objectives are "
        "compared seed by seed (paired t-test, two-sided, 95%).",
    ]
    verdicts = []
    for setting in settings:
        lines += ["", f"## Setting `{setting}`", ""]
        lines += [
            "| objective | seeds | before | final | best | AUC acc | AUC reward | collapses | \\|π−μ\\| | TR frac | s/run |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        per_seed: dict[str, dict[int, dict[str, float]]] = {}
        for objective in objectives:
            cell = cells.get((setting, objective), {"per_run": [], "n": 0, "missing": 0})
            rows = cell["per_run"]

            def col(key, pct=True, rows=rows):
                return _fmt(*_mean_sd([r[key] for r in rows]), pct=pct)

            seeds = f"{cell['n']}" + (f" (+{cell['missing']} missing)" if cell["missing"] else "")
            collapses = int(sum(r["collapsed"] for r in rows))
            seconds = f"{statistics.fmean(r['seconds'] for r in rows):.0f}" if rows else "n/a"
            lines.append(
                f"| {objective} | {seeds} | {col('before')} | {col('final')} | {col('best')} | "
                f"{col('auc_accuracy')} | {col('auc_reward')} | {collapses}/{cell['n']} | "
                f"{col('abs_prob_diff', pct=False)} | {col('trust_frac')} | {seconds} |"
            )
            seeds_done = [r["seed"] for r in cell["runs"]]
            per_seed[objective] = dict(zip(seeds_done, rows))
        verdicts.append((setting, _verdict(per_seed)))
        lines += ["", *_paired_table(per_seed)]
    lines += ["", "## Verdict", ""]
    for setting, text in verdicts:
        lines.append(f"- **{setting}**: {text}")
    raw = out / "stability_runs.json"
    raw.write_text(json.dumps({r["name"]: r for cell in cells.values() for r in cell["runs"]}))
    lines += ["", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", f"Every run's metrics, step by step, as collected by the sweep: [`{raw.name}`]({raw.name})."]
    path = out / "stability.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# Two-sided 95% critical values of Student's t for 1..10 degrees of freedom; beyond 10, the 10-df value
# (2.228) is used, which is conservative.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def _paired(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]], key: str) -> tuple[float, float, int]:
    """Mean and standard error of ``a - b`` over the seeds both have (same seed = same data order and
    the same starting evaluation, so the pairing removes most of the seed-to-seed spread)."""
    diffs = [a[s][key] - b[s][key] for s in sorted(set(a) & set(b))]
    if not diffs:
        return float("nan"), float("nan"), 0
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return statistics.fmean(diffs), se, len(diffs)


def paired_test(diff: float, se: float, n: int) -> tuple[float, bool]:
    """Paired t statistic and whether it clears the two-sided 95% level for ``n - 1`` degrees of freedom."""
    if n < 2 or math.isnan(se):
        return float("nan"), False
    if se == 0:
        return (math.inf if diff else 0.0), diff != 0
    t = diff / se
    return t, abs(t) > _T95[min(n - 1, len(_T95)) - 1]


def _paired_table(per_seed: dict[str, dict[int, dict[str, float]]]) -> list[str]:
    """Each DRPO variant minus each other objective, seed by seed: no best-of-N selection involved."""
    drpo = [k for k in per_seed if k.lower().startswith("drpo") and per_seed[k]]
    others = [k for k in per_seed if not k.lower().startswith("drpo") and per_seed[k]]
    if not drpo or not others:
        return []
    rows = ["Paired differences (DRPO variant − other, same seeds; points of accuracy; * = significant at 95%, "
            "paired t-test, not corrected for the number of comparisons: about 1 in 20 is starred by chance "
            "alone):", "", "| DRPO variant | vs | Δ final | t | Δ AUC acc | t |", "|---|---|---|---|---|---|"]
    for d in drpo:
        for o in others:
            cells = []
            for key in ("final", "auc_accuracy"):
                diff, se, n = _paired(per_seed[d], per_seed[o], key)
                t, significant = paired_test(diff, se, n)
                cells += [f"{diff * 100:+.1f}{' *' if significant else ''}", f"{t:.2f}"]
            rows.append(f"| {d} | {o} | {' | '.join(cells)} |")
    return rows


def _verdict(per_seed: dict[str, dict[int, dict[str, float]]]) -> str:
    """Plain words: the best DRPO variant against the best other objective, by final and AUC accuracy,
    compared seed by seed, and whether a paired t-test (two-sided, 95%) separates the gap from seed noise."""
    finals = {k: [r["final"] for r in v.values() if not math.isnan(r["final"])] for k, v in per_seed.items()}
    means = {k: statistics.fmean(v) for k, v in finals.items() if v}
    if not means:
        return "no finished runs."
    ranked = sorted(means, key=means.__getitem__, reverse=True)
    drpo = [k for k in ranked if k.lower().startswith("drpo")]
    others = [k for k in ranked if not k.lower().startswith("drpo")]
    if not drpo or not others:
        return f"best final accuracy: {ranked[0]} ({means[ranked[0]] * 100:.1f}%); nothing to compare it with."
    best, rival = drpo[0], others[0]
    parts = [f"best DRPO variant **{best}** (final {means[best] * 100:.1f}%) vs best other **{rival}** "
             f"(final {means[rival] * 100:.1f}%); overall ranking by final accuracy: {', '.join(ranked)}."]
    outcome = []
    for key, label in (("final", "final accuracy"), ("auc_accuracy", "AUC accuracy")):
        diff, se, n = _paired(per_seed[best], per_seed[rival], key)
        if math.isnan(diff):
            continue
        t, significant = paired_test(diff, se, n)
        if math.isnan(t):
            verdict = f"{n} paired seed(s): too few to judge"
        else:
            verdict = (f"paired t = {t:.2f} over {n} seeds: "
                       + ("significant at 95%" if significant else "not significant at 95%, within seed noise"))
        outcome.append((label, diff, significant, n))
        parts.append(f"{label}: {best} {'+' if diff >= 0 else '−'}{abs(diff) * 100:.1f} points ({verdict}).")
    headline = []
    for label, diff, significant, n in outcome:
        points = f"{abs(diff) * 100:.1f} points"
        if n < 2:
            headline.append(f"too few paired seeds ({n}) to judge {label}")
        elif significant:
            headline.append(f"DRPO came out {'ahead' if diff > 0 else 'behind'} on {label} by {points}")
        elif diff <= 0:
            headline.append(f"DRPO did not come out ahead on {label} (it trailed by {points}, within seed noise)")
        else:
            headline.append(f"DRPO led on {label} by {points}, but within seed noise")
    if headline:
        parts.insert(0, f"**{'; '.join(headline)}.**")
    collapses = {k: int(sum(r["collapsed"] for r in v.values())) for k, v in per_seed.items()}
    worst = [f"{k} {c}/{len(per_seed[k])}" for k, c in collapses.items() if c]
    parts.append(f"Collapses: {', '.join(worst)}." if worst else "No run collapsed.")
    return " ".join(parts)
