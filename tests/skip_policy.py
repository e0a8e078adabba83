"""Skips that cannot hide a failure (issue 13): every skipped test is listed by id with its
reason at the end of the run, and under BPFPROXY_REQUIRE_INTEGRATION=1 (CI) a skip fails
the test unless ALLOWED_SKIPS names it with why no install can give it what it needs.
tests/conftest.py imports these hooks; a test run elsewhere can load them with -p."""

from __future__ import annotations

import os

import pytest

REQUIRE_ENV = "BPFPROXY_REQUIRE_INTEGRATION"

# Test id (without parameters) -> why this machine can never run it. Anything the install
# (scripts/install.sh, pyproject.toml) can provide does not belong here: provide it.
ALLOWED_SKIPS: dict[str, str] = {
    "tests/integration/test_sctp.py::test_sctp_connect_reaches_the_backend":
        "SCTP traffic needs the sctp kernel module; these kernels have none and load no modules",
}


def required() -> bool:
    return os.environ.get(REQUIRE_ENV) == "1"


def allowed(nodeid: str) -> str | None:
    """Why nodeid may skip, or None."""
    return ALLOWED_SKIPS.get(nodeid) or ALLOWED_SKIPS.get(nodeid.split("[", 1)[0])


def skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:     # (path, line, "Skipped: why")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _refuse(report) -> None:
    """Turn a skip the CI run may not have into a failure that says why."""
    reason = skip_reason(report)
    report.outcome = "failed"
    report.longrepr = (
        f"{report.nodeid} skipped ({reason}), but {REQUIRE_ENV}=1 allows no skip for "
        "something the install can provide: provide it, or, when this machine can never "
        "have it, name the test in tests/skip_policy.py ALLOWED_SKIPS with the reason")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and required() \
            and not allowed(report.nodeid):
        _refuse(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    # A module-level skip (pytest.importorskip, allow_module_level) hides every test in it.
    report = yield
    if report.skipped and required() and not allowed(report.nodeid):
        _refuse(report)
    return report


def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    terminalreporter.section(f"skipped tests ({len(skipped)})", sep="-")
    for report in skipped:
        line = f"SKIPPED {report.nodeid}: {skip_reason(report)}"
        if why := allowed(report.nodeid):
            line += f"  [allowed in CI: {why}]"
        terminalreporter.write_line(line)
