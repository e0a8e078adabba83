"""Shared fixtures: `make_lab` / `lab` build network-namespace labs and always tear them down.
Integration tests are skipped, with the reason, when not root or the machine lacks the tools."""

from __future__ import annotations

import itertools
import os
import shutil
import sys
from pathlib import Path

import pytest

# Before anything starts gRPC: lab processes fork with preexec_fn (lab/processes.py says why).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

# lab/ is a top-level testbed package, not installed with the agent.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


# Every skip listed by id at the end; under CI a skip not allowed there is a failure.
from tests.skip_policy import (  # noqa: E402, F401 - hooks, registered by their names
    pytest_make_collect_report,
    pytest_runtest_makereport,
    pytest_terminal_summary,
)


def _why_no_integration() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root (network namespaces, cgroups, BPF)"
    for tool in ("ip", "nsenter", "sysctl"):
        if not shutil.which(tool):
            return f"integration tests need {tool!r} on PATH"
    from lab.cgroups import cgroup2_mount

    try:
        cgroup2_mount()
    except RuntimeError as error:
        return str(error)
    return None


def pytest_collection_modifyitems(config, items):
    integration = [item for item in items if "integration" in item.keywords]
    reason = _why_no_integration() if integration else None
    if reason:
        # CI sets this: a green run that skipped every kernel test would prove nothing.
        if os.environ.get("BPFPROXY_REQUIRE_INTEGRATION") == "1":
            raise pytest.UsageError(f"integration tests required but cannot run: {reason}")
        for item in integration:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_logreport(report):
    # Reliability rows (tests/reliability_report.py) say whether their test passed.
    if report.when == "call" or report.failed:
        from tests import reliability_report
        reliability_report.outcome(report)


def pytest_sessionfinish(session, exitstatus):
    # docs/reliability.md is rewritten only when a reliability test recorded figures.
    from tests import reliability_report
    reliability_report.write()


# Unique per process and call; "x" (not a hex digit) keeps pid and counter apart.
_lab_names = (f"t{os.getpid():x}x{n}" for n in itertools.count(1))


@pytest.fixture
def make_lab():
    """A function that opens a Lab (keyword args go to Lab); every one is closed at teardown."""
    from lab import Lab

    labs: list[Lab] = []

    def make(name: str | None = None, **kw) -> Lab:
        lab = Lab(name or next(_lab_names), **kw)
        lab.open()
        labs.append(lab)
        return lab

    yield make
    errors = []
    for lab in reversed(labs):
        try:
            lab.close()
        except Exception as error:  # noqa: BLE001 - close every lab, then report
            errors.append(error)
    if errors:
        raise errors[0]


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    return digits[n] if n < 36 else _base36(n // 36) + digits[n % 36]


# A cluster name has at most 10 characters (its node labs add "nI"): the pid is fixed width,
# so pid and counter cannot run together into another process's name.
_cluster_names = (f"cl{_base36(os.getpid()):0>5}{n}" for n in itertools.count(1))


@pytest.fixture
def make_cluster():
    """A function that opens a Cluster (keyword args go to Cluster); all closed at teardown."""
    from lab.cluster import Cluster

    clusters: list[Cluster] = []

    def make(name: str | None = None, **kw) -> Cluster:
        cluster = Cluster(name or next(_cluster_names), **kw)
        clusters.append(cluster)
        cluster.open()
        return cluster

    yield make
    errors = []
    for cluster in reversed(clusters):
        try:
            cluster.close()
        except Exception as error:  # noqa: BLE001 - close every cluster, then report
            errors.append(error)
    if errors:
        raise errors[0]


@pytest.fixture
def new_cluster_name():
    """A unique cluster name, for tests that manage a Cluster's life themselves."""
    return next(_cluster_names)


@pytest.fixture
def lab(make_lab):
    """One open Lab with the default pod CIDR."""
    return make_lab()


@pytest.fixture
def new_lab_name():
    """A unique lab name, for tests that manage a Lab's life themselves."""
    return next(_lab_names)
