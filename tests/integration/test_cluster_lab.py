"""The multi-node lab, with real traffic: pods on different nodes reach each other by plain
routing (sources kept), an outside client reaches node addresses but never pods, agents on two
nodes coexist, and a cluster leaves nothing behind, also after a failure or a crash."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lab import Lab, manifests
from lab import netns as lab_netns
from lab.cgroups import cgroup2_mount
from lab.cleanup import LOCK_DIR
from lab.cluster import Cluster
from lab.processes import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# Ends in "t": never one of conftest's make_cluster names (those end in a digit).
SHARED_CLUSTER = f"cl{os.getpid()}t"


@pytest.fixture(scope="module")
def cluster():
    """Two nodes; pod a on node 1 and pod b on node 2 answer on 80, each node itself on 8080
    (TCP and UDP, both families)."""
    with Cluster(SHARED_CLUSTER) as shared:
        a, b = shared.add_pod(1, "a"), shared.add_pod(2, "b")
        for server in (a, b, shared.node_host(1), shared.node_host(2)):
            server.start_server([80, 8080], udp=True)
        yield shared, a, b


def address(host, family: int) -> str:
    return host.ip if family == 4 else host.ip6


FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
MODES = pytest.mark.parametrize("mode", ["tcp", "udp"])


@FAMILIES
@MODES
def test_pods_on_different_nodes_reach_each_other(cluster, mode, family):
    _, a, b = cluster
    for client, server in ((a, b), (b, a)):
        result = client.start_client(mode, address(server, family), 80, count=5).result()
        assert result.errors == {}, (client.name, server.name, result.errors)
        assert result.answers == {f"{server.name}:80": 5}
        assert result.wrong_source == 0 and result.wrong_peer == 0


# Answers one datagram on ADDR PORT and prints the sender's address: who really arrived.
FIRST_SENDER = textwrap.dedent(
    """
    import socket, sys
    family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((sys.argv[1], int(sys.argv[2])))
        print("ready", flush=True)
        _data, sender = sock.recvfrom(2048)
        sock.sendto(b"seen:" + sys.argv[2].encode() + b"\\n", sender)
        print(sender[0], flush=True)
    """
)


def first_sender(server_host, server_address: str, client, port: int = 9000) -> str:
    """Send one datagram from client to server_address and return whose address arrived."""
    argv = [sys.executable, "-c", FIRST_SENDER, server_address, str(port)]
    listener = server_host.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    processes = server_host.lab.processes
    try:
        assert listener.stdout.readline().strip() == "ready", listener.stderr.read()
        result = client.udp(server_address, port)
        assert result.answers == {f"seen:{port}": 1}, result.errors
        done = processes.finish(listener, argv, timeout=10, check=True)
    finally:
        processes.stop(listener)
    return done.stdout.strip()


@FAMILIES
def test_pod_to_pod_across_nodes_keeps_the_pod_source(cluster, family):
    """No masquerade on the way: node 2 sees pod a's own address (kindnet's routing)."""
    _, a, b = cluster
    assert first_sender(b, address(b, family), a) == address(a, family)


@FAMILIES
def test_a_pod_on_node_2_reaches_node_1_on_its_node_address(cluster, family):
    shared, _, b = cluster
    node_1 = shared.node_host(1)
    assert first_sender(node_1, shared.node_ip(1, family), b) == address(b, family)


@FAMILIES
@MODES
def test_the_external_client_reaches_each_node_address(cluster, mode, family):
    shared, _, _ = cluster
    for i in (1, 2):
        result = shared.external.start_client(mode, shared.node_ip(i, family), 8080, count=3)
        result = result.result()
        assert result.errors == {}, (i, result.errors)
        assert result.answers == {f"node{i}:8080": 3}


@FAMILIES
@MODES
def test_the_external_client_has_no_route_to_pods(cluster, mode, family):
    """Pods answer on 80 from anywhere with a route; the outside client has none."""
    shared, a, b = cluster
    for pod in (a, b):
        result = shared.external.start_client(mode, address(pod, family), 80, count=2,
                                              timeout=0.5).result()  # fmt: skip
        assert result.answers == {}
        assert result.errors == {"ENETUNREACH": 2}


def test_node_addresses_and_routes(cluster):
    shared, _, _ = cluster
    assert [shared.node_ip(i) for i in (1, 2)] == ["172.30.0.11", "172.30.0.12"]
    assert shared.node_ip(2, 6) == "fd00:172:30::12"
    routes = shared.nodes[1].node_run(["ip", "-6", "route", "show", "fd00:10:244:2::/64"],
                                      check=True).stdout  # fmt: skip
    assert "via fd00:172:30::12 dev eth0" in routes
    with pytest.raises(ValueError, match="no node 3"):
        shared.node_ip(3)


# -- life cycle -----------------------------------------------------------------------------


def leftovers(name: str) -> list[str]:
    """What of cluster name (its wire, ext, node labs and their pods) still exists."""
    mine = re.compile(rf"bpfp-{name}(n[0-9]+)?(-.*)?")
    found = [f"netns {n}" for n in lab_netns.names() if mine.fullmatch(n)]
    found += [f"cgroup {p}" for p in cgroup2_mount().iterdir() if mine.fullmatch(p.name)]
    found += [f"pins {p}" for p in Path("/sys/fs/bpf").glob("bpfp-*") if mine.fullmatch(p.name)]
    found += [f"workdir {p}" for p in LOCK_DIR.glob("*")
              if p.is_dir() and mine.fullmatch(f"bpfp-{p.name}")]  # fmt: skip
    return found


def host_links() -> set[str]:
    """Interfaces of the host's own namespace with the lab prefix (none should ever be)."""
    out = subprocess.run(["ip", "-o", "link"], check=True, capture_output=True, text=True).stdout
    return set(re.findall(r"^\d+: (bpfp[^:@]*)", out, re.M))


def test_close_after_a_failure_leaves_nothing(new_cluster_name):
    links_before = host_links()
    with pytest.raises(RuntimeError, match="boom"), Cluster(new_cluster_name) as c:
        c.add_pod(1, "web").start_server([80])
        c.add_pod(2, "web").start_server([80])
        servers = [c.external.start_server([81])] + [
            pod.servers[0] for node in c.nodes.values() for pod in node.pods.values()]
        found = leftovers(new_cluster_name)
        assert f"netns bpfp-{new_cluster_name}-wire" in found
        assert f"netns bpfp-{new_cluster_name}-ext" in found
        assert f"netns bpfp-{new_cluster_name}n2-web" in found
        raise RuntimeError("boom")
    assert all(server.returncode is not None for server in servers)
    assert leftovers(new_cluster_name) == []
    assert host_links() == links_before


def test_a_failed_open_removes_what_it_made(new_cluster_name):
    """Node 2's lab name is taken by a live lab: open fails, and takes nothing of that lab."""
    with Lab(f"{new_cluster_name}n2") as squatter:
        with pytest.raises(RuntimeError, match="a running lab has this name"):
            Cluster(new_cluster_name).open()
        assert leftovers(new_cluster_name) == [
            f"netns {squatter.node_netns}", f"cgroup {squatter.cgroup}",
            f"workdir {squatter.workdir}"]  # fmt: skip
    assert leftovers(new_cluster_name) == []


CLUSTER_IN_A_CHILD = textwrap.dedent(
    """
    import sys, time
    from lab.cluster import Cluster
    cluster = Cluster(sys.argv[1], nodes=int(sys.argv[2]))
    cluster.open()
    cluster.add_pod(1, "web").start_server([80])
    cluster.external.start_server([81])
    print("up", flush=True)
    time.sleep(60)
    """
)


def test_the_next_open_removes_a_crashed_runs_leftovers(new_cluster_name):
    child = subprocess.Popen(
        [sys.executable, "-c", CLUSTER_IN_A_CHILD, new_cluster_name, "3"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO_ROOT},
    )  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "up"
    finally:
        child.send_signal(signal.SIGKILL)  # no teardown at all
        child.wait(timeout=10)
    crashed = leftovers(new_cluster_name)
    assert f"netns bpfp-{new_cluster_name}n3-node" in crashed
    assert f"netns bpfp-{new_cluster_name}n1-web" in crashed
    with Cluster(new_cluster_name, nodes=2) as reopened:
        # Only what this run made: no third node, no pod, the wire and ext made afresh.
        assert sorted(leftovers(new_cluster_name)) == sorted(
            [f"netns bpfp-{new_cluster_name}-{x}" for x in ("wire", "ext")]
            + [f"netns bpfp-{new_cluster_name}n{i}-node" for i in (1, 2)]
            + [f"cgroup {node.cgroup}" for node in reopened.nodes.values()]
            + [f"workdir {LOCK_DIR / name}" for name in
               (new_cluster_name, *(node.name for node in reopened.nodes.values()))])
        reopened.node_host(1).start_server([8080])
        assert reopened.external.tcp(reopened.node_ip(1), 8080).answers == {"node1:8080": 1}
    assert leftovers(new_cluster_name) == []


# -- agents on every node -------------------------------------------------------------------

VIPS = ("10.96.0.10", "fd00:10:96::10")
PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
         {"name": "dns", "port": 53, "targetPort": 8080, "protocol": "UDP"}]
SLICE_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"},
               {"name": "dns", "port": 8080, "protocol": "UDP"}]


def test_agents_on_both_nodes_balance_to_backends_on_both(make_cluster, tmp_path):
    """Each node's agent (own pins, cgroup, API) sends its pods' connections to a backend
    on either node; the other node's backend is reached by plain routing."""
    c = make_cluster()
    backends = [c.add_pod(i, f"backend-{i}") for i in (1, 2)]
    for pod in backends:
        pod.start_server([8080], udp=True)
    clients = [c.add_pod(i, f"client-{i}") for i in (1, 2)]
    nodes = {address(p, f): f"node{i}" for i, p in enumerate(backends, 1) for f in (4, 6)}
    manifests.write(
        tmp_path, "web.yaml", manifests.service("web", VIPS, PORTS),
        *(manifests.endpoint_slice("web", [address(p, family) for p in backends], SLICE_PORTS,
                                   name=f"web-ipv{family}", nodes=nodes)
          for family in (4, 6)),
    )  # fmt: skip
    agents = c.start_agents(tmp_path)
    assert agents[1].bpffs != agents[2].bpffs and all(a.bpffs.is_dir() for a in agents.values())
    want = {f"backend-{i}" for i in (1, 2)}
    for client in clients:
        for vip in VIPS:
            tcp = client.tcp(vip, 80, count=40)
            assert tcp.errors == {} and tcp.wrong_peer == 0, (client.name, vip, tcp.errors)
            assert tcp.backends() == want, (client.name, vip)
            udp = client.udp(vip, 53, count=40)
            assert udp.errors == {} and udp.wrong_source == 0, (client.name, vip, udp.errors)
            assert udp.backends() == want, (client.name, vip)
    for agent in agents.values():   # one entry per family
        http = [s for s in agent.services() if s["port_name"] == "http"]
        assert {b["address"] for s in http for b in s["backends"]} == set(nodes)
