"""Source faults (issue 9, point 5), manifest-directory source: corrupt files are skipped and
reported while the others apply; the directory vanishing mid-run keeps the last good state;
a source missing at start leaves the pinned state serving."""
from __future__ import annotations

import os
import signal

import pytest

from lab.agent_runner import AgentRunner
from tests import reliability_report
from tests.helpers import http_world, publish_http, wait_for

pytestmark = pytest.mark.integration

VIPS = {"alpha": "10.96.0.51", "beta": "10.96.0.52", "gamma": "10.96.0.53"}


def publish(directory, name: str, backends: list, filename: str | None = None) -> None:
    publish_http(directory, name, VIPS[name], backends, filename)


@pytest.fixture
def node(make_lab, tmp_path):
    return http_world(make_lab, tmp_path, "r9src")


@pytest.mark.timeout(180)
def test_corrupt_files_are_skipped_and_a_vanished_directory_keeps_the_last_state(node):
    lab, backends, client, directory = node
    publish(directory, "alpha", backends)
    publish(directory, "gamma", backends)
    (directory / "b-half-written.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken\nspec: [")
    (directory / "c-deep.yaml").write_text("[" * 200_000)
    (directory / "d-binary.json").write_bytes(os.urandom(4096))
    publish(directory, "beta", backends, "e-beta.yaml")
    agent = AgentRunner(lab, directory)
    try:
        agent.start()
        served = {s["name"] for s in agent.services()}
        log = agent.log()
        start_ok = {name: client.tcp(VIPS[name], 80, count=10) for name in VIPS}

        # gamma's file is cut short mid-run, inside a flow mapping: the parse fails and gamma
        # stays as it was (a cut that still parses, "kind: Ser", would read as no objects)
        (directory / "gamma.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: "
                                              "{name: gamma, namesp")
        wait_for(lambda: "event=parse_error file=gamma.yaml" in agent.log(),
                 "gamma's parse error logged",
                 60)
        running = client.start_client("tcp", VIPS["gamma"], 80, duration=120, interval=0.02,
                                      until_stopped=True)
        running.wait_started()
        # the whole directory goes away (a volume unmounted): the last good state stays
        moved = directory.with_name("manifests-away")
        directory.rename(moved)
        # the source has looked for it and not found it
        wait_for(lambda: "event=rescan_failed" in agent.log(), "the failed rescan logged", 60)
        alive = agent.process.poll() is None
        after_gone = {s["name"] for s in agent.services()}
        status = agent.cli("status", "--api", agent.api, check=False)
        gamma = running.stop()
        alpha = client.tcp(VIPS["alpha"], 80, count=20)
        moved.rename(directory)
    finally:
        agent.close()

    reliability_report.record(
        "5", "source-corrupt-files-and-directory-gone",
        "manifest directory with a half-written YAML, 200k nested brackets and a binary "
        "JSON beside valid files; then a served file cut short; then the directory removed",
        connections=sum(r.total for r in start_ok.values()) + gamma.total + alpha.total,
        failures=sum(r.failed for r in start_ok.values()) + gamma.failed + alpha.failed,
        services_served_at_start=len(served), parse_errors_logged=log.count("event=parse_error"),
        services_kept_with_directory_gone=len(after_gone))

    assert served == {"alpha", "beta", "gamma"}
    for filename in ("b-half-written.yaml", "c-deep.yaml", "d-binary.json"):
        assert f"event=parse_error file={filename}" in log, log
    assert all(r.errors == {} for r in start_ok.values()), start_ok
    assert alive and status.returncode == 0, status.stderr
    assert after_gone == {"alpha", "beta", "gamma"}
    assert gamma.errors == {} and gamma.backends() == {p.name for p in backends}
    assert alpha.errors == {}


@pytest.mark.timeout(120)
def test_source_missing_at_start_waits_not_ready_and_pinned_state_serves(node):
    lab, backends, client, directory = node
    publish(directory, "alpha", backends)
    agent = AgentRunner(lab, directory)
    try:
        agent.start()
        assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
        moved = directory.with_name("manifests-later")
        directory.rename(moved)
        agent.start(wait=0)
        # up (its API starts first) and waiting for the directory
        wait_for(lambda: "event=source_unavailable" in agent.log()
                 or agent.process.poll() is not None, "the agent waiting for its source", 60)
        waiting = agent.process.poll() is None
        status = agent.cli("status", "--api", agent.api, check=False)
        pinned = client.tcp(VIPS["alpha"], 80, count=20)
        moved.rename(directory)
        if waiting:
            agent.wait_synced(30)
    finally:
        agent.close()
    reliability_report.record(
        "5", "source-missing-at-start",
        "agent killed, manifest directory removed, agent started again, directory back",
        connections=pinned.total, failures=pinned.failed, agent_waited=waiting,
        status_exit=status.returncode)
    assert pinned.errors == {}, "the pinned state must serve while the source is missing"
    assert waiting, f"the agent exited instead of waiting:\n{agent.log()[-2000:]}"
    assert status.returncode == 1 and "not synced" in status.stderr
