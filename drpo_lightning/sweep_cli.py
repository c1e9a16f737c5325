"""``drpo sweep run|status|report``: the command line of :mod:`drpo_lightning.sweep` (running a grid) and
:mod:`drpo_lightning.study` (its report). It lives here so that neither of the two imports the other's
command: ``study`` reads ``sweep``'s grid and results, and ``sweep`` knows nothing of reports."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from drpo_lightning import sweep
from drpo_lightning.study import write_report
from drpo_lightning.sweep import load_grid, run_grid


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drpo sweep", description=sweep.__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    for action, help_ in (("run", "run the unfinished runs"), ("status", "list runs and their state"),
                          ("report", "write the report of a finished sweep: tables, plots, raw JSON")):
        p = sub.add_parser(action, help=help_)
        p.add_argument("--grid", required=True, help="grid YAML file")
        p.add_argument("--out-dir", default=None, help="override the grid's out_dir")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key in every run, after the grid's own layers (repeatable; "
                            "e.g. --set trainer.max_steps=4 for a quick trial: use its own --out-dir, and the "
                            "same --set for status and report)")
        if action == "run":
            p.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the grid's jobs)")
            p.add_argument("--only", default=None, help="regular expression on run names to restrict to")
        if action == "report":
            p.add_argument("--out", default="docs/results", help="folder for the report and its plots")
            p.add_argument("--command", default=None, help="the command line to print at the report's top")
    args = parser.parse_args(list(argv) if argv is not None else None)
    grid = load_grid(args.grid, args.out_dir, overrides=sweep.parse_overrides(args.overrides))
    if args.action == "status":
        for run in grid.runs:
            print(f"{run.state():<8} {run.name}")
        return 0
    if args.action == "run":
        counts = run_grid(grid, jobs=args.jobs, only=args.only)
        return 1 if counts["failed"] else 0
    path = write_report(grid, Path(args.out), command=args.command)
    print(f"sweep: report written to {path}")
    return 0
