"""IPv6 and dual-stack through the socket LB, end to end: the real agent and programs, real
TCP and UDP between dual-stack lab pods over IPv6, and IPv4 services reached from AF_INET6
sockets through their IPv4-mapped addresses (::ffff:a.b.c.d), as Cilium's bpf_sock does."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from lab import manifests
from lab.agent_runner import AgentRunner

pytestmark = pytest.mark.integration

VIP6 = "fd00:10:96::10"                       # IPv6 single-stack
DUAL = ("10.96.0.20", "fd00:10:96::20")       # dual-stack: one cluster IP per family
VIP4 = "10.96.0.10"                           # IPv4 single-stack
EMPTY6, EMPTY4 = "fd00:10:96::40", "10.96.0.40"   # no endpoints


def mapped(ipv4: str) -> str:
    return f"::ffff:{ipv4}"


PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
         {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]
SLICE_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"},
               {"name": "dns", "port": 5353, "protocol": "UDP"}]


def write_services(directory: Path, backends: list) -> None:
    v4, v6 = [p.ip for p in backends], [p.ip6 for p in backends]
    manifests.write(directory, "web6.yaml", manifests.service("web6", VIP6, PORTS),
                    manifests.endpoint_slice("web6", v6, SLICE_PORTS))
    manifests.write(directory, "dual.yaml", manifests.service("dual", DUAL, PORTS),
                    manifests.endpoint_slice("dual", v4, SLICE_PORTS, name="dual-ipv4"),
                    manifests.endpoint_slice("dual", v6, SLICE_PORTS, name="dual-ipv6"))
    manifests.write(directory, "web4.yaml", manifests.service("web4", VIP4, PORTS),
                    manifests.endpoint_slice("web4", v4, SLICE_PORTS))
    manifests.write(directory, "empty.yaml", manifests.service("empty6", EMPTY6, PORTS),
                    manifests.service("empty4", EMPTY4, PORTS))


@pytest.fixture
def cluster(make_lab, tmp_path):
    """Three dual-stack backend pods (TCP 8080, UDP 5353 on both families), a client pod,
    and the agent serving the services above."""
    lab = make_lab()
    backends = [lab.add_pod(f"backend-{c}") for c in "abc"]
    for pod in backends:
        pod.start_server([8080, 5353], udp=True)
    client = lab.add_pod("client")
    directory = tmp_path / "manifests"
    write_services(directory, backends)
    agent = AgentRunner(lab, directory)
    try:
        agent.start()
        yield lab, agent, backends, client, directory
    finally:
        agent.close()


def assert_every_backend(client, addr: str, backends: list) -> None:
    """TCP, unconnected UDP, one UDP socket, connected UDP: every backend answers and the
    application only ever sees addr as its peer or reply source."""
    everyone = {p.name for p in backends}
    tcp = client.tcp(addr, 80, count=120)
    assert tcp.errors == {} and tcp.wrong_peer == 0, tcp      # getpeername() shows addr
    assert set(tcp.answers) == {f"{p.name}:8080" for p in backends}

    udp = client.udp(addr, 53, count=120)
    assert udp.errors == {} and udp.wrong_source == 0, udp    # replies come from addr
    assert set(udp.answers) == {f"{p.name}:5353" for p in backends}

    for _ in range(3):        # one socket, many datagrams: one backend
        one_socket = client.udp_one_socket(addr, 53, count=20)
        assert one_socket.errors == {} and one_socket.wrong_source == 0, one_socket
        assert len(one_socket.backends()) == 1

    connected = client.udp_connected(addr, 53, count=120)
    assert connected.errors == {} and connected.wrong_peer == 0, connected
    assert connected.backends() == everyone


def test_tcp_and_udp_to_an_ipv6_cluster_ip_reach_every_backend(cluster):
    _, _, backends, client, _ = cluster
    assert_every_backend(client, VIP6, backends)


def test_a_dual_stack_service_is_reachable_on_both_cluster_ips(cluster):
    _, agent, backends, client, _ = cluster
    for addr in DUAL:
        assert_every_backend(client, addr, backends)
    listed = [s for s in agent.services() if s["name"] == "dual"]
    assert {f["address"] for s in listed for f in s["frontends"]} == set(DUAL)
    assert {b["address"] for s in listed for b in s["backends"]} == \
        {a for p in backends for a in (p.ip, p.ip6)}


def test_an_ipv4_service_through_its_ipv4_mapped_address_on_an_ipv6_socket(cluster):
    """connect6 and getpeername6 (TCP, connected UDP), sendmsg4 (the kernel hands an
    unconnected send to ::ffff:a.b.c.d to udp_sendmsg) and recvmsg6 all see the IPv4
    service; the application sees only ::ffff:VIP4."""
    _, _, backends, client, _ = cluster
    assert_every_backend(client, mapped(VIP4), backends)
    # and the dual-stack service's IPv4 address, the same way
    tcp = client.tcp(mapped(DUAL[0]), 80, count=30)
    assert tcp.errors == {} and tcp.wrong_peer == 0 and tcp.backends() <= {p.name for p in backends}


def test_services_without_endpoints_refuse_ipv6_and_ipv4_mapped_connections(cluster):
    _, _, _, client, _ = cluster
    for addr in (EMPTY6, mapped(EMPTY4)):
        assert client.tcp(addr, 80, count=5).errors == {"ECONNREFUSED": 5}, addr
        assert client.udp(addr, 53, count=3).errors == {"ECONNREFUSED": 3}, addr
        assert client.udp_connected(addr, 53, count=3).errors == {"ECONNREFUSED": 3}, addr


def test_ipv6_endpoints_follow_the_endpoint_slice(cluster):
    _, agent, (a, b, c), client, directory = cluster
    manifests.write(directory, "web6.yaml", manifests.service("web6", VIP6, PORTS),
                    manifests.endpoint_slice("web6", [a.ip6, c.ip6], SLICE_PORTS,
                                             not_ready=(c.ip6,)))
    agent.wait_until(lambda: agent.kernel_backends(VIP6, 80) == {a.ip6},
                     "only a in the kernel")
    result = client.tcp(VIP6, 80, count=60)
    assert result.errors == {} and result.backends() == {a.name}


def test_deleted_ipv6_service_is_no_longer_rewritten(cluster):
    _, agent, _, client, directory = cluster
    (directory / "web6.yaml").unlink()
    agent.wait_until(lambda: not any(s["name"] == "web6" for s in agent.services()),
                     "web6 removed from the kernel")
    result = client.tcp(VIP6, 80, count=3, timeout=0.5)
    assert result.answers == {}, "the VIP must not reach a pod once the service is gone"
    # the node has an unreachable route for the IPv6 service range, and no default route
    assert set(result.errors) <= {"EHOSTUNREACH", "ENETUNREACH", "timeout"}


def test_a_restarted_agent_adopts_the_ipv6_maps_and_traffic_keeps_flowing(cluster):
    _, agent, backends, client, _ = cluster
    running = client.start_client("tcp", VIP6, 80, duration=120, interval=0.01,
                                  timeline=True, until_stopped=True)
    running.wait_started()
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    without_agent = client.tcp(VIP6, 80, count=30)   # no agent: the kernel keeps serving
    agent.start(wait=60)
    restarted_at = time.monotonic()
    result = running.stop()
    assert without_agent.errors == {}, without_agent
    assert result.started + result.timeline[-1][0] > restarted_at, \
        "the client must still be sending after the restarted agent took over"
    assert result.errors == {}, f"connections failed around the restart: {result.errors}"
    assert result.backends() == {p.name for p in backends}
    # web6, dual (x2 families), web4, empty6, empty4: two ports each
    assert "event=adopted service_ports=12" in agent.log()
