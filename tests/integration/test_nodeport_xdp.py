"""What only --acceleration has, on the two-node lab with the XDP program on node 1's
uplink: the program attached in driver mode and listed by status, a remote backend's flows
forwarded in XDP both ways (bpfp_tc_events' xdp_forwarded), a flow kept across a restart
and an upgrade (pinned link, program swapped atomically), `bpfproxy cleanup` taking the XDP
program away, native failing clearly where the driver has no XDP and best-effort falling
back to TC (status and log). The NodePort behaviour itself (policies, source ranges,
affinity, conntrack, health, ICMP) runs in both modes in test_nodeport.py: not repeated
here."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lab import netns
from lab.agent_runner import BPFPROXY
from tests.integration.test_nodeport import eventually, who, write_service

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
MODES = pytest.mark.parametrize("mode", ["tcp", "udp"])
FAR = (30084, 30057)        # NodePorts (TCP, UDP) of the service only on node 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two nodes, an agent with --acceleration native on node 1 only (node 2 just routes
    to its pod b, as XDP on node 1 needs nothing of it); `far`'s only backend is b."""
    from lab.agent_runner import AgentRunner
    from lab.cluster import Cluster
    directory = tmp_path_factory.mktemp("manifests")
    with Cluster(f"xdp{os.getpid() % 100000}") as cluster:
        b = cluster.add_pod(2, "b")
        b.start_server([8080], udp=True, peer=True)
        write_service(directory, "lblocal", [b], node_ports=FAR)   # far
        cluster.prepare_for_xdp()
        args = ("--node-ip", f"{cluster.node_ip(1, 4)},{cluster.node_ip(1, 6)}",
                "--interfaces", cluster.uplink(1), "--acceleration", "native")
        cluster.agents[1] = AgentRunner(cluster.nodes[1], directory, extra_args=args,
                                        node_name="node1")   # closed with the cluster
        cluster.agents[1].start()
        yield cluster, b, directory


def xdp_forwarded(cluster, node: int = 1) -> int:
    from agent.datapath.inventory import read_events
    return read_events(cluster.agents[node].bpffs)[("tc", "xdp_forwarded")]


def xdp_attached(cluster, node: int) -> bool:
    """iproute2's view of the node's uplink: an XDP program in driver mode."""
    shown = netns.ip("-d", "link", "show", "dev", cluster.uplink(node),
                     netns=cluster.nodes[node].node_netns)
    return re.search(r"\bxdp\b", shown) is not None and "prog/xdp id" in shown


def test_the_xdp_program_is_attached_natively_and_in_status(world):
    cluster, _, _ = world
    assert xdp_attached(cluster, 1)
    agent = cluster.agents[1]
    status = json.loads(agent.cli("status", "--api", agent.api, "-o", "json").stdout)
    xdp = [(p["name"], p["hook"], p["target"], p["attached"]) for p in status["programs"]
           if p["hook"].startswith("xdp")]
    assert xdp == [("bpfp_xdp", "xdp", cluster.uplink(1), True)], status["programs"]


@FAMILIES
@MODES
def test_a_remote_backend_is_reached_through_xdp_with_snat(world, mode, family):
    cluster, _, _ = world
    port = FAR[mode == "udp"]
    before = xdp_forwarded(cluster)
    result = cluster.external.start_client(mode, cluster.node_ip(1, family), port,
                                           count=20).result()
    assert result.errors == {} and result.wrong_source == 0
    assert who(result) == Counter({("b", cluster.node_ip(1, family)): 20})
    # each request and each answer crossed node 1 in XDP, none through the TC program's
    # forwarding: at least one packet each way per request
    assert xdp_forwarded(cluster) - before >= 2 * 20


def xdp_program_id(cluster, node: int) -> int:
    shown = netns.ip("-d", "link", "show", "dev", cluster.uplink(node),
                     netns=cluster.nodes[node].node_netns)
    found = re.search(r"prog/xdp id (\d+)", shown)
    return int(found.group(1)) if found else 0


# node 1's view of the flow to FAR it saw last (its conntrack key, and what it rewrites to:
# backend, SNAT port) and of xdp_forwarded, read by the build that owns the pins (cwd)
NODE1_VIEW = """
import json, socket, sys
from pathlib import Path
from agent.datapath.inventory import read_events
from agent.datapath.maps import BpfServiceMaps
pins, port = Path(sys.argv[1]), int(sys.argv[2])
maps = BpfServiceMaps(pins)
k, v = max(((k, v) for k, v in maps.flows() if k.proto == 17 and k.dport == socket.htons(port)),
           key=lambda kv: kv[1].expires)
print(json.dumps({"flow": [bytes(k).hex(), bytes(v.saddr).hex(), bytes(v.daddr).hex(), v.sport,
                           v.dport], "forwarded": read_events(pins)[("tc", "xdp_forwarded")]}))
"""


def node1_view(agent, build: Path = REPO) -> dict:
    done = subprocess.run([sys.executable, "-c", NODE1_VIEW, str(agent.bpffs), str(FAR[1])],
                          capture_output=True, text=True, timeout=60, cwd=build, check=True)
    return json.loads(done.stdout)


def test_restart_and_upgrade_keep_the_xdp_flow(world, tmp_path):
    """Last on node 1. One UDP flow to the remote backend runs while node 1's agent stops
    and a build whose map layout changed (version 2, as in test_reliability_upgrade) takes
    over: the pinned link keeps the program and XDP forwarding while no agent runs, the new
    build swaps its program in (bpf_link_update: another id, never none) and forwards the
    flow in XDP from its own maps, the flow keeps its conntrack entry (same SNAT port, not
    opened again) and no request is lost. (A restart is the same swap by the same build.)"""
    from tests.integration.test_reliability_upgrade import BuildRunner, build_v2
    cluster, _, directory = world
    agent, node1 = cluster.agents[1], cluster.node_ip(1, 4)
    v2_build = build_v2(tmp_path / "build-v2")
    v2 = BuildRunner(agent.lab, directory, extra_args=agent.extra_args, node_name="node1",
                     build=v2_build)
    client = cluster.external.start_client("udp-one-socket", node1, FAR[1], count=100000,
                                           interval=0.05, duration=180, until_stopped=True)
    client.wait_started()
    before = node1_view(agent)
    program = xdp_program_id(cluster, 1)
    try:
        assert agent.stop(signal.SIGTERM) == 0
        assert xdp_program_id(cluster, 1) == program               # pinned: still there
        forwarded = xdp_forwarded(cluster)
        assert eventually(lambda: xdp_forwarded(cluster) > forwarded)   # ...and working
        v2.start()
        assert program != xdp_program_id(cluster, 1) != 0
        after = node1_view(agent, v2_build)
        assert eventually(lambda: node1_view(agent, v2_build)["forwarded"] > after["forwarded"])
        result = client.stop()
    finally:
        if v2.process is not None and v2.process.poll() is None:
            v2.stop(signal.SIGKILL)        # never v2.close(): node 1's cleanup is the world's
    assert result.errors == {} and set(who(result)) == {("b", node1)}, result
    assert after["flow"] == before["flow"], "the same conntrack entry, SNAT port and all"


def test_cleanup_removes_the_xdp_programs(world):
    """Last on node 1: it takes its datapath away (whichever build left it)."""
    cluster, _, _ = world
    agent = cluster.agents[1]
    if agent.process.poll() is None:
        agent.stop()
    assert xdp_attached(cluster, 1)          # pinned: it outlives the agent
    done = agent.cleanup()
    assert done.returncode == 0, done.stderr
    assert not xdp_attached(cluster, 1)


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
