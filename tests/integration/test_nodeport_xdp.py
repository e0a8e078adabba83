"""--acceleration native on the two-node lab: the key NodePort checks of test_nodeport.py
with the XDP program on each node's uplink (Maglev as the algorithm), that the remote
backend's flows really were forwarded in XDP (bpfp_tc_events' xdp_forwarded), and that
`bpfproxy cleanup` takes the XDP programs away."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lab import netns
from tests.integration.test_nodeport import (
    EXTERNAL_IPS,
    LB_IPS,
    eventually,
    route,
    who,
    write_service,
)
from tests.integration.test_maglev import FLOWS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
MODES = pytest.mark.parametrize("mode", ["tcp", "udp"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """test_nodeport's world, the agents with --acceleration native --lb-algorithm maglev,
    plus `far`: a service whose only backend (pod b) is on node 2."""
    from lab.cluster import Cluster
    directory = tmp_path_factory.mktemp("manifests")
    with Cluster(f"xdp{os.getpid() % 100000}") as cluster:
        a, b = cluster.add_pod(1, "a"), cluster.add_pod(2, "b")
        for pod in (a, b):
            pod.start_server([8080], udp=True, peer=True)
        write_service(directory, "web", [a, b])
        write_service(directory, "local", [a], node_ports=(30081, 30054),
                      external_traffic_policy="Local")
        write_service(directory, "lb", [a, b], service_type="LoadBalancer",
                      node_ports=(30082, 30055), load_balancer_ingress=LB_IPS,
                      external_ips=EXTERNAL_IPS,
                      load_balancer_source_ranges=["172.30.0.100/32", "fd00:172:30::100/128"])
        write_service(directory, "sticky", [a, b], node_ports=(30083, 30056),
                      session_affinity_timeout=60)
        write_service(directory, "lblocal", [b], node_ports=(30084, 30057))   # far
        for prefix, family in zip((*LB_IPS, *EXTERNAL_IPS), (4, 6, 4, 6), strict=True):
            route(cluster.external_netns, family, prefix, cluster.node_ip(1, family))
        cluster.prepare_for_xdp()
        cluster.start_agents(directory, extra_args=("--acceleration", "native",
                                                    "--lb-algorithm", "maglev"))
        yield cluster, a, b, directory


FAR = (30084, 30057)        # the service whose only backend is on node 2


def xdp_forwarded(cluster, node: int = 1) -> int:
    from agent.datapath.inventory import read_events
    return read_events(cluster.agents[node].bpffs)[("tc", "xdp_forwarded")]


def xdp_attached(cluster, node: int) -> bool:
    """iproute2's view of the node's uplink: an XDP program in driver mode."""
    shown = netns.ip("-d", "link", "show", "dev", cluster.uplink(node),
                     netns=cluster.nodes[node].node_netns)
    return re.search(r"\bxdp\b", shown) is not None and "prog/xdp id" in shown


def test_the_xdp_program_is_attached_natively_and_in_status(world):
    cluster, _, _, _ = world
    assert xdp_attached(cluster, 1) and xdp_attached(cluster, 2)
    agent = cluster.agents[1]
    status = json.loads(agent.cli("status", "--api", agent.api, "-o", "json").stdout)
    xdp = [(p["name"], p["hook"], p["target"], p["attached"]) for p in status["programs"]
           if p["hook"].startswith("xdp")]
    assert xdp == [("bpfp_xdp", "xdp", cluster.uplink(1), True)], status["programs"]


@FAMILIES
@MODES
def test_a_remote_backend_is_reached_through_xdp_with_snat(world, mode, family):
    cluster, _, _, _ = world
    port = FAR[mode == "udp"]
    before = xdp_forwarded(cluster)
    result = cluster.external.start_client(mode, cluster.node_ip(1, family), port,
                                           count=20).result()
    assert result.errors == {} and result.wrong_source == 0
    assert who(result) == Counter({("b", cluster.node_ip(1, family)): 20})
    # each request and each answer crossed node 1 in XDP, none through the TC program's
    # forwarding: at least one packet each way per request
    assert xdp_forwarded(cluster) - before >= 2 * 20


@FAMILIES
@MODES
def test_cluster_policy_reaches_backends_on_both_nodes_with_snat_for_the_remote_one(
        world, mode, family):
    cluster, _, _, _ = world
    port = 30080 if mode == "tcp" else 30053
    result = cluster.external.start_client(mode, cluster.node_ip(1, family), port,
                                           count=60).result()
    assert result.errors == {} and result.wrong_source == 0 and result.wrong_peer == 0
    client = cluster.external.ip if family == 4 else cluster.external.ip6
    assert set(who(result)) == {("a", client), ("b", cluster.node_ip(1, family))}


@FAMILIES
@MODES
def test_local_policy_keeps_the_client_address_and_only_local_backends(world, mode, family):
    cluster, _, _, _ = world
    port = 30081 if mode == "tcp" else 30054
    client = cluster.external.ip if family == 4 else cluster.external.ip6
    result = cluster.external.start_client(mode, cluster.node_ip(1, family), port,
                                           count=20).result()
    assert result.errors == {} and who(result) == Counter({("a", client): 20})
    result = cluster.external.start_client(mode, cluster.node_ip(2, family), port, count=2,
                                           timeout=0.5).result()
    assert result.answers == {} and sum(result.errors.values()) == 2, result


@FAMILIES
def test_load_balancer_and_external_ips_within_source_ranges(world, family):
    cluster, _, _, _ = world
    for address in (LB_IPS[family == 6], EXTERNAL_IPS[family == 6]):
        for mode in ("tcp", "udp"):
            result = cluster.external.start_client(mode, address, 80 if mode == "tcp" else 53,
                                                   count=20).result()
            assert result.errors == {}, (address, mode, result.errors)
            assert {pod for pod, _ in who(result)} == {"a", "b"}


def test_source_ranges_drop_other_sources_on_the_load_balancer_address(world):
    cluster, a, b, directory = world
    write_service(directory, "lb", [a, b], service_type="LoadBalancer",
                  node_ports=(30082, 30055), load_balancer_ingress=LB_IPS,
                  external_ips=EXTERNAL_IPS,
                  load_balancer_source_ranges=["198.51.100.0/24", "2001:db8:1::/48"])
    try:
        for family in (4, 6):
            lb = LB_IPS[family == 6]
            refused = eventually(lambda lb=lb: (r := cluster.external.start_client(
                "tcp", lb, 80, count=1, timeout=0.3).result()).answers == {} and r)
            assert refused and sum(refused.errors.values()) == 1, refused
            allowed = cluster.external.tcp(EXTERNAL_IPS[family == 6], 80, count=3)
            assert allowed.errors == {}, allowed
    finally:
        write_service(directory, "lb", [a, b], service_type="LoadBalancer",
                      node_ports=(30082, 30055), load_balancer_ingress=LB_IPS,
                      external_ips=EXTERNAL_IPS,
                      load_balancer_source_ranges=["172.30.0.100/32", "fd00:172:30::100/128"])
    assert eventually(lambda: cluster.external.tcp(LB_IPS[0], 80, count=1).errors == {})


@FAMILIES
def test_client_ip_affinity_from_outside(world, family):
    cluster, _, _, _ = world
    seen = Counter()
    for _ in range(3):
        seen += who(cluster.external.tcp(cluster.node_ip(1, family), 30083, count=10))
    assert len({pod for pod, _ in seen}) == 1, seen


@FAMILIES
def test_conntrack_keeps_a_udp_flow_on_its_backend(world, family):
    cluster, _, _, _ = world
    result = cluster.external.udp_one_socket(cluster.node_ip(1, family), 30053, count=30)
    assert result.errors == {} and len(who(result)) == 1, who(result)


@FAMILIES
def test_maglev_picks_the_same_backend_whichever_node_a_flow_enters(world, family):
    """One datagram per client source port to the same NodePort of each node: Maglev
    hashes what both nodes see alike, so each flow gets one backend on both."""
    cluster, _, _, _ = world
    local = cluster.external.ip if family == 4 else cluster.external.ip6
    answers = []
    for node in (1, 2):
        done = cluster.external.run([sys.executable, "-c", FLOWS, cluster.node_ip(node, family),
                                     "30053", "41000", "41040", local], timeout=120)
        assert done.returncode == 0, done.stderr
        answers.append({int(sport): answer.split(":")[0]
                        for sport, answer in (line.split() for line in done.stdout.splitlines())})
    assert answers[0] == answers[1] and set(answers[0].values()) == {"a", "b"}, answers


def xdp_program_id(cluster, node: int) -> int:
    shown = netns.ip("-d", "link", "show", "dev", cluster.uplink(node),
                     netns=cluster.nodes[node].node_netns)
    found = re.search(r"prog/xdp id (\d+)", shown)
    return int(found.group(1)) if found else 0


def test_a_restarted_agent_swaps_the_xdp_program_in_and_keeps_the_flow(world):
    """One UDP flow to the remote backend runs while node 1's agent stops and starts: the
    pinned link keeps XDP forwarding meanwhile, the new agent swaps its program in
    (bpf_link_update: another program id, never none), and no request is lost."""
    cluster, _, _, _ = world
    agent, node1 = cluster.agents[1], cluster.node_ip(1, 4)
    old_program = xdp_program_id(cluster, 1)
    client = cluster.external.start_client("udp-one-socket", node1, FAR[1], count=100000,
                                           interval=0.05, duration=120, until_stopped=True)
    client.wait_started()
    agent.stop()
    assert xdp_program_id(cluster, 1) == old_program
    forwarded = xdp_forwarded(cluster)
    agent.start()
    assert old_program != xdp_program_id(cluster, 1) != 0
    result = client.stop()
    assert result.errors == {} and set(who(result)) == {("b", node1)}, result
    assert xdp_forwarded(cluster) > forwarded


def test_cleanup_removes_the_xdp_programs(world):
    """Last in this module: it takes node 2's datapath away."""
    cluster, _, _, _ = world
    agent = cluster.agents[2]
    assert xdp_attached(cluster, 2)
    agent.stop()
    assert xdp_attached(cluster, 2)          # pinned: it outlives the agent
    done = agent.cleanup()
    assert done.returncode == 0, done.stderr
    assert not xdp_attached(cluster, 2)


@pytest.fixture
def dummy_node():
    """A namespace whose device for traffic from outside is a bridge, a driver without
    native XDP, plus a cgroup and a pin directory for a datapath there."""
    from lab import cgroups
    name = f"{netns.PREFIX}xdpdum{os.getpid() % 100000}"
    mount = cgroups.cgroup2_mount()
    cgroup, pins = mount / name, Path("/sys/fs/bpf") / name
    netns.add(name)
    try:
        netns.ip("link", "add", "bpfpnox0", "type", "bridge", netns=name)
        netns.ip("addr", "add", "192.0.2.1/24", "dev", "bpfpnox0", netns=name)
        netns.ip("link", "set", "bpfpnox0", "up", netns=name)
        cgroups.create(cgroup)
        yield name, cgroup, pins
    finally:
        from agent.datapath import loader
        loader.cleanup(pins)
        cgroups.remove_tree(cgroup, mount)
        netns.delete(name)


def load_datapath(namespace: str, cgroup: Path, pins: Path, acceleration: str):
    """The agent's own compile-and-attach step (agent.datapath.loader), in namespace."""
    from agent.datapath.config import DatapathConfig
    config = DatapathConfig(pin_dir=pins, interfaces=("bpfpnox0",), acceleration=acceleration,
                            max_frontends=1024, max_slots=4096, max_revnat=1024,
                            max_affinity=1024, max_stats=1024, ct_max=1024,
                            max_source_ranges=64, max_maglev_rows=1024)
    return subprocess.run([netns.nsenter(), f"--net={netns.path(namespace)}", "--",
                           sys.executable, "-m", "agent.datapath.loader", "--cgroup",
                           str(cgroup), "--config", config.to_json()],
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])


def test_native_fails_clearly_and_best_effort_falls_back_to_tc(dummy_node):
    namespace, cgroup, pins = dummy_node
    native = load_datapath(namespace, cgroup, pins, "native")
    assert native.returncode == 1
    assert "--acceleration native: bpfpnox0 takes no native XDP program" in native.stderr, \
        native.stderr
    best_effort = load_datapath(namespace, cgroup, pins, "best-effort")
    assert best_effort.returncode == 0, best_effort.stderr
    assert "event=xdp_fallback interface=bpfpnox0" in best_effort.stderr
    links = {link.name for link in (pins / "links").iterdir()}
    assert {"tc-bpfpnox0-ingress", "tc-bpfpnox0-egress"} <= links
    assert not any(link.startswith("xdp-") for link in links), links
