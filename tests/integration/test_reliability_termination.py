"""Graceful termination (issue 9, point 3): a backend marked terminating keeps its
established connections and gets no new ones; once it is gone, clients move on."""
from __future__ import annotations

import time

import pytest

from lab import manifests
from lab.agent_runner import AgentRunner
from tests import reliability_report, reliability_traffic
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

VIP = "10.96.0.93"
PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
         {"name": "hold", "port": 90, "targetPort": 9090, "protocol": "TCP"}]
SLICE_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"},
               {"name": "hold", "port": 9090, "protocol": "TCP"}]
NODE = "bpfp-node"


def publish(directory, ready: list, terminating: list = ()) -> None:
    endpoint_slice = manifests.endpoint_slice("web", [p.ip for p in ready], SLICE_PORTS)
    endpoint_slice["endpoints"] += [
        {"addresses": [p.ip], "nodeName": NODE,
         "conditions": {"ready": False, "serving": True, "terminating": True}}
        for p in terminating]
    manifests.write(directory, "web.yaml", manifests.service("web", VIP, PORTS), endpoint_slice)


@pytest.mark.timeout(180)
def test_terminating_backend_keeps_its_connections_and_gets_no_new_ones(make_lab, tmp_path):
    lab = make_lab(name="r9term")
    a, b, c = (lab.add_pod(f"backend-{x}") for x in "abc")
    servers = {}
    for pod in (a, b, c):
        pod.start_server([8080])
        servers[pod.name] = reliability_traffic.start_server(pod, 9090)
    client = lab.add_pod("client")
    directory = tmp_path / "manifests"
    publish(directory, [a, b, c])
    agent = AgentRunner(lab, directory)
    try:
        agent.start()
        held = reliability_traffic.start_hold(client, VIP, 90, connections=15, duration=120,
                                              reconnect=True, until_stopped=True)
        held.wait_round()                   # all 15 open and answered
        publish(directory, [a, b], terminating=[c])
        wait_for(lambda: {x["address"] for s in agent.services() for x in s["backends"]}
                 == {a.ip, b.ip}, "c out of the backends", 60)
        marked_at = time.monotonic()
        fresh = client.tcp(VIP, 80, count=60)
        held.wait_round(begun_after=marked_at)  # each held connection asked while c terminates
        # c's pod ends: its process exits (FIN on its connections), then it leaves the slice
        # its connections end while stop() runs (FIN as the process exits): the kept
        # window is measured to the moment we began stopping it
        stopping_at = time.monotonic()
        lab.processes.stop(servers[c.name])
        publish(directory, [a, b])
        held.wait_round(begun_after=time.monotonic())   # c's connections found closed, replaced
        result = held.stop()
    finally:
        agent.close()

    conns = result["connections"]
    on_c = [x for x in conns if x["backend"] == c.name]
    replaced = [x for x in conns if x["opened"] > stopping_at]
    reliability_report.record(
        "3", "graceful-termination",
        "15 held connections (reconnecting) over 3 backends; one marked serving+terminating "
        "(others ready), 60 new connections, then its process stopped and it left the slice",
        connections=len(conns) + fresh.total,
        failures=fresh.failed + len(result["connect_failures"]) +
        sum(x["error"] is not None and x["backend"] != c.name for x in conns),
        held_on_terminating=len(on_c), moved_on=len(replaced),
        new_connections_to_terminating=fresh.answers.get(f"{c.name}:8080", 0),
        seconds_terminating_before_stop=round(stopping_at - marked_at, 1))

    assert on_c, "some held connection must have been on the backend that terminates"
    for conn in on_c:
        # kept while terminating: it worked until the process went, and ended only then
        assert conn["ended"] is not None and conn["ended"] >= stopping_at, conn
        assert conn["last_ok"] > marked_at, conn
    assert fresh.errors == {} and fresh.backends() == {a.name, b.name}, fresh
    for conn in conns:
        if conn["backend"] != c.name:
            assert conn["error"] is None and conn["wrong_answers"] == 0, conn
    # clients moved on: every connection c lost was replaced, on a or b, without a failure
    assert result["connect_failures"] == [], result["connect_failures"]
    assert len(replaced) >= len(on_c)
    assert {x["backend"] for x in replaced} <= {a.name, b.name}
    assert all(x["error"] is None for x in replaced)
