"""What a run leaves behind: a closing summary of ``drpo fit``, and plots of its metrics.

:class:`RunSummary` (a callback, rank 0 only) prints, at the end of ``drpo fit``, the held-out accuracy
before -> after, the rollout steps and optimizer updates made, wall time, throughput, skipped updates, and
where the metrics, checkpoints, export and plots are; it writes ``summary.json`` and the PNG plots into the
run folder. It keeps its own copy of the metrics it plots, so it works with any logger or none, and with
validation off.

``drpo plot-run RUN_DIR`` (:func:`main`) draws the same plots for any finished or interrupted run from what
its logger wrote: ``metrics.csv`` (CSVLogger) or the TensorBoard event files (TensorBoardLogger).

Plots (x-axis: rollout steps, i.e. batches of prompts, whatever ``ppo_epochs x num_minibatches`` is):
``plots/reward.png`` (training reward), ``plots/accuracy.png`` (held-out accuracy) and
``plots/trust_region.png`` (every metric the objective logs under its own prefix: ``drpo/*``, ``dppo/*``,
``ppo/*`` or a plugin's). They need matplotlib (``pip install "drpo-lightning[plot]"``); without it the
summary says so and everything else works.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from drpo_lightning.errors import UserError
from drpo_lightning.progress import clock, planned_rollouts, rollouts_done, updates_per_rollout

PLOT_HINT = 'pip install "drpo-lightning[plot]" (matplotlib), then: drpo plot-run {run}'
NOT_OBJECTIVE = ("reward", "val", "train", "perf", "completion", "advantage", "test", "epoch", "step")
"""Metric prefixes that belong to the loop, not to the objective (whose metrics go on trust_region.png)."""
SUMMARY_FILE = "summary.json"

Series = dict[str, dict[int, float]]
"""metric name -> {rollout step (1 = after the first rollout; 0 = before training): value}."""


def objective_metrics(series: Series) -> list[str]:
    return sorted(k for k in series if "/" in k and k.split("/", 1)[0] not in NOT_OBJECTIVE and series[k])


# -- reading a finished run ---------------------------------------------------------------------------
def read_metrics_csv(path: Path) -> Series:
    """A CSVLogger file. Its ``step`` is the 0-based index of the rollout that logged the row (Lightning
    counts batches for manual optimisation), so rollout step = step + 1 whatever the updates per rollout."""
    series: Series = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                x = int(float(row["step"])) + 1
            except (KeyError, TypeError, ValueError):
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                try:
                    series.setdefault(key, {})[x] = float(value)
                except ValueError:
                    continue
    return series


def read_tensorboard(folder: Path) -> Series:
    """The scalars of TensorBoard event files in ``folder`` (same step convention as metrics.csv)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as err:
        raise UserError(f"{folder}: holds TensorBoard event files; reading them needs tensorboard: "
                        "pip install 'drpo-lightning[tensorboard]'") from err
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    series: Series = {}
    for tag in accumulator.Tags().get("scalars", []):
        series[tag] = {int(event.step) + 1: float(event.value) for event in accumulator.Scalars(tag)}
    return series


def find_run(path: Path) -> Path:
    """The run folder at or under ``path``: the newest one holding metrics.csv or TensorBoard events."""
    if not path.is_dir():
        raise UserError(f"{path}: no such folder (give the run folder, e.g. runs/quickstart/drpo/version_0)")
    candidates = [p.parent for p in path.rglob("metrics.csv")]
    candidates += [p.parent for p in path.rglob("events.out.tfevents.*")]
    if not candidates:
        raise UserError(f"{path}: no metrics.csv or TensorBoard event file in it or below it (the run logged "
                        "nothing: was trainer.logger off?)")
    if path in candidates:
        return path
    return max(set(candidates), key=lambda p: max(f.stat().st_mtime for f in p.iterdir()))


def load_run(run: Path) -> tuple[Series, dict[str, Any]]:
    """The metrics of a run folder, plus its ``summary.json`` (accuracy before training) if it has one."""
    series = read_metrics_csv(run / "metrics.csv") if (run / "metrics.csv").is_file() else read_tensorboard(run)
    info: dict[str, Any] = {}
    if (run / SUMMARY_FILE).is_file():
        info = json.loads((run / SUMMARY_FILE).read_text())
    before = info.get("accuracy_before")
    if before is not None and "val/accuracy" in series:
        series["val/accuracy"].setdefault(0, float(before))
    return series, info


# -- drawing ------------------------------------------------------------------------------------------
def _moving_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _points(curve: dict[int, float]) -> tuple[list[int], list[float]]:
    xs = sorted(x for x, v in curve.items() if math.isfinite(v))
    return xs, [curve[x] for x in xs]


def write_plots(series: Series, folder: Path, title: str = "") -> list[Path]:
    """PNG plots of ``series`` into ``folder``; only those with data. Raises ImportError without matplotlib."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        written.append(folder / name)

    if series.get("reward"):
        xs, ys = _points(series["reward"])
        fig = Figure(figsize=(6.4, 4))
        ax = fig.add_subplot()
        ax.plot(xs, ys, color="tab:blue", alpha=0.35, linewidth=1, label="per rollout step")
        window = max(1, len(xs) // 10)
        ax.plot(xs, _moving_mean(ys, window), color="tab:blue", linewidth=2, label=f"mean of {window} steps")
        ax.set(xlabel="rollout step", ylabel="training reward (batch mean)", title=title or "training reward")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "reward.png")
    if series.get("val/accuracy"):
        xs, ys = _points(series["val/accuracy"])
        fig = Figure(figsize=(6.4, 4))
        ax = fig.add_subplot()
        ax.plot(xs, ys, marker="o", color="tab:green")
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        ax.set(xlabel="rollout step (0 = before training)", ylabel="held-out accuracy",
               title=title or "held-out accuracy")
        ax.margins(x=0.06, y=0.15)  # room for the labels above the points
        ax.grid(alpha=0.3)
        save(fig, "accuracy.png")
    names = objective_metrics(series)
    if names:
        cols = min(3, len(names))
        rows = math.ceil(len(names) / cols)
        fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
        for i, name in enumerate(names):
            ax = fig.add_subplot(rows, cols, i + 1)
            xs, ys = _points(series[name])
            ax.plot(xs, ys, color="tab:red", linewidth=1)
            ax.set(xlabel="rollout step", title=name)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{title}: the objective's trust region" if title else "the objective's trust region")
        save(fig, "trust_region.png")
    return written


# -- the callback -------------------------------------------------------------------------------------
class RunSummary(Callback):
    """At the end of ``drpo fit`` (rank 0): the closing summary, ``summary.json`` and the plots.

    Args:
        plots: write the PNG plots into ``<run folder>/plots``.
    """

    def __init__(self, plots: bool = True) -> None:
        self.plots = plots
        self.series: Series = {}
        self._start: float | None = None
        self._start_rollouts = 0
        self._start_updates = 0
        self._failed = False
        self._done = False

    def on_fit_start(self, trainer, pl_module) -> None:
        self.series, self._failed, self._done = {}, False, False
        self._start = time.monotonic()

    def on_train_start(self, trainer, pl_module) -> None:
        self._start_rollouts = rollouts_done(trainer)  # > 0 on a resume
        self._start_updates = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        x = rollouts_done(trainer)
        for key, value in trainer.callback_metrics.items():
            if not key.startswith(("val/", "test/")):
                self.series.setdefault(key, {})[x] = float(value)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val/accuracy" not in trainer.callback_metrics:
            return
        x = rollouts_done(trainer)
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val/"):
                self.series.setdefault(key, {})[x] = float(value)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Ctrl-C still gets its summary (what was done, where it is); an error gets only its error message.
        if isinstance(exception, KeyboardInterrupt):
            self._finish(trainer, pl_module, interrupted=True)
        self._failed = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and not self._failed:
            self._finish(trainer, pl_module, interrupted=False)

    # -- the report ----------------------------------------------------------------------------------
    def run_folder(self, trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _finish(self, trainer, pl_module, interrupted: bool) -> None:
        if self._done or not trainer.is_global_zero:
            return
        self._done = True
        folder = self.run_folder(trainer)
        before = getattr(pl_module, "initial_val_accuracy", None)
        if before is not None and self.series.get("val/accuracy"):
            self.series["val/accuracy"].setdefault(0, float(before))
        info = self.facts(trainer, pl_module, interrupted)
        plots, plot_note = [], None
        if self.plots and (self.series.get("reward") or self.series.get("val/accuracy")):
            try:
                plots = write_plots(self.series, folder / "plots")
            except ImportError:
                plot_note = PLOT_HINT.format(run=folder)
        info["plots"] = [str(p) for p in plots]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SUMMARY_FILE).write_text(json.dumps(info, indent=2) + "\n")
        print(self.format(info, trainer, pl_module, plot_note), flush=True)

    def facts(self, trainer, pl_module, interrupted: bool) -> dict[str, Any]:
        """The numbers of the summary, as written to summary.json."""
        steps = self.series.get("perf/step_s", {})
        rates = self.series.get("perf/tokens_per_s", {})
        busy = sum(steps.values())
        tokens = sum(rates[x] * steps[x] for x in steps if x in rates)
        accuracy = self.series.get("val/accuracy", {})
        after = accuracy[max(accuracy)] if accuracy and max(accuracy) > 0 else None
        return {
            "interrupted": interrupted,
            "accuracy_before": getattr(pl_module, "initial_val_accuracy", None),
            "accuracy_after": after,
            "accuracy_after_step": max(accuracy) if after is not None else None,
            "val_num_samples": int((getattr(pl_module, "hparams", {}) or {}).get("val_num_samples", 1)),
            # An asynchronous feed draws k prompt batches ahead of training: count the batches trained on.
            "rollouts": rollouts_done(trainer) - len(getattr(getattr(pl_module, "feed", None), "pending", ()) or ()),
            "rollouts_planned": planned_rollouts(trainer, pl_module),
            "rollouts_this_run": rollouts_done(trainer) - self._start_rollouts,
            "updates": int(trainer.global_step),
            "updates_per_rollout": updates_per_rollout(pl_module),
            "skipped_updates": int(getattr(pl_module, "skipped_updates", 0)),
            "wall_seconds": time.monotonic() - self._start if self._start is not None else None,
            "tokens_per_second": tokens / busy if busy > 0 else None,
        }

    def format(self, info: dict[str, Any], trainer, pl_module, plot_note: str | None) -> str:
        done, planned = info["rollouts"], info["rollouts_planned"]
        what = "interrupted" if info["interrupted"] else "finished"
        steps = f"{done}/{planned}" if planned and planned != done else f"{done}"
        wall = clock(info["wall_seconds"]) if info["wall_seconds"] is not None else "?"
        lines = [f"drpo fit {what}: {steps} rollout steps, {info['updates']} optimizer updates "
                 f"({info['updates_per_rollout']} per rollout), {info['skipped_updates']} skipped, in {wall}"
                 + (f", {info['tokens_per_second']:,.0f} generated tokens/s" if info["tokens_per_second"] else "")]
        k = info["val_num_samples"]
        before, after = info["accuracy_before"], info["accuracy_after"]
        fmt = (lambda v: "not measured" if v is None else f"{v:.3f}")  # noqa: E731
        if before is None and after is None:
            lines.append("  held-out accuracy: not measured (validation is off: limit_val_batches 0 or no "
                         "held-out data)")
        else:
            at = f" (at rollout step {info['accuracy_after_step']})" if after is not None else ""
            lines.append(f"  held-out accuracy (mean@{k}): {fmt(before)} -> {fmt(after)}{at}")
        lines += [f"  {label:<12} {text}" for label, text in self.locations(trainer, pl_module)]
        if info["plots"]:
            first = Path(info["plots"][0]).parent
            names = ", ".join(Path(p).name for p in info["plots"])
            lines.append(f"  {'plots':<12} {first}/ ({names})")
        elif plot_note:
            lines.append(f"  {'plots':<12} not drawn: {plot_note}")
        return "\n".join(lines)

    def locations(self, trainer, pl_module) -> list[tuple[str, str]]:
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        out = []
        loggers = trainer.loggers
        for logger in loggers:
            if isinstance(logger, CSVLogger):
                out.append(("metrics", str(Path(logger.log_dir) / "metrics.csv")))
            elif isinstance(logger, TensorBoardLogger):
                out.append(("metrics", f"{logger.log_dir} (tensorboard --logdir {logger.log_dir})"))
            else:
                out.append(("metrics", f"{type(logger).__name__}"))
        if not loggers:
            out.append(("metrics", "not written (trainer.logger is off)"))
        saved = []
        for callback in trainer.checkpoint_callbacks:
            folder = Path(callback.dirpath) if callback.dirpath else None
            if folder is not None and folder.is_dir():
                files = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
                if files:
                    saved.append(f"{folder}/ ({', '.join(files)})")
        out.append(("checkpoints", "; ".join(saved) if saved else "none saved"))
        export = getattr(pl_module, "export_path", None)
        if export:
            hparams = getattr(pl_module, "hparams", {}) or {}
            adapters = hparams.get("lora") is not None and not hparams.get("merge_adapters_on_export")
            out.append(("export", f"{export} ({'peft adapter' if adapters else 'Hugging Face model'} folder)"))
        out.append(("summary", str(self.run_folder(trainer) / SUMMARY_FILE)))
        return out


# -- drpo plot-run --------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``drpo plot-run RUN_DIR``: the plots of a finished or interrupted run, from what its logger wrote."""
    parser = argparse.ArgumentParser(
        prog="drpo plot-run",
        description="Draw training reward, held-out accuracy and the objective's trust-region metrics against "
        "rollout steps as PNG, from a run folder's metrics.csv or TensorBoard event files (any finished or "
        "interrupted run). Needs matplotlib: pip install 'drpo-lightning[plot]'.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path,
                        help="the run folder (e.g. runs/quickstart/drpo/version_0), or a folder above it: its "
                        "newest run is drawn")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="the folder the PNGs go into (default: plots/ in the run folder)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run = find_run(args.run_dir)
        series, _ = load_run(run)
        if not series:
            raise UserError(f"{run}: its metrics are empty (the run stopped before its first step was logged)")
        try:
            written = write_plots(series, args.out or run / "plots", title="/".join(run.resolve().parts[-3:]))
        except ImportError as err:
            raise UserError(f"drpo plot-run needs matplotlib: {PLOT_HINT.format(run=args.run_dir)}") from err
        except OSError as err:
            raise UserError(f"{args.out or run / 'plots'}: cannot be written: {err.strerror or err}") from err
    except UserError as err:
        print(f"drpo: error: {err}", file=sys.stderr)
        return 2
    if not written:
        print(f"drpo: error: {run}: no reward, val/accuracy or objective metric to draw", file=sys.stderr)
        return 2
    print(f"{run}: wrote " + ", ".join(str(p) for p in written))
    return 0


def add_run_callbacks(trainer_config: Any) -> None:
    """Add the summary, the step progress bar and the one-line model summary to a Trainer config (the
    ``trainer`` mapping/Namespace of the CLI, before the Trainer is built), unless switched off there
    (``enable_progress_bar: false``, ``enable_model_summary: false``) or already given."""
    from lightning.pytorch.callbacks import ModelSummary, ProgressBar

    from drpo_lightning.progress import ParamsSummary, StepProgressBar

    callbacks = trainer_config.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    if not any(isinstance(c, RunSummary) for c in callbacks):
        callbacks.append(RunSummary())
    if trainer_config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar)
                                                                          for c in callbacks):
        callbacks.append(StepProgressBar())
    if trainer_config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary)
                                                                           for c in callbacks):
        callbacks.append(ParamsSummary())
    trainer_config["callbacks"] = callbacks
