"""Clean removal (issue 9, point 7): after agents served ClusterIP and NodePort traffic
(socket LB, TC programs, conntrack), one was SIGKILLed and restarted and a service changed,
`bpfproxy cleanup` leaves none of their programs, maps, links, tcx/tc attachments, cgroup
attachments or pins; also after loads that failed half-way. Checked with bpftool, by the ids
these agents had (other engineers' labs run their own bpfp_ programs meanwhile)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent import capabilities
from agent.datapath import layout
from lab import manifests
from lab.agent_runner import AgentRunner
from tests import reliability_report
from tests.helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

VIP = "10.96.0.97"
NODE_PORTS = {"TCP": 30097, "UDP": 30098}
SLICE_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"},
               {"name": "dns", "port": 8080, "protocol": "UDP"}]

# Which programs sit on an interface's tcx hooks: bpftool 7.1 (Debian 12) predates tcx.
TCX_QUERY = """
import ctypes, json, socket, sys
libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
ifindex = socket.if_nametoindex(sys.argv[1])
found = {}
for hook, attach_type in (("ingress", 46), ("egress", 47)):
    ids, count, flags = (ctypes.c_uint32 * 64)(), ctypes.c_uint32(64), ctypes.c_uint32(0)
    if libbpf.bpf_prog_query(ifindex, attach_type, 0, ctypes.byref(flags), ids,
                             ctypes.byref(count)) != 0:
        sys.exit("bpf_prog_query: errno %d" % ctypes.get_errno())
    found[hook] = list(ids[:count.value])
print(json.dumps(found))
"""


def bpftool(*args: str, netns: str | None = None):
    argv = ["bpftool", "-j", *args]
    if netns:
        argv = ["nsenter", f"--net=/run/netns/{netns}", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr.strip()}"
    return json.loads(done.stdout or "[]")


@dataclass
class KernelObjects:
    """Ids of what an agent installed, read through its pins."""

    programs: set[int] = field(default_factory=set)
    maps: set[int] = field(default_factory=set)
    links: set[int] = field(default_factory=set)
    pins: int = 0

    def add(self, other: KernelObjects) -> None:
        self.programs |= other.programs
        self.maps |= other.maps
        self.links |= other.links
        self.pins = max(self.pins, other.pins)


def objects_of(bpffs: Path) -> KernelObjects:
    found = KernelObjects()
    for pin in sorted(bpffs.glob("bpfp_*")):
        found.maps.add(bpftool("map", "show", "pinned", str(pin))["id"])
        found.pins += 1
    links = bpffs / "links"
    for pin in sorted(links.iterdir()) if links.is_dir() else ():
        link = bpftool("link", "show", "pinned", str(pin))
        found.links.add(link["id"])
        found.programs.add(link["prog_id"])
        found.pins += 1
    for prog_id in found.programs:       # maps only a program holds (not pinned) too
        found.maps |= set(bpftool("prog", "show", "id", str(prog_id)).get("map_ids", []))
    return found


def same_ids(one: KernelObjects, other: KernelObjects) -> bool:
    return (one.programs, one.maps, one.links) == (other.programs, other.maps, other.links)


def live(objects: KernelObjects) -> KernelObjects:
    """Which of objects the kernel still has."""
    return KernelObjects(
        programs=objects.programs & {p["id"] for p in bpftool("prog", "show")},
        maps=objects.maps & {m["id"] for m in bpftool("map", "show")},
        links=objects.links & {x["id"] for x in bpftool("link", "show")})


def released(objects: KernelObjects, timeout: float = 20.0) -> KernelObjects:
    """The kernel frees unpinned links (and so programs and maps) from a work queue: wait
    for it; return what is left when it has not."""
    deadline = time.monotonic() + timeout
    while (left := live(objects)) and (left.programs or left.maps or left.links) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def cgroup_programs(cgroup: Path) -> list:
    """Programs attached anywhere in the cgroup tree (pods' cgroups included)."""
    return [entry for entry in bpftool("cgroup", "tree", str(cgroup)) if entry.get("programs")
            or entry.get("id")]


def interface_programs(netns: str, ifname: str = "eth0") -> dict:
    """tc (clsact) filters from bpftool, tcx programs from a query in the namespace."""
    tc = bpftool("net", "show", "dev", ifname, netns=netns)
    tc_filters = [f for entry in tc for f in entry.get("tc", [])]
    done = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c",
                           TCX_QUERY, ifname], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return {"tc": tc_filters, **json.loads(done.stdout)}


def write_service(directory: Path, pods, port_name_suffix: str = "") -> None:
    ports = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP",
              "nodePort": NODE_PORTS["TCP"]},
             {"name": "dns", "port": 53, "targetPort": 8080, "protocol": "UDP",
              "nodePort": NODE_PORTS["UDP"]}]
    if port_name_suffix:      # the service change: one more port
        ports.append({"name": f"alt{port_name_suffix}", "port": 81, "targetPort": 8080,
                      "protocol": "TCP", "nodePort": 30099})
    manifests.write(directory, "web.yaml",
                    manifests.service("web", VIP, ports, service_type="NodePort"),
                    manifests.endpoint_slice("web", [p.ip for p in pods], SLICE_PORTS,
                                             nodes={p.ip: f"node{p.lab.name[-1]}"
                                                    for p in pods}))


def test_cleanup_after_traffic_restart_and_change_leaves_nothing(tmp_path):
    from lab.cluster import Cluster
    directory = tmp_path / "manifests"
    connections = failures = 0
    with Cluster("s9clean") as cluster:
        a, b = cluster.add_pod(1, "a"), cluster.add_pod(2, "b")
        client = cluster.add_pod(1, "client")
        for pod in (a, b):
            pod.start_server([8080], udp=True)
        write_service(directory, [a, b])
        agents = cluster.start_agents(directory, extra_args=("--metrics", "off",
                                                             "--healthz", "off"))
        node1 = cluster.node_ip(1)

        def traffic() -> None:
            nonlocal connections, failures
            for result in (client.tcp(VIP, 80, count=10),                      # socket LB
                           cluster.external.tcp(node1, NODE_PORTS["TCP"], count=10),  # TC
                           cluster.external.udp(node1, NODE_PORTS["UDP"], count=10)):
                connections += result.total
                failures += result.failed
                assert result.errors == {} and result.backends() == {"a", "b"}, result

        traffic()
        first = KernelObjects()
        for agent in agents.values():
            first.add(objects_of(agent.bpffs))
        # one agent killed (no goodbye) and started again: it adopts and swaps programs in
        agents[1].stop(signal.SIGKILL)
        agents[1].start()
        write_service(directory, [a, b], port_name_suffix="1")
        for agent in agents.values():
            wait_for(lambda agent=agent: len(agent.services()) == 3, "the added port")
        traffic()
        now = KernelObjects()
        for agent in agents.values():
            now.add(objects_of(agent.bpffs))
            # the lab's agents run as root: after loading they keep the documented set only
            assert capabilities.of_task(f"/proc/{agent.process.pid}/status") == \
                capabilities.AGENT_CAPABILITIES
        ct_entries = sum(m["entries"] for agent in agents.values()
                         for m in json.loads(agent.cli("status", "--api", agent.api,
                                                       "-o", "json").stdout)["maps"]
                         if m["name"].startswith("bpfp_ct"))

        # the restart swapped node 1's programs in: the old ones are gone already
        replaced = first.programs - now.programs
        assert replaced and live(first).programs <= now.programs
        had = KernelObjects()
        had.add(first)
        had.add(now)
        # before cleanup: everything the checks below look for is there (they can fail)
        assert same_ids(live(now), now) and now.programs and now.maps and now.links
        for agent in agents.values():
            assert cgroup_programs(agent.lab.cgroup), "socket programs on the lab cgroup"
            attached = interface_programs(agent.lab.node_netns)
            assert attached["ingress"] and attached["egress"], attached
        assert ct_entries > 0, "NodePort traffic to the other node's pod is tracked"

        started = time.monotonic()
        for agent in agents.values():
            assert agent.stop() == 0
            done = agent.cleanup()
            assert done.returncode == 0, done.stderr
        left = released(had)
        seconds = time.monotonic() - started
        on_cgroups = {i: cgroup_programs(agent.lab.cgroup) for i, agent in agents.items()}
        on_eth0 = {i: interface_programs(agent.lab.node_netns) for i, agent in agents.items()}
        pins_left = [str(agent.bpffs) for agent in agents.values() if agent.bpffs.exists()]

    reliability_report.record(
        "7", "cleanup-after-restart-and-churn",
        "2 nodes, ClusterIP from a pod and NodePort TCP/UDP from outside (TC, conntrack), "
        "node 1's agent SIGKILLed and restarted, a port added; then `bpfproxy cleanup` on "
        "each node, checked with bpftool",
        connections=connections, failures=failures, programs=len(had.programs),
        maps=len(had.maps), links=len(had.links), pins=had.pins,
        programs_replaced_at_restart=len(replaced),
        conntrack_entries=ct_entries,
        left=len(left.programs) + len(left.maps) + len(left.links) + len(pins_left),
        seconds_to_released=round(seconds, 2))
    assert same_ids(left, KernelObjects()), left
    assert on_cgroups == {1: [], 2: []}, on_cgroups
    for i, found in on_eth0.items():
        assert found == {"tc": [], "ingress": [], "egress": []}, (i, found)
    assert pins_left == []


def test_cleanup_after_failed_loads_leaves_nothing(make_lab, tmp_path):
    """A load that stopped half-way: socket programs attached but the TC interface missing;
    then a pinned map of another layout (refused after BCC pinned the rest)."""
    lab = make_lab(name="s9fail")
    directory = tmp_path / "manifests"
    manifests.write(directory, "web.yaml",
                    manifests.service("web", VIP, [{"name": "http", "port": 80,
                                                    "targetPort": 8080, "protocol": "TCP"}]))
    scenarios = {
        "missing interface": ("--interfaces", "bpfpnone0"),
        "map of another layout": (),
    }
    removed = {}
    for what, extra in scenarios.items():
        agent = AgentRunner(lab, directory, extra_args=extra)
        if what == "map of another layout":
            agent.bpffs.mkdir(mode=0o700)
            pin = agent.bpffs / layout.MAPS["bpfp_svc4"].pin
            subprocess.run(["bpftool", "map", "create", str(pin), "type", "hash", "key", "4",
                            "value", "4", "entries", "16", "name", "bpfp_wrong"], check=True,
                           timeout=30)
        try:
            agent.start(wait=0)
            code = agent.process.wait(timeout=120)
            lab.processes.forget(agent.process)
            assert code == 1, f"{what}: the agent must fail; exit {code}\n{agent.log()}"
            had = objects_of(agent.bpffs)
            attached = cgroup_programs(lab.cgroup)
            done = agent.cleanup()
            left = released(had)
            pins_left = agent.bpffs.exists()
        finally:
            agent.close()
        removed[what] = had
        assert had.maps and same_ids(left, KernelObjects()), (what, left)
        assert done.returncode == 0, done.stderr
        assert not pins_left
        assert cgroup_programs(lab.cgroup) == []
        if what == "missing interface":
            # found before any hook is swapped: nothing attached, only the compiled maps
            assert "bpfpnone0" in agent.log() and not had.links and not attached, \
                agent.log()[-2000:]
        else:
            assert "has another layout" in agent.log() and not had.links and not attached
    reliability_report.record(
        "7", "cleanup-after-failed-load",
        "agent start failing half-way (a TC interface missing: found before any program is "
        "attached; a pinned map of another layout), then `bpfproxy cleanup`",
        **{f"{what.replace(' ', '_')}": f"{len(had.maps)} maps, {len(had.links)} links, "
           f"0 left" for what, had in removed.items()})
