"""ClusterIP in the kernel, end to end: the real agent, real BPF programs, real TCP and UDP
between network-namespace pods. Each test builds its own lab and removes all of it."""
from __future__ import annotations

import itertools
import signal
import time
from pathlib import Path

import pytest

from agent.datapath import loader
from lab import manifests
from lab.agent_runner import AgentRunner
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

VIP = "10.96.0.10"
HTTP = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
        {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]
SLICE_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"},
               {"name": "dns", "port": 5353, "protocol": "UDP"}]


@pytest.fixture
def cluster(make_lab, tmp_path):
    """A node with three backend pods (TCP 8080, UDP 5353), a client pod, and a running
    agent on a manifest directory that serves 'web' at VIP from all three."""
    lab = make_lab()
    backends = [lab.add_pod(f"backend-{c}") for c in "abc"]
    for pod in backends:
        pod.start_server([8080, 5353, 9090], udp=True)
    client = lab.add_pod("client")
    directory = tmp_path / "manifests"
    write_web(directory, [p.ip for p in backends])
    agent = AgentRunner(lab, directory)
    try:
        agent.start()
        yield lab, agent, backends, client, directory
    finally:
        agent.close()


def write_web(directory: Path, addresses: list[str], not_ready: tuple[str, ...] = ()) -> None:
    manifests.write(directory, "web.yaml", manifests.service("web", VIP, HTTP),
                    manifests.endpoint_slice("web", addresses, SLICE_PORTS, not_ready=not_ready))


def test_tcp_and_udp_to_a_cluster_ip_reach_every_backend(cluster):
    _, _, backends, client, _ = cluster
    tcp = client.tcp(VIP, 80, count=150)
    assert tcp.errors == {} and tcp.wrong_peer == 0
    assert tcp.backends() == {p.name for p in backends}
    assert set(tcp.answers) == {f"{p.name}:8080" for p in backends}

    udp = client.udp(VIP, 53, count=150)
    assert udp.errors == {} and udp.wrong_source == 0     # replies come from the VIP
    assert set(udp.answers) == {f"{p.name}:5353" for p in backends}

    # one socket, many datagrams: one backend, as a conntrack entry keeps a UDP flow
    for _ in range(3):
        one_socket = client.udp_one_socket(VIP, 53, count=30)
        assert one_socket.errors == {} and one_socket.wrong_source == 0
        assert len(one_socket.backends()) == 1

    connected = client.udp_connected(VIP, 53, count=150)
    assert connected.errors == {} and connected.wrong_peer == 0   # getpeername() is the VIP
    assert connected.backends() == {p.name for p in backends}


def test_multi_port_service_with_a_named_target_port(cluster):
    lab, agent, backends, client, directory = cluster
    ports = [{"name": "web", "port": 80, "targetPort": "http-alt", "protocol": "TCP"},
             {"name": "admin", "port": 9000, "targetPort": 9090, "protocol": "TCP"}]
    slice_ports = [{"name": "web", "port": 8080, "protocol": "TCP"},
                   {"name": "admin", "port": 9090, "protocol": "TCP"}]
    manifests.write(directory, "multi.yaml",
                    manifests.service("multi", "10.96.0.30", ports),
                    manifests.endpoint_slice("multi", [p.ip for p in backends[:2]], slice_ports))
    wait_for(lambda: any(s["name"] == "multi" for s in agent.services()), what="multi synced",
             timeout=5.0)
    web = client.tcp("10.96.0.30", 80, count=60)
    admin = client.tcp("10.96.0.30", 9000, count=60)
    assert web.errors == {} and admin.errors == {}
    assert set(web.answers) == {f"{p.name}:8080" for p in backends[:2]}
    assert set(admin.answers) == {f"{p.name}:9090" for p in backends[:2]}
    listed = {(s["port_name"], s["protocol"]): s for s in agent.services() if s["name"] == "multi"}
    assert set(listed) == {("web", "TCP"), ("admin", "TCP")}
    assert {b["port"] for b in listed[("web", "TCP")]["backends"]} == {8080}


def ready_in_kernel(agent) -> set[str]:
    """Addresses of web's ready TCP backends, as the agent reads them back from the maps."""
    return {b["address"] for s in agent.services() if (s["name"], s["protocol"]) == ("web", "TCP")
            for b in s["backends"] if b["state"] == "ready"}


def test_endpoints_added_and_removed_while_traffic_flows(cluster):
    """No connection fails while endpoints change, and once a change is in the kernel new
    connections follow it: an added backend gets them, a removed one none."""
    _, agent, (a, b, c), client, directory = cluster
    write_web(directory, [a.ip, b.ip])
    wait_for(lambda: ready_in_kernel(agent) == {a.ip, b.ip}, what="a and b in the kernel",
             timeout=5.0)
    running = client.start_client("tcp", VIP, 80, duration=120, interval=0.01, timeline=True,
                                  until_stopped=True)
    running.wait_started()
    added_at = time.monotonic()
    write_web(directory, [a.ip, b.ip, c.ip])
    wait_for(lambda: ready_in_kernel(agent) == {a.ip, b.ip, c.ip}, what="c in the kernel",
             timeout=5.0)
    after_add = client.tcp(VIP, 80, count=60)
    write_web(directory, [b.ip, c.ip])
    wait_for(lambda: ready_in_kernel(agent) == {b.ip, c.ip}, what="a gone from the kernel",
             timeout=5.0)
    removed_at = time.monotonic()
    after_removal = client.tcp(VIP, 80, count=60)
    result = running.stop()

    assert result.errors == {}, "no connection may fail while endpoints change"
    assert after_add.errors == {} and after_add.backends() == {a.name, b.name, c.name}
    assert after_removal.errors == {} and after_removal.backends() == {b.name, c.name}
    timeline = [(result.started + t, answer.split(":")[0]) for t, answer in result.timeline]
    # Ordering, not speed: a connection done before c was written cannot have reached c,
    before_add = {who for t, who in timeline if t < added_at}
    assert before_add and before_add <= {a.name, b.name}
    assert c.name in {who for t, who in timeline if t > added_at}
    # and the client makes one connection at a time, so one whose predecessor ended after
    # the kernel lost a began after that: none of those may reach a.
    began_after_removal = [who for (ended, _), (_, who) in itertools.pairwise(timeline)
                           if ended > removed_at]
    assert began_after_removal and a.name not in began_after_removal


def test_not_ready_endpoints_get_no_traffic(cluster):
    _, agent, (a, b, c), client, directory = cluster
    write_web(directory, [a.ip, b.ip, c.ip], not_ready=(b.ip,))
    wait_for(lambda: ready_in_kernel(agent) == {a.ip, c.ip}, what="b not ready in the kernel",
             timeout=5.0)
    result = client.tcp(VIP, 80, count=90)
    assert result.errors == {} and result.backends() == {a.name, c.name}


def test_service_without_endpoints_refuses_connections(cluster):
    _, agent, _, client, directory = cluster
    manifests.write(directory, "empty.yaml", manifests.service("empty", "10.96.0.40", HTTP))
    wait_for(lambda: any(s["name"] == "empty" for s in agent.services()), what="empty synced",
             timeout=5.0)
    tcp = client.tcp("10.96.0.40", 80, count=10)
    assert tcp.errors == {"ECONNREFUSED": 10}
    udp = client.udp("10.96.0.40", 53, count=5)
    assert udp.errors == {"ECONNREFUSED": 5}


def test_deleted_service_is_no_longer_rewritten(cluster):
    _, agent, backends, client, directory = cluster
    assert client.tcp(VIP, 80, count=5).errors == {}
    (directory / "web.yaml").unlink()
    wait_for(lambda: not agent.services(), what="web removed from the kernel", timeout=5.0)
    result = client.tcp(VIP, 80, count=3, timeout=0.5)
    assert result.answers == {}, "the VIP must not reach a pod once the service is gone"
    # the node has no route for the service range: unreachable or a timeout, never ECONNREFUSED
    assert set(result.errors) <= {"EHOSTUNREACH", "ENETUNREACH", "timeout"}


def test_agent_killed_and_restarted_traffic_keeps_flowing(cluster):
    lab, agent, backends, client, directory = cluster
    running = client.start_client("tcp", VIP, 80, duration=120, interval=0.01, timeline=True,
                                  until_stopped=True)
    running.wait_started()
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    without_agent = client.tcp(VIP, 80, count=30)    # no agent at all: the kernel keeps serving
    agent.start(wait=60)              # adopts the pinned maps, swaps its programs in
    restarted_at = time.monotonic()
    after_restart = client.tcp(VIP, 80, count=30)
    result = running.stop()
    assert without_agent.errors == {} and after_restart.errors == {}
    assert result.started + result.timeline[-1][0] > restarted_at, \
        "the client must still be sending after the restarted agent took over"
    assert result.errors == {}, f"connections failed around the restart: {result.errors}"
    assert result.backends() == {p.name for p in backends}
    assert "event=adopted service_ports=2" in agent.log()
    # the restarted agent found everything in place: one program per hook, not two
    counts = {hook: len(ids) for hook, ids in
              ((h, loader.bpfsys.cgroup_program_ids(str(lab.cgroup), t))
               for h, t in loader.SOCKET_PROGRAMS)}
    assert set(counts.values()) == {1}


def test_sigterm_leaves_programs_and_maps_and_cleanup_removes_them(cluster):
    lab, agent, backends, client, _ = cluster
    assert agent.stop(signal.SIGTERM) == 0
    assert sorted(loader.attached_programs(lab.cgroup)) == sorted(
        name for name, _ in loader.SOCKET_PROGRAMS)
    pins = {p.name for p in agent.bpffs.iterdir()}
    assert set(loader.PINNED_MAPS.values()) <= pins
    after_stop = client.tcp(VIP, 80, count=30)
    assert after_stop.errors == {} and after_stop.backends() == {p.name for p in backends}

    done = agent.cleanup()
    assert done.returncode == 0, done.stderr
    assert not agent.bpffs.exists()
    assert loader.attached_programs(lab.cgroup) == []
    gone = client.tcp(VIP, 80, count=2, timeout=0.5)
    assert gone.answers == {}
