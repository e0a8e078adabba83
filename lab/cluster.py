"""Cluster: several lab nodes joined by a wire (an L2 bridge in its own namespace), plus an
outside client on that wire, so NodePort traffic can really enter one node and cross to another.

Node i (1-based) is Lab(f"{name}n{i}") with pod CIDRs 10.244.i.0/24 and fd00:10:244:i::/64 and
an uplink eth0 at 172.30.0.(10+i) / fd00:172:30::(10+i). Pod-to-pod across nodes is plain
routing via the other node's eth0 address (no overlay, no masquerade), as kind's kindnet does.
The external client at 172.30.0.100 / fd00:172:30::100 knows only node addresses.

A bridged node (Cluster(..., bridged={i})) is the bare-metal layout instead: its eth0 is a
port of the pod bridge, which holds the node's wire addresses beside the pods' gateway, and
its agent's --interfaces is that bridge."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lab import cleanup, netns
from lab.agent_runner import AgentRunner
from lab.claimed import Claimed
from lab.node import BRIDGE, Lab
from lab.pod import Pod, PodHome
from lab.processes import Processes

WIRE_BRIDGE = "bpfp-wire"
# Fixed, like the node bridge's: a bridge otherwise takes the lowest port MAC, which changes as
# nodes come and go.
WIRE_BRIDGE_MAC = "02:62:70:66:00:02"
NODE_NET = "172.30.0"  # node i: .(10+i), the external client: .100
NODE_NET6 = "fd00:172:30:"
UPLINK = "eth0"
EXTERNAL_HOST = 100
MAX_NODES = 9  # 10.244.i.0/24 and .(10+i) leave room for more; labs share 2 cores

@dataclass(eq=False)
class Host(Pod):
    """A namespace that is not a pod (the external client, a node itself) with a Pod's server
    and client helpers. No cgroup: no agent's socket hooks see its traffic."""

    answer_as: str = ""  # what its podservers answer with (default: its name)

    def start_server(
        self, ports: list[int], udp: bool = False, name: str | None = None, **kw
    ) -> subprocess.Popen:
        return super().start_server(ports, udp, name or self.answer_as or None, **kw)


class Cluster(Claimed):
    """with Cluster("c1") as cluster: a = cluster.add_pod(1, "a"); cluster.external.tcp(...)"""

    kind = "cluster"

    def __init__(self, name: str, nodes: int = 2, bridged: Iterable[int] = ()) -> None:
        if not re.fullmatch(r"[a-z0-9]{1,10}", name):
            raise ValueError(f"cluster name {name!r}: use 1-10 characters of [a-z0-9]")
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"cluster {name}: {nodes} nodes; use 1-{MAX_NODES}")
        self.bridged = frozenset(bridged)
        if not self.bridged <= set(range(1, nodes + 1)):
            raise ValueError(f"cluster {name}: bridged nodes {sorted(self.bridged)}; "
                             f"nodes are 1-{nodes}")
        self.name = name
        self.nodes: dict[int, Lab] = {
            i: Lab(f"{name}n{i}", pod_cidr=f"10.244.{i}.0/24", pod_cidr6=f"fd00:10:244:{i}::/64")
            for i in range(1, nodes + 1)
        }
        self.wire_netns = f"{netns.PREFIX}{name}-wire"
        self.external_netns = f"{netns.PREFIX}{name}-ext"
        self.processes = Processes()  # the external client's
        self.workdir = cleanup.workdir(name)
        self.external = Host(
            lab=PodHome(name, self.processes, self.workdir),
            name="ext",
            ip=f"{NODE_NET}.{EXTERNAL_HOST}",
            ip6=f"{NODE_NET6}:{EXTERNAL_HOST}",
            netns=self.external_netns,
            cgroup=None,
            node_veth="bpfpwext",
        )
        self.agents: dict[int, AgentRunner] = {}
        self._node_hosts: dict[int, Host] = {}

    # -- life cycle (open, close and `with` come from Claimed) ---------------------------

    def _build(self) -> None:
        # The cluster's name is claimed like a lab's: bpfp-NAME-wire and bpfp-NAME-ext are
        # then NAME's to remove, here and in cleanup_stale().
        cleanup.remove_cluster(self.name)  # leftovers of a crashed run of the same name
        self.workdir.mkdir()
        self._make_wire()
        for i, node in self.nodes.items():
            node.open()
            self._make_uplink(i, node)
        self._route_pod_cidrs()
        self._make_external()

    def _make_wire(self) -> None:
        netns.add(self.wire_netns)
        netns.ip(
            "link", "add", WIRE_BRIDGE, "address", WIRE_BRIDGE_MAC, "type", "bridge",
            "mcast_snooping", "0", netns=self.wire_netns,
        )  # fmt: skip
        netns.ip("link", "set", WIRE_BRIDGE, "up", netns=self.wire_netns)

    def _plug_into_wire(
        self, ns: str, wire_port: str, ip: str, ip6: str, bridge: str | None = None
    ) -> None:
        """eth0 in ns, its veth peer a port of the wire bridge; both made in place. With
        bridge, eth0 is a port of that bridge in ns, and the bridge takes the addresses."""
        netns.ip(
            "link", "add", UPLINK, "type", "veth", "peer", "name", wire_port,
            "netns", self.wire_netns, netns=ns,
        )  # fmt: skip
        netns.ip("link", "set", wire_port, "master", WIRE_BRIDGE, "up", netns=self.wire_netns)
        if bridge:
            netns.ip("link", "set", UPLINK, "master", bridge, netns=ns)
        device = bridge or UPLINK
        netns.ip("addr", "add", f"{ip}/24", "dev", device, netns=ns)
        netns.ip("-6", "addr", "add", f"{ip6}/64", "dev", device, "nodad", netns=ns)
        netns.ip("link", "set", UPLINK, "up", netns=ns)

    def prepare_for_xdp(self) -> None:
        """For agents with --acceleration, whose XDP programs send packets back out the
        uplink they came in on (XDP_TX): the wire's ports get an XDP program of their own,
        and the veths that packets start from (the outside client's, the nodes' uplinks,
        the pods') finish their checksums themselves (see netns.prepare_for_xdp). Call it
        after adding the pods."""
        for i in self.nodes:
            netns.prepare_for_xdp(self.wire_netns, f"bpfpw{i}", xdp_pass=True)
        netns.prepare_for_xdp(self.external_netns, UPLINK)
        for i, node in self.nodes.items():
            netns.prepare_for_xdp(node.node_netns, UPLINK)
        for node in self.nodes.values():
            for pod in node.pods.values():
                netns.prepare_for_xdp(pod.netns, "eth0")

    def uplink(self, i: int) -> str:
        """Node i's interface on the wire: what its agent's --interfaces names."""
        self._check_node(i)
        return BRIDGE if i in self.bridged else UPLINK

    def _make_uplink(self, i: int, node: Lab) -> None:
        ns = node.node_netns
        # The TC programs will send packets back out the interface they came in on (SNAT to a
        # backend on another node): no redirects for that, and no reverse-path drops of the
        # replies. "default" before eth0 exists, so eth0 starts with it; eth0 set again anyway.
        loose = {
            "net.ipv4.conf.all.send_redirects": 0,
            "net.ipv4.conf.default.send_redirects": 0,
            "net.ipv4.conf.all.rp_filter": 0,
            "net.ipv4.conf.default.rp_filter": 0,
        }
        netns.sysctl(ns, loose)
        uplink = self.uplink(i)
        if i in self.bridged:
            # Every node's pod bridge has the lab's fixed MAC: on one wire each needs its own.
            netns.ip("link", "set", BRIDGE, "address", f"02:62:70:66:01:{i:02x}", netns=ns)
        self._plug_into_wire(ns, f"bpfpw{i}", self.node_ip(i, 4), self.node_ip(i, 6),
                             BRIDGE if i in self.bridged else None)  # fmt: skip
        netns.sysctl(ns, {f"net.ipv4.conf.{uplink}.send_redirects": 0,
                          f"net.ipv4.conf.{uplink}.rp_filter": 0})  # fmt: skip
        self._node_hosts[i] = Host(
            lab=node.home,
            name="node",  # no pod may be called that: stopping a pod never stops these
            ip=self.node_ip(i, 4),
            ip6=self.node_ip(i, 6),
            netns=ns,
            cgroup=None,
            node_veth=UPLINK,
            answer_as=f"node{i}",
        )

    def _route_pod_cidrs(self) -> None:
        for i, node in self.nodes.items():
            for j, other in self.nodes.items():
                if j == i:
                    continue
                ns = node.node_netns
                uplink = self.uplink(i)
                netns.ip("route", "add", str(other.pod_cidr), "via", self.node_ip(j, 4),
                         "dev", uplink, netns=ns)  # fmt: skip
                netns.ip("-6", "route", "add", str(other.pod_cidr6), "via", self.node_ip(j, 6),
                         "dev", uplink, netns=ns)  # fmt: skip

    def _make_external(self) -> None:
        netns.add(self.external_netns)
        netns.sysctl(self.external_netns, {"net.ipv6.conf.default.accept_dad": 0})  # as nodes
        # Only the wire's own subnet: an outside client reaches node addresses, never pods.
        self._plug_into_wire(self.external_netns, self.external.node_veth, self.external.ip,
                             self.external.ip6)  # fmt: skip

    def _teardown_steps(self):
        """Stop agents and processes, remove every node lab, the wire and the external
        client."""
        return [*(agent.close for agent in self.agents.values()), self.processes.stop_all,
                *(node.close for node in self.nodes.values()),
                lambda: cleanup.remove_lab(self.name), self.agents.clear,
                self._node_hosts.clear]  # fmt: skip

    # -- nodes, pods, agents ---------------------------------------------------------------

    def node_ip(self, i: int, family: int = 4) -> str:
        """Node i's address on the wire (its eth0): what NodePorts are served on."""
        self._check_node(i)
        if family not in (4, 6):
            raise ValueError(f"family {family!r}: use 4 or 6")
        return f"{NODE_NET}.{10 + i}" if family == 4 else f"{NODE_NET6}:{10 + i}"

    def node_host(self, i: int) -> Host:
        """Node i's own namespace as a Host: servers there answer `node<i>:PORT`."""
        self._check_node(i)
        if i not in self._node_hosts:
            raise RuntimeError(f"cluster {self.name}: not open")
        return self._node_hosts[i]

    def add_pod(self, node_index: int, name: str) -> Pod:
        self._check_node(node_index)
        return self.nodes[node_index].add_pod(name)

    def start_agents(
        self, manifests: Path, extra_args: Iterable[str] = (), wait: float = 60.0
    ) -> dict[int, AgentRunner]:
        """One agent per node on the same manifest directory (one API server for all nodes),
        each with its own pins, cgroup and API socket; started together, then waited for."""
        for i, node in self.nodes.items():
            node_ips = f"{self.node_ip(i, 4)},{self.node_ip(i, 6)}"
            args = ("--node-ip", node_ips, "--interfaces", self.uplink(i), *extra_args)
            self.agents[i] = AgentRunner(node, manifests, extra_args=args, node_name=f"node{i}")
            self.agents[i].start(wait=0)
        if wait:
            for agent in self.agents.values():
                agent.wait_synced(wait)
        return self.agents

    def _check_node(self, i: int) -> None:
        if i not in self.nodes:
            raise ValueError(f"cluster {self.name}: no node {i!r}; nodes are 1-{len(self.nodes)}")
