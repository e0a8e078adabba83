"""The figures of the reliability tests (issue 9), written to docs/reliability.md at the end
of a session in which any of them ran. Rows merge by scenario: those of tests that did not
run this time are kept as they were.

A test calls `record(point, scenario, tried, connections=..., failures=..., ...)`; the
session hooks in tests/conftest.py mark each row passed or failed and write the page."""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
COLUMNS = ("Point", "Scenario", "What was tried", "Connections", "Failures", "Changes/s",
           "Other figures", "Outcome", "Run")
HEADER = """# Reliability: what was tried, and the figures

Issue 9: bpfproxy must never be the reason traffic stops. Each row is one scenario of the
reliability tests (`tests/integration/test_reliability_*.py`, `tests/unit/test_fuzz_*.py`),
as its last run measured it. The tests regenerate this page (`tests/reliability_report.py`):
a run replaces the rows of the scenarios it ran and keeps the others. Figures are what was
measured on the machine named in the row, not limits the tests assert.

- Connections: connections (or requests) clients made while the scenario ran.
- Failures: those that failed (refused, reset, timed out, wrong answer).
- Changes/s: object changes per second the source delivered, where the scenario has churn.
"""


@dataclass
class Row:
    point: str
    scenario: str
    tried: str
    connections: str = ""
    failures: str = ""
    changes_per_second: str = ""
    figures: str = ""
    outcome: str = "recorded"
    run: str = ""
    test: str = ""          # pytest node id, to attach the outcome (not written)

    def cells(self) -> tuple[str, ...]:
        return (self.point, self.scenario, self.tried, self.connections, self.failures,
                self.changes_per_second, self.figures, self.outcome, self.run)


_recorded: dict[str, Row] = {}


def record(point: str, scenario: str, tried: str, *, connections: int | None = None,
           failures: int | None = None, changes_per_second: float | None = None,
           **figures: object) -> None:
    """One row: `scenario` is its key (unique across all reliability tests)."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    _recorded[scenario] = Row(
        point, scenario, tried,
        "" if connections is None else str(connections),
        "" if failures is None else str(failures),
        "" if changes_per_second is None else f"{changes_per_second:.0f}",
        ", ".join(f"{key.replace('_', ' ')}: {_show(value)}" for key, value in figures.items()),
        run=f"{datetime.date.today().isoformat()} {os.uname().nodename}", test=test)


def outcome(report) -> None:
    """Called with every pytest test report: rows its test recorded get its outcome."""
    if hasattr(report, "wasxfail"):
        verdict = "known gap (xfail)" if report.skipped else "FIXED (xpass)"
    else:
        verdict = "passed" if report.passed else "FAILED"
    for row in _recorded.values():
        if row.test == report.nodeid:
            row.outcome = verdict


def write(path: Path = DOC) -> bool:
    """Merge this session's rows into the page; nothing is written when none were recorded."""
    if not _recorded:
        return False
    rows = {row.scenario: row for row in read(path)}
    rows.update(_recorded)
    ordered = sorted(rows.values(), key=lambda r: (_point_order(r.point), r.scenario))
    lines = [HEADER, "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_escape(c) for c in row.cells()) + " |" for row in ordered]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return True


def read(path: Path = DOC) -> list[Row]:
    """The rows the page holds (none when it does not exist yet)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if not line.startswith("| ") or line.startswith("| Point |"):
            continue
        cells = [_unescape(c.strip()) for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        if len(cells) == len(COLUMNS):
            rows.append(Row(*cells))
    return rows


def _point_order(point: str) -> tuple:
    number = re.match(r"\d+", point)
    return (int(number.group()) if number else 99, point)


def _show(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _escape(cell: str) -> str:
    return cell.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _unescape(cell: str) -> str:
    return re.sub(r"\\(.)", r"\1", cell)
