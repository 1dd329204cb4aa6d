"""pyflakes over the code, tests and benchmarks (the same check as `make lint`): no unused import
or variable, no undefined name. Dead imports are how stale code hides."""

from __future__ import annotations

import re
from pathlib import Path

from pyflakes.api import checkRecursive
from pyflakes.reporter import Reporter

REPO = Path(__file__).resolve().parents[2]


class _Collect:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        self.lines += [x for x in text.splitlines() if x.strip()]


def test_pyflakes_finds_nothing():
    paths = re.search(r"^LINT_PATHS := (.+)$", (REPO / "Makefile").read_text(), re.M).group(1).split()
    assert "r4b_core" in paths and "tests" in paths
    out, err = _Collect(), _Collect()
    found = checkRecursive([str(REPO / p) for p in paths], Reporter(out, err))
    assert found == 0 and not err.lines, "\n".join(out.lines + err.lines)
