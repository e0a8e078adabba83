"""Capacity (issue 9, point 4): an agent with tiny maps. A Service that grows past the room
is refused whole and keeps serving what the kernel had of it; every other Service keeps
working and changing; the log, the metrics, the events and the status name it; once
another Service is deleted it is served with its new backends. Real TCP throughout."""
from __future__ import annotations

import threading

import grpc
import pytest

from agent.api.generated import agent_pb2, agent_pb2_grpc
from lab import manifests
from lab.agent_runner import AgentRunner
from tests import reliability_report
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

SLOTS = 6                   # --max-backend-slots: a 2 + b 2 + c 1 leaves one free
VIPS = {"a": "10.96.9.1", "b": "10.96.9.2", "c": "10.96.9.3"}
PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
SLICE_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"}]


def publish(directory, name: str, pods) -> None:
    manifests.write(directory, f"{name}.yaml", manifests.service(name, VIPS[name], PORTS),
                    manifests.endpoint_slice(name, [p.ip for p in pods], SLICE_PORTS))


def metrics(lab) -> dict[str, float]:
    """bpfproxy_* samples from the agent's /metrics (on the node namespace's loopback)."""
    script = ("import urllib.request\n"
              "print(urllib.request.urlopen('http://127.0.0.1:10249/metrics', timeout=10)"
              ".read().decode())")
    done = lab.node_run(["python3", "-c", script], check=True)
    samples = {}
    for line in done.stdout.splitlines():
        if line.startswith("bpfproxy_"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@pytest.mark.timeout(240)
def test_a_service_past_the_room_is_refused_whole_and_served_once_room_returns(
        make_lab, tmp_path):
    lab = make_lab(name="c9cap")
    pods = {i: lab.add_pod(f"be-{i}") for i in range(1, 6)}
    for pod in pods.values():
        pod.start_server([8080])
    client = lab.add_pod("client")
    directory = tmp_path / "manifests"
    publish(directory, "a", [pods[1], pods[2]])
    publish(directory, "b", [pods[3], pods[4]])
    publish(directory, "c", [pods[5]])
    agent = AgentRunner(lab, directory, extra_args=("--max-backend-slots", str(SLOTS)))
    channel = None
    events: list = []
    try:
        agent.start()
        channel = grpc.insecure_channel(agent.api)
        stub = agent_pb2_grpc.AgentStub(channel)

        def status():
            return stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=10)

        def answered_by(name: str, count: int = 30):
            return client.tcp(VIPS[name], 80, count=count)

        stream = stub.WatchEvents(agent_pb2.WatchEventsRequest())

        def watch() -> None:
            try:
                events.extend(e for e in stream if e.kind != "sync")
            except grpc.RpcError:
                pass            # cancelled at the end

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        before = {name: answered_by(name) for name in VIPS}
        assert {n: r.backends() for n, r in before.items()} == {
            "a": {"be-1", "be-2"}, "b": {"be-3", "be-4"}, "c": {"be-5"}}
        # a stream of new connections to a for the whole scenario
        steady = client.start_client("tcp", VIPS["a"], 80, duration=20.0, interval=0.02)

        # c grows past the room: refused whole, it keeps its one backend
        publish(directory, "c", [pods[5], pods[1], pods[2]])
        refused = wait_for(lambda: list(status().refused_services), "c refused", 20)
        held_c = answered_by("c")
        during_b = answered_by("b")
        # a change that fits still goes in while c is refused
        publish(directory, "a", [pods[1], pods[3]])
        wait_for(lambda: {b["address"] for s in agent.services() if s["name"] == "a"
                          for b in s["backends"]} == {pods[1].ip, pods[3].ip}, "a's swap", 20)
        swapped_a = answered_by("a")
        refused_status = status()
        refused_metrics = metrics(lab)
        log_named = "event=service_refused service=lab/c" in agent.log()

        # b deleted: its slots go, and c is served with its new backends
        (directory / "b.yaml").unlink()
        wait_for(lambda: not status().refused_services, "c accepted", 30)
        grown_c = answered_by("c", count=60)
        steady_result = steady.result()
        recovered_status = status()
        stream.cancel()
        watcher.join(timeout=10)
    finally:
        if channel is not None:
            channel.close()
        agent.close()

    checked = [held_c, during_b, swapped_a, grown_c, steady_result, *before.values()]
    reliability_report.record(
        "4", "capacity-refused-and-recovered",
        f"agent with --max-backend-slots {SLOTS}; 3 ClusterIP services (2+2+1 backends); "
        "c grows to 3 backends past the room, a swaps a backend meanwhile, then b is deleted; "
        "a stream of new TCP connections to a throughout",
        connections=sum(r.total for r in checked), failures=sum(r.failed for r in checked),
        refused_while_full=",".join(f"{s.namespace}/{s.name}" for s in refused),
        c_answered_by_while_refused=",".join(sorted(held_c.backends())),
        c_answered_by_after=",".join(sorted(grown_c.backends())),
        stream_to_a=steady_result.total)

    assert [(s.namespace, s.name) for s in refused] == [("lab", "c")]
    assert "bpfp_slot4 full: 1 of 6 entries free, the change needs 2" in refused[0].reason
    # refused whole: c keeps what the kernel had, the others keep working and changing
    assert held_c.failed == 0 and held_c.backends() == {"be-5"}, held_c
    assert during_b.failed == 0 and during_b.backends() == {"be-3", "be-4"}, during_b
    assert swapped_a.failed == 0 and swapped_a.backends() == {"be-1", "be-3"}, swapped_a
    assert steady_result.failed == 0 and steady_result.total > 0, steady_result
    assert refused_status.sync_errors == 0 and refused_status.errors["capacity"] == 1
    assert refused_metrics['bpfproxy_services_refused'] == 1
    assert refused_metrics['bpfproxy_service_refused{namespace="lab",service="c"}'] == 1
    assert refused_metrics['bpfproxy_errors_total{kind="capacity"}'] == 1
    assert log_named
    assert [(e.kind, e.namespace, e.name) for e in events] == [("service_refused", "lab", "c")]
    # room returned: c is served by its new backends, nothing is refused any more
    assert grown_c.failed == 0 and grown_c.backends() == {"be-1", "be-2", "be-5"}, grown_c
    assert recovered_status.sync_errors == 0 and not recovered_status.refused_services
    assert "event=service_accepted service=lab/c" in agent.log()
