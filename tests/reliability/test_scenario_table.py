"""docs/reliability.md lists every test of this folder, each once, and nothing else; its stated count is right."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from rel_helpers import ROOT

HERE = Path(__file__).resolve().parent
DOC = ROOT / "docs" / "reliability.md"
ENTRY = re.compile(r"`(test_\w+\.py)::(test_\w+)(\[[^\]`]+\])?`")


def documented() -> list[tuple[str, str]]:
    """(file, test name with [id]) for every entry of the scenario table, in order."""
    table = DOC.read_text().split("## Scenarios", 1)[1]
    return [(f, name + (param or "")) for f, name, param in ENTRY.findall(table)]


def test_the_scenario_table_lists_each_reliability_test_exactly_once(request):
    entries = documented()
    assert len(entries) == len(set(entries)), "a test is listed twice"
    stated = re.search(r"\*\*(\d+) tests\*\*", DOC.read_text())
    assert stated and int(stated.group(1)) == len(entries), "the count in the doc is not the number of rows"
    # Every documented test exists (file and function), whatever this session collected.
    for file, name in entries:
        module = importlib.import_module(file.removesuffix(".py"))
        assert callable(getattr(module, name.split("[")[0], None)), f"{file}::{name} is not a test"
    # Files this session collected in full (no -k / -m selection) match the table exactly, parameters included.
    options = request.config.option
    if getattr(options, "keyword", "") or getattr(options, "markexpr", ""):
        return
    collected: dict[str, set[str]] = {}
    for item in request.session.items:
        path = Path(str(item.fspath)).resolve()
        if path.parent == HERE:
            collected.setdefault(path.name, set()).add(item.name)
    for file, names in collected.items():
        assert {n for f, n in entries if f == file} == names, file
    files_here = {p.name for p in HERE.glob("test_*.py")}
    assert {f for f, _ in entries} == files_here
