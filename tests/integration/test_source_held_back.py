"""Issue 14.1 with real traffic: an unreadable manifest holds back only its own objects.
A deletion in another file stops the rewrite of its address as fast as without the broken
file, the broken file's last good objects keep serving, and a restarted agent keeps the
kernel state an unreadable file may own until it reads, then reconciles; the API (services,
status) lists exactly what the pinned maps hold, and names what is held back."""
from __future__ import annotations

import json
import os
import signal

import pytest

from agent.datapath.maps import BpfServiceMaps
from lab.agent_runner import AgentRunner
from tests.helpers import http_world, publish_http, wait_for

pytestmark = pytest.mark.integration

VIPS = {"alpha": "10.96.0.61", "beta": "10.96.0.62", "gamma": "10.96.0.63"}
SYNC_WAIT = 10.0     # seconds: a bound on the usual sync time (file watch + one sync)
BROKEN = "apiVersion: v1\nkind: Service\nmetadata: {name: gamma\nspec: ["


def publish(directory, name: str, backends: list) -> None:
    publish_http(directory, name, VIPS[name], backends)


def replace_with(directory, filename: str, text: str) -> None:
    """A new version of the file, whole (write then rename), that cannot be parsed."""
    tmp = directory / f".{filename}.tmp"
    tmp.write_text(text)
    os.replace(tmp, directory / filename)


def kernel(agent: AgentRunner) -> dict[str, set[str]]:
    """frontend -> backends, read back from the pinned maps (not through the agent)."""
    maps = BpfServiceMaps(agent.bpffs)
    try:
        state = maps.read_back()
    finally:
        maps.close()
    return {f"{f.address}:{f.port}/{f.protocol.value}": {f"{b.address}:{b.port}"
                                                         for b in s.backends}
            for s in state.values() for f in s.frontends}


def listed(services: list[dict]) -> dict[str, set[str]]:
    """The same, as `bpfproxy services -o json` reports it."""
    return {f"{f['address']}:{f['port']}/{s['protocol']}": {f"{b['address']}:{b['port']}"
                                                             for b in s["backends"]}
            for s in services for f in s["frontends"]}


def agrees(agent: AgentRunner) -> list[dict]:
    """The services listing, once it names what the kernel holds (read before and after:
    a sync may land between the two reads)."""
    def same():
        services = agent.services()
        return services if listed(services) == kernel(agent) else None
    return wait_for(same, "the API to list what the kernel holds", timeout=SYNC_WAIT)


def not_rewritten(client, name: str) -> bool:
    result = client.tcp(VIPS[name], 80, count=3, timeout=0.5)
    # no route for the service range: unreachable or a timeout, never a pod's answer
    return result.answers == {} and set(result.errors) <= {"EHOSTUNREACH", "ENETUNREACH",
                                                           "timeout"}


def status(agent: AgentRunner) -> dict:
    return json.loads(agent.cli("status", "--api", agent.api, "-o", "json").stdout)


@pytest.fixture
def started(make_lab, tmp_path):
    """alpha, beta and gamma published, and an agent started on them:
    (agent, backends, client, directory); the agent is closed at teardown."""
    lab, backends, client, directory = http_world(make_lab, tmp_path, "i14held")
    for name in VIPS:
        publish(directory, name, backends)
    with AgentRunner(lab, directory) as agent:
        agent.start()
        yield agent, backends, client, directory


@pytest.mark.timeout(240)
def test_a_deletion_elsewhere_applies_while_a_file_is_broken(started):
    agent, backends, client, directory = started
    assert all(client.tcp(VIPS[n], 80, count=4).errors == {} for n in VIPS)
    replace_with(directory, "gamma.yaml", BROKEN)
    wait_for(lambda: "event=parse_error file=gamma.yaml" in agent.log(), "the parse error",
             timeout=SYNC_WAIT)

    (directory / "alpha.yaml").unlink()
    wait_for(lambda: VIPS["alpha"] not in str(agent.services()), "alpha gone from the API",
             timeout=SYNC_WAIT)
    services = agrees(agent)
    alpha_after = wait_for(lambda: not_rewritten(client, "alpha"),
                           "alpha's address no longer rewritten", timeout=SYNC_WAIT)
    gamma = client.tcp(VIPS["gamma"], 80, count=10)
    beta = client.tcp(VIPS["beta"], 80, count=10)
    held = status(agent)["source_state"]["held_back"]
    log = agent.log()

    assert alpha_after
    assert {s["name"] for s in services} == {"beta", "gamma"}
    assert not any(s.get("held_back") for s in services)    # gamma: listed, as last read
    assert gamma.errors == {} and gamma.backends() == {p.name for p in backends}
    assert beta.errors == {}
    assert [(h["origin"], h["objects"], h["unknown"]) for h in held] == [
        ("gamma.yaml", ["EndpointSlice lab/gamma-slice", "Service lab/gamma"], False)], held
    assert "event=file_removed file=alpha.yaml" in log


@pytest.mark.timeout(300)
def test_a_restart_keeps_what_an_unreadable_file_may_own_until_it_reads(started):
    agent, backends, client, directory = started
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    # while no agent runs: gamma's file breaks and beta's goes; the kernel keeps all
    replace_with(directory, "gamma.yaml", BROKEN)
    (directory / "beta.yaml").unlink()
    agent.start()
    at_start = agrees(agent)
    held = status(agent)["source_state"]["held_back"]
    kept = {n: client.tcp(VIPS[n], 80, count=6) for n in ("beta", "gamma")}

    # alpha was listed by this agent and is then deleted: it goes at once
    (directory / "alpha.yaml").unlink()
    alpha_gone = wait_for(lambda: not_rewritten(client, "alpha"),
                          "alpha's address no longer rewritten", timeout=SYNC_WAIT)
    after_alpha = agrees(agent)
    gamma_still = client.tcp(VIPS["gamma"], 80, count=6)

    # gamma's file reads again: gamma is its own again, beta's leftover is reconciled
    publish(directory, "gamma", backends)
    beta_gone = wait_for(lambda: not_rewritten(client, "beta"),
                         "beta's leftover no longer rewritten", timeout=SYNC_WAIT)
    reconciled = agrees(agent)
    gamma_named = client.tcp(VIPS["gamma"], 80, count=6)
    log = agent.log()

    adopted = [s for s in at_start if s.get("held_back")]
    assert {s["name"] for s in at_start if not s.get("held_back")} == {"alpha"}
    assert {f["address"] for s in adopted for f in s["frontends"]} == {VIPS["beta"],
                                                                     VIPS["gamma"]}
    assert all("gamma.yaml" in s["held_back"] and s["name"] == "" for s in adopted)
    assert [(h["origin"], h["unknown"]) for h in held] == [("gamma.yaml", True)]
    assert all(r.errors == {} for r in kept.values()), kept
    assert alpha_gone and gamma_still.errors == {}
    assert {f["address"] for s in after_alpha for f in s["frontends"]} == {VIPS["beta"],
                                                                         VIPS["gamma"]}
    assert beta_gone and [s["name"] for s in reconciled] == ["gamma"]
    assert not reconciled[0].get("held_back")
    assert gamma_named.errors == {}
    assert "event=adopted_reconciled" in log
