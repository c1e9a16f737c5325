"""``drpo sweep``: run a grid of ``drpo fit`` configs x seeds, resumably, and collect each run's metrics.

::

    drpo sweep run    --grid configs/study/stability.yaml          # runs what is not finished yet
    drpo sweep status --grid configs/study/stability.yaml          # what is done, failed, pending
    drpo sweep report --grid configs/study/stability.yaml --out docs/results

A grid file names a base config and the axes to cross. Every run gets a complete, self-contained config
written to ``<out_dir>/<setting>/<objective>/seed<k>/config.yaml`` (the base with the overrides applied), so
``drpo fit --config`` on that file alone reproduces the run. Overrides are dotted keys into the YAML::

    base: ../quickstart.yaml           # relative to the grid file
    out_dir: runs/stability            # relative to the working directory
    seeds: [0, 1, 2]
    jobs: 2                            # runs at a time (each gets cpu_count // jobs threads)
    overrides: {trainer.max_steps: 60} # applied to every run
    settings:                          # how the run is made off-policy
      stale: {model.num_minibatches: 4, model.rollout.init_args.precision: bf16}
    objectives:
      drpo_0.2: {model.objective: {class_path: drpo, init_args: {delta: 0.2}}}
    report:                            # read by `drpo sweep report` only; editing it reruns nothing
      primary: auc_acc                 # the metric the verdict is decided on: auc_acc or final
      eval_noise: "mean@4 over 500 prompts: ..."  # optional texts printed at the top of the report
      # title: ..., description: ...

A run is finished when its ``result.json`` exists and its saved ``config.yaml`` is still the grid's (edit the
grid and the affected runs become *stale*: rerun, and never reported). ``run`` skips finished runs, so an
interrupted sweep picks up where it stopped (a run cut off half-way starts again from scratch: its folder is
cleared). A failed run (non-zero exit, or stopped before the step ``trainer.max_steps`` sets, as after a
SIGTERM) writes ``failed.json`` with the reason and the tail of its log and does not stop the others; the next
``run`` tries it again. One ``run`` at a time per ``out_dir`` (a lock file refuses a second; the ``drpo fit``
processes of a killed sweep, and any process they fork, keep holding it until they end).

``result.json`` holds the held-out accuracy before training and every logged metric as ``[step, value]``
pairs; :mod:`drpo_lightning.study` turns a finished sweep into the stability report.
"""

from __future__ import annotations

import copy
import csv
import fcntl
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from drpo_lightning.errors import ConfigError

__all__ = ["Grid", "Run", "load_grid", "run_grid", "read_result", "REPORT_KEYS", "REPORT_PRIMARY"]

# The grid file's optional ``report:`` mapping. It is checked when the grid is loaded, so that a misspelt key
# fails `drpo sweep run` before the runs instead of `drpo sweep report` after them: the primary metric has to
# be fixed before the results are seen.
REPORT_KEYS = ("primary", "title", "description", "eval_noise")
REPORT_PRIMARY = ("auc_acc", "final")

BEFORE_RE = re.compile(r"held-out accuracy before training \(mean@\d+\): ([0-9.]+)")
# What `drpo fit` prints when it ends: Lightning's own line at max_steps, RLCheckpoint's on a SIGTERM stop.
MAX_STEPS_RE = re.compile(r"`Trainer\.fit` stopped: `max_steps=(\d+)` reached")
SIGTERM_RE = re.compile(r"SIGTERM: saved the checkpoint of step (\d+)")


@dataclass
class Run:
    """One cell of the grid: a setting, an objective and a seed."""

    setting: str
    objective: str
    seed: int
    config: dict[str, Any]
    folder: Path

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.objective}/seed{self.seed}"

    @property
    def result_path(self) -> Path:
        return self.folder / "result.json"

    @property
    def failed_path(self) -> Path:
        return self.folder / "failed.json"

    def state(self) -> str:
        """``done``, ``failed``, ``pending``, or ``stale``: finished, but with a config that is no longer the
        grid's (the grid was edited after the run), so it is rerun and kept out of reports."""
        if self.result_path.is_file():
            saved = self.folder / "config.yaml"
            if not saved.is_file() or yaml.safe_load(saved.read_text()) != self.config:
                return "stale"
            return "done"
        return "failed" if self.failed_path.is_file() else "pending"


@dataclass
class Grid:
    """A parsed grid file: the cross product of settings x objectives x seeds."""

    path: Path
    out_dir: Path
    runs: list[Run]
    jobs: int = 1
    meta: dict[str, Any] = field(default_factory=dict)


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(cfg, "model.rollout.init_args.precision", "bf16")``: create the path as needed.

    A plugin given by name (``objective: drpo``) becomes ``{class_path: drpo}`` when an ``init_args`` key is
    set below it, so short and long forms mix.
    """
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and parts[i + 1] == "init_args":
            child = node[part] = {"class_path": child}
        elif not isinstance(child, dict):
            if child is not None:
                raise ConfigError(f"sweep override {key!r}: {'.'.join(parts[: i + 1])} is {child!r}, not a mapping")
            child = node[part] = {}
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of names to overrides, got {type(value).__name__}")
    return value


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["trainer.max_steps=4", ...]`` -> ``{"trainer.max_steps": 4}`` (values read as YAML)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set trainer.max_steps=4")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not YAML: {str(err).splitlines()[0]}") from None
    return overrides


def load_grid(path: str | os.PathLike, out_dir: str | None = None,
              overrides: dict[str, Any] | None = None) -> Grid:
    """Read a grid file and expand it into runs (nothing is started). ``overrides`` (dotted keys) apply to
    every run after the grid's own layers (``drpo sweep run --set KEY=VALUE``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--grid: {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict) or "base" not in spec:
        raise ConfigError(f"{path}: a grid file needs a 'base' config (path relative to the grid file)")
    base_path = (path.parent / spec["base"]).resolve()
    if not base_path.is_file():
        raise ConfigError(f"{path}: base config {spec['base']!r} not found at {base_path}")
    base = yaml.safe_load(base_path.read_text()) or {}
    seeds = spec.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ConfigError(f"{path}: seeds must be a non-empty list of distinct integers >= 0, got {seeds!r}")
    settings = _mapping(spec.get("settings"), f"{path}: settings") or {"default": {}}
    objectives = _mapping(spec.get("objectives"), f"{path}: objectives") or {"default": {}}
    grid_overrides = _mapping(spec.get("overrides"), f"{path}: overrides")
    for kind, names in (("settings", settings), ("objectives", objectives)):
        for name in names:
            if not isinstance(name, str) or not re.fullmatch(r"[\w.+-]+", name) or name in (".", ".."):
                raise ConfigError(f"{path}: {kind} name {name!r} must be a plain folder name (letters, digits, . _ + -)")
    try:
        jobs = int(spec.get("jobs", 1))
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: jobs must be an integer, got {spec.get('jobs')!r}") from None
    root = Path(out_dir or spec.get("out_dir") or "runs/sweep")
    runs = []
    for setting, setting_over in settings.items():
        for objective, objective_over in objectives.items():
            for seed in seeds:
                folder = root / setting / objective / f"seed{seed}"
                config = copy.deepcopy(base)
                for layer in (grid_overrides, _mapping(setting_over, f"settings.{setting}"),
                              _mapping(objective_over, f"objectives.{objective}"), overrides or {}):
                    for key, value in layer.items():
                        set_dotted(config, key, value)
                _localise(config, folder, seed)
                runs.append(Run(setting, objective, seed, config, folder))
    meta = {k: v for k, v in spec.items() if k not in ("settings", "objectives")}
    meta["report"] = _report_options(spec.get("report"), path)
    return Grid(path=path, out_dir=root, runs=runs, jobs=jobs, meta=meta)


def _report_options(value: Any, path: Path) -> dict[str, str]:
    """The grid's ``report:`` mapping, checked (see ``REPORT_KEYS``); ``{}`` when the grid has none."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: report must be a mapping with keys {', '.join(REPORT_KEYS)}, "
                          f"got {type(value).__name__}")
    for key, text in value.items():
        if key not in REPORT_KEYS:
            raise ConfigError(f"{path}: unknown key report.{key} (expected one of {', '.join(REPORT_KEYS)})")
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{path}: report.{key} must be a non-empty string, got {text!r}")
    if "primary" in value and value["primary"] not in REPORT_PRIMARY:
        raise ConfigError(f"{path}: report.primary must be one of {', '.join(REPORT_PRIMARY)}, "
                          f"got {value['primary']!r}")
    return {key: value[key].strip() for key in value}


def _localise(config: dict[str, Any], folder: Path, seed: int) -> None:
    """Point every output of the run into its own folder and set its seed."""
    config["seed_everything"] = seed
    data = config.setdefault("data", {})
    if isinstance(data, dict):
        data["seed"] = seed  # the prompt order and split follow the seed too (the data module's default is 0)
    trainer = config.setdefault("trainer", {})
    trainer["default_root_dir"] = str(folder)
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                         "init_args": {"save_dir": str(folder), "name": "logs", "version": 0}}
    trainer["enable_progress_bar"] = False
    model = config.setdefault("model", {})
    model["export_dir"] = ""  # a sweep keeps metrics, not models; checkpoints still go to the run folder


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def read_metrics(csv_path: Path) -> dict[str, list[list[float]]]:
    """``metrics.csv`` of a CSVLogger as ``{metric: [[step, value], ...]}`` (empty cells skipped)."""
    series: dict[str, list[list[float]]] = {}
    with csv_path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            step = row.get("step")
            if step in (None, ""):
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                number = float(value)
                if math.isfinite(number):
                    series.setdefault(key, []).append([int(float(step)), number])
    return series


def read_result(run: Run) -> dict[str, Any]:
    return json.loads(run.result_path.read_text())


def _updates_per_rollout(config: dict[str, Any]) -> int:
    model = config.get("model") or {}
    return int(model.get("ppo_epochs", 1)) * int(model.get("num_minibatches", 1))


def _expected_rollouts(config: dict[str, Any]) -> int | None:
    """Rollout steps a finished run has made: ``trainer.max_steps`` counts optimizer updates, and each
    rollout makes ``ppo_epochs * num_minibatches`` of them. None when the run is not bounded by max_steps."""
    max_steps = (config.get("trainer") or {}).get("max_steps")
    if not isinstance(max_steps, int) or max_steps <= 0:
        return None
    return math.ceil(max_steps / _updates_per_rollout(config))


def _rollouts_reached(config: dict[str, Any], log_text: str, metrics: dict[str, list[list[float]]]) -> int:
    """Rollout steps the run actually made. ``metrics.csv`` alone cannot tell: with
    ``trainer.log_every_n_steps: k`` it holds every k-th rollout only, and the last may be missing. So the
    optimizer step the run says it stopped at comes first (Lightning's "max_steps reached" line, or the step
    of the checkpoint saved on SIGTERM); without either, the last logged rollout (steps count from 0)."""
    updates = _updates_per_rollout(config)
    reached = [math.ceil(int(m.group(1)) / updates) for m in (*MAX_STEPS_RE.finditer(log_text),
                                                                 *SIGTERM_RE.finditer(log_text))]
    reached += [int(step) + 1 for step, _ in metrics.get("reward", [])[-1:]]
    return max(reached, default=0)


def _failed(run: Run, rc: int, seconds: float, reason: str) -> str:
    """Write the run's ``failed.json`` (why, and the tail of its log) and return ``failed``."""
    run.failed_path.write_text(json.dumps({"returncode": rc, "seconds": round(seconds, 1), "reason": reason,
                                           "log_tail": _tail(run.folder / "log.txt")}, indent=1))
    return "failed"


def execute(run: Run, threads: int, command: Sequence[str] | None = None, lock_fd: int | None = None) -> str:
    """Run one grid cell to completion in a subprocess; returns ``done`` or ``failed``.

    ``lock_fd``, the sweep's locked ``.sweep.lock``, is inherited by the subprocess: if the sweep itself is
    killed, the lock stays held until its ``drpo fit`` children have exited too, so a new sweep cannot clear
    and rerun a folder that an orphaned run is still writing.
    """
    config_path = _fresh_folder(run)
    argv = list(command or [sys.executable, "-m", "drpo_lightning.cli"]) + ["fit", "--config", str(config_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log_path = run.folder / "log.txt"
    start = time.perf_counter()
    with log_path.open("w") as log:
        rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, check=False,
                            pass_fds=() if lock_fd is None else (lock_fd,)).returncode
    seconds = time.perf_counter() - start
    metrics_csv = run.folder / "logs" / "version_0" / "metrics.csv"
    if rc != 0 or not metrics_csv.is_file():
        return _failed(run, rc, seconds, f"exit code {rc}" if rc else "no metrics.csv was written")
    metrics = read_metrics(metrics_csv)
    log_text = log_path.read_text(errors="replace")
    expected = _expected_rollouts(run.config)
    done = _rollouts_reached(run.config, log_text, metrics) if expected is not None else None
    if expected is not None and done < expected:
        # `drpo fit` exits 0 after a SIGTERM (it saves and stops cleanly): a truncated run is not a result.
        return _failed(run, rc, seconds, f"stopped after {done} of {expected} rollouts")
    before = BEFORE_RE.search(log_text)
    result = {
        "name": run.name, "setting": run.setting, "objective": run.objective, "seed": run.seed,
        "seconds": round(seconds, 1),
        "val_accuracy_before": float(before.group(1)) if before else None,
        "metrics": metrics,
    }
    return _write_result(run, result)


def _fresh_folder(run: Run) -> Path:
    """Empty the run's folder and write its ``config.yaml`` (returned): a run cut off half-way starts again,
    since partial metrics are not results."""
    if run.folder.exists():
        shutil.rmtree(run.folder)
    run.folder.mkdir(parents=True)
    config_path = run.folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(run.config, sort_keys=False))
    return config_path


def _write_result(run: Run, result: dict[str, Any]) -> str:
    tmp = run.result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, run.result_path)  # result.json appears whole or not at all: it is the "done" marker
    run.failed_path.unlink(missing_ok=True)
    return "done"


def _work(run: Run) -> str:
    """The run's config without the outputs :func:`_localise` points into its folder: two runs with the same
    work train exactly the same thing (e.g. an on-policy reference arm that ignores every setting)."""
    config = copy.deepcopy(run.config)
    for key in ("default_root_dir", "logger"):
        (config.get("trainer") or {}).pop(key, None)
    return json.dumps(config, sort_keys=True, default=str)


def _twins(runs: list[Run]) -> dict[str, Run]:
    """run name -> the earlier run of the grid with the same work, for the runs that have one."""
    first: dict[str, Run] = {}
    twins = {}
    for run in runs:
        key = _work(run)
        if key in first:
            twins[run.name] = first[key]
        else:
            first[key] = run
    return twins


def _copy_result(twin: Run, run: Run) -> str:
    """Record ``twin``'s finished result as ``run``'s own (a seeded run is reproducible, so rerunning it
    would only spend the time again); ``copied_from`` says where it came from."""
    result = read_result(twin)
    result.update(name=run.name, setting=run.setting, objective=run.objective, seed=run.seed,
                  copied_from=twin.name)
    _fresh_folder(run)
    return _write_result(run, result)


def run_grid(grid: Grid, jobs: int | None = None, only: str | None = None,
             command: Sequence[str] | None = None, echo=print) -> dict[str, int]:
    """Run every unfinished run of the grid, ``jobs`` at a time; returns counts by outcome."""
    jobs = max(1, jobs or grid.jobs)
    grid.out_dir.mkdir(parents=True, exist_ok=True)
    lock = (grid.out_dir / ".sweep.lock").open("w")
    try:
        # Held until this process and every `drpo fit` it started (they inherit the fd) have ended.
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ConfigError(f"another `drpo sweep run` (or a `drpo fit` it started, still running after it was "
                          f"killed) is writing to {grid.out_dir}; wait for it or stop it") from None
    try:
        return _run_locked(grid, jobs, only, command, echo, lock.fileno())
    finally:
        lock.close()


def _run_locked(grid: Grid, jobs: int, only: str | None, command, echo, lock_fd: int) -> dict[str, int]:
    try:
        pattern = re.compile(only) if only is not None else None
    except re.error as err:
        raise ConfigError(f"--only {only!r} is not a regular expression: {err}") from None
    states = {r.name: r.state() for r in grid.runs}  # each reads the run's result and config: once per run
    todo = [r for r in grid.runs if states[r.name] != "done" and (pattern is None or pattern.search(r.name))]
    counts = {"skipped": list(states.values()).count("done"), "done": 0, "failed": 0}
    stale = sum(states[r.name] == "stale" for r in todo)
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    echo(f"sweep: {len(grid.runs)} runs, {counts['skipped']} finished, {len(todo)} to run"
         + (f" ({stale} finished with an older config: rerun)" if stale else "") + " "
         f"({jobs} at a time, {threads} thread(s) each) -> {grid.out_dir}")

    twins = _twins(grid.runs)

    def one(run: Run) -> str:
        start = time.perf_counter()
        twin = twins.get(run.name)
        if twin is not None and twin.state() == "done":
            outcome = _copy_result(twin, run)
            echo(f"sweep: {outcome:<6} {run.name} (the same run as {twin.name}: its result is copied)")
            return outcome
        outcome = execute(run, threads, command, lock_fd)
        echo(f"sweep: {outcome:<6} {run.name} ({time.perf_counter() - start:.0f} s)")
        return outcome

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for outcome in pool.map(one, todo):
            counts[outcome] += 1
    echo(f"sweep: {counts['done']} done, {counts['failed']} failed, {counts['skipped']} already finished")
    return counts
