"""What only --acceleration has, on the two-node lab with the XDP program on each node's
uplink (Maglev as the algorithm): the program attached in driver mode and listed by status,
a remote backend's flows forwarded in XDP both ways (bpfp_tc_events' xdp_forwarded), the
same Maglev choice whichever node a flow enters, a flow kept across a restart and an
upgrade (pinned link, program swapped atomically), `bpfproxy cleanup` taking the XDP
programs away, native failing clearly where the driver has no XDP and best-effort falling
back to TC. The NodePort behaviour itself (policies, source ranges, affinity, conntrack,
health, ICMP) runs in both modes in test_nodeport.py: not repeated here."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lab import netns
from lab.agent_runner import BPFPROXY
from tests.integration.test_maglev import FLOWS
from tests.integration.test_nodeport import eventually, read_flows, who, write_service

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
MODES = pytest.mark.parametrize("mode", ["tcp", "udp"])
FAR = (30084, 30057)        # NodePorts (TCP, UDP) of the service only on node 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two nodes, the agents with --acceleration native --lb-algorithm maglev; pod a on
    node 1 and pod b on node 2. `web` is on both pods, `far` only on b (node 2)."""
    from lab.cluster import Cluster
    directory = tmp_path_factory.mktemp("manifests")
    with Cluster(f"xdp{os.getpid() % 100000}") as cluster:
        a, b = cluster.add_pod(1, "a"), cluster.add_pod(2, "b")
        for pod in (a, b):
            pod.start_server([8080], udp=True, peer=True)
        write_service(directory, "web", [a, b])
        write_service(directory, "lblocal", [b], node_ports=FAR)   # far
        cluster.prepare_for_xdp()
        cluster.start_agents(directory, extra_args=("--acceleration", "native",
                                                    "--lb-algorithm", "maglev"))
        yield cluster, a, b, directory


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


def test_restart_and_upgrade_keep_the_xdp_flow(world, tmp_path):
    """One UDP flow to the remote backend runs while node 1's agent stops, a build whose
    map layout changed (version 2, as in test_reliability_upgrade) starts and stops, and
    the first build starts again: the pinned link keeps XDP forwarding while no agent runs,
    each start swaps its program in (bpf_link_update: another id, never none), the flow
    keeps its conntrack entry (same SNAT port, not opened again) and no request is lost."""
    from tests.integration.test_reliability_upgrade import BuildRunner, build_v2
    cluster, _, _, directory = world
    agent, node1 = cluster.agents[1], cluster.node_ip(1, 4)
    v2 = BuildRunner(agent.lab, directory, extra_args=agent.extra_args, node_name="node1",
                     build=build_v2(tmp_path / "build-v2"))
    client = cluster.external.start_client("udp-one-socket", node1, FAR[1], count=100000,
                                           interval=0.05, duration=180, until_stopped=True)
    client.wait_started()
    flow = far_flow(agent)
    programs = [xdp_program_id(cluster, 1)]
    try:
        assert agent.stop(signal.SIGTERM) == 0
        assert xdp_program_id(cluster, 1) == programs[0]       # pinned: still there
        forwarded = xdp_forwarded(cluster)
        assert eventually(lambda: xdp_forwarded(cluster) > forwarded)   # ...and working
        v2.start()
        programs.append(xdp_program_id(cluster, 1))
        assert v2.stop(signal.SIGTERM) == 0
    finally:
        if v2.process is not None and v2.process.poll() is None:
            v2.stop(signal.SIGKILL)        # never v2.close(): its cleanup is node 1's
        agent.start()
    programs.append(xdp_program_id(cluster, 1))
    forwarded = xdp_forwarded(cluster)
    result = client.stop()
    assert result.errors == {} and set(who(result)) == {("b", node1)}, result
    assert 0 not in programs and len(set(programs)) == 3, programs
    assert far_flow(agent) == flow, "the same conntrack entry, SNAT port and all"
    assert xdp_forwarded(cluster) > forwarded


def far_flow(agent) -> tuple:
    """The UDP flow to FAR that node 1 saw last (the latest expiry): its conntrack key and
    what it rewrites to (backend, SNAT port)."""
    key, value = max(((k, v) for k, v in read_flows(agent, 17)
                      if k.dport == socket.htons(FAR[1])), key=lambda kv: kv[1].expires)
    return bytes(key), bytes(value.saddr), bytes(value.daddr), value.sport, value.dport


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
                          cwd=REPO)


def test_native_fails_clearly_and_best_effort_falls_back_to_tc(dummy_node, tmp_path):
    """native: the loader stops with why. best-effort: the real agent starts with the TC
    programs alone, says so once in its log, and status shows the XDP program as not
    attached with what handles the traffic instead and why (not MISSING)."""
    namespace, cgroup, pins = dummy_node
    native = load_datapath(namespace, cgroup, pins, "native")
    assert native.returncode == 1
    assert "--acceleration native: bpfpnox0 takes no native XDP program" in native.stderr, \
        native.stderr
    api = f"unix://{tmp_path}/api.sock"
    (tmp_path / "manifests").mkdir()
    with open(tmp_path / "agent.log", "w") as log:
        agent = subprocess.Popen(
            [netns.nsenter(), f"--net={netns.path(namespace)}", "--", *BPFPROXY, "agent",
             "--manifests", str(tmp_path / "manifests"), "--cgroup", str(cgroup), "--bpffs",
             str(pins), "--api", api, "--node-name", "bpfpnox", "--interfaces", "bpfpnox0",
             "--acceleration", "best-effort"], stdout=log, stderr=subprocess.STDOUT,
            cwd=REPO)
    try:
        waited = subprocess.run([*BPFPROXY, "status", "--api", api, "--wait", "60"],
                                capture_output=True, text=True, timeout=90, cwd=REPO)
        assert waited.returncode == 0, (tmp_path / "agent.log").read_text()
        status = subprocess.run([*BPFPROXY, "status", "--api", api], capture_output=True,
                                text=True, timeout=30, cwd=REPO).stdout
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    [xdp] = [line for line in status.splitlines() if line.startswith("bpfp_xdp")]
    assert re.search(r"xdp\s+bpfpnox0\s+not attached: the TC programs handle bpfpnox0 "
                     r"\(--acceleration best-effort fell back: no native XDP on bpfpnox0: "
                     r".+\)$", xdp), status
    said = re.findall(r"event=xdp_fallback .*", (tmp_path / "agent.log").read_text())
    assert len(said) == 1 and "xdp=not_attached traffic=tc" in said[0], said
    links = {link.name for link in (pins / "links").iterdir()}
    assert {"tc-bpfpnox0-ingress", "tc-bpfpnox0-egress"} <= links
    assert not any(link.startswith("xdp-") for link in links), links
