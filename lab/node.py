"""Lab: one Kubernetes node as a network namespace with a bridge, and dual-stack pods hanging
off it. Nothing links it to the host (no default route, no host interface); all of it goes on
exit."""

from __future__ import annotations

import ipaddress
import re
import subprocess

from lab import cgroups, cleanup, netns
from lab.claimed import Claimed
from lab.pod import Pod, PodHome
from lab.processes import Processes

BRIDGE = "bpfp-br0"
# A fixed bridge MAC: a bridge otherwise takes its lowest port MAC, which changes as pods come
# and go and leaves the pods' cached gateway neighbour entries pointing nowhere.
BRIDGE_MAC = "02:62:70:66:00:01"
SERVICE_CIDR = "10.96.0.0/12"  # kube's default service range; never routed anywhere here
SERVICE_CIDR6 = "fd00:10:96::/112"  # kind's IPv6 service range; never routed anywhere either


class Lab(Claimed):
    """with Lab(name="t1") as lab: pod = lab.add_pod("a"); ...   (name: [a-z0-9], short)"""

    def __init__(
        self, name: str, pod_cidr: str = "10.244.1.0/24", pod_cidr6: str = "fd00:10:244:1::/64"
    ) -> None:
        if not re.fullmatch(r"[a-z0-9]{1,16}", name):
            raise ValueError(f"lab name {name!r}: use 1-16 characters of [a-z0-9] (no dashes)")
        self.name = name
        self.pod_cidr = ipaddress.ip_network(pod_cidr)
        hosts = self.pod_cidr.hosts()
        self.node_ip = str(next(hosts))
        # Dual-stack: a pod's IPv6 address sits at its IPv4 address's offset in the ULA pod
        # prefix (10.244.1.5 -> fd00:10:244:1::5), so a test can tell which pod either names.
        self.pod_cidr6 = ipaddress.IPv6Network(pod_cidr6)
        self.node_ip6 = self.ip6_of(self.node_ip)
        self._free_ips = [str(ip) for ip in hosts]
        self.node_netns = f"{netns.PREFIX}{name}-node"
        self.cgroup = cgroups.cgroup2_mount() / f"{netns.PREFIX}{name}"
        self.pods: dict[str, Pod] = {}
        self.processes = Processes()
        self.workdir = cleanup.workdir(name)  # pod server logs
        self.home = PodHome(name, self.processes, self.workdir)  # what its pods use of it
        self._next_veth = 0

    # -- life cycle (open, close and `with` come from Claimed) ---------------------------

    def _build(self) -> None:
        cleanup.remove_lab(self.name)  # leftovers of a crashed run of the same name
        self.workdir.mkdir()
        cgroups.create(self.cgroup)
        self._make_node()

    def _make_node(self) -> None:
        ns = self.node_netns
        netns.add(ns)
        # No DAD on the node's link-local addresses either: while one is tentative the node
        # cannot solicit neighbours for packets it forwards (pods of another node, lab.cluster).
        netns.sysctl(ns, {"net.ipv6.conf.default.accept_dad": 0})
        # No multicast snooping: IPv6 neighbour discovery then never depends on MLD state.
        netns.ip(
            "link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge", "mcast_snooping", "0",
            netns=ns,
        )  # fmt: skip
        prefix = self.pod_cidr.prefixlen
        netns.ip("addr", "add", f"{self.node_ip}/{prefix}", "dev", BRIDGE, netns=ns)
        # nodad: usable at once, not after a second of duplicate address detection.
        prefix6 = self.pod_cidr6.prefixlen
        netns.ip("-6", "addr", "add", f"{self.node_ip6}/{prefix6}", "dev", BRIDGE, "nodad",
                 netns=ns)  # fmt: skip
        netns.ip("link", "set", BRIDGE, "up", netns=ns)
        # Connects to a service address the agent did not rewrite fail fast (EHOSTUNREACH), not
        # by timeout; pods route everything via the node, so the node's ICMP reaches them. The
        # kernel allows such ICMP per client in a burst of about 5, then 1/s (host-wide
        # net.ipv4.route.error_cost/error_burst, which we leave alone): many more time out.
        netns.ip("route", "add", "unreachable", SERVICE_CIDR, netns=ns)
        netns.ip("-6", "route", "add", "unreachable", SERVICE_CIDR6, netns=ns)
        # icmp_ratelimit=0: otherwise only about one "unreachable" per second gets back.
        forwarding = {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1}
        netns.sysctl(ns, {**forwarding, "net.ipv4.icmp_ratelimit": 0, "net.ipv6.icmp.ratelimit": 0})

    def _teardown_steps(self):
        """Stop processes, delete namespaces and cgroups."""
        return (self.processes.stop_all, lambda: cleanup.remove_lab(self.name), self.pods.clear)

    # -- pods ------------------------------------------------------------------------------

    def ip6_of(self, ip: str) -> str:
        """The IPv6 address that goes with an IPv4 address of the pod CIDR."""
        offset = int(ipaddress.IPv4Address(ip)) - int(self.pod_cidr.network_address)
        return str(self.pod_cidr6.network_address + offset)

    def add_pod(self, name: str) -> Pod:
        """A dual-stack pod: eth0 with the next free address of the pod CIDR and its IPv6
        twin (ip6_of), default routes of both families via the node."""
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name) or name == "node":
            raise ValueError(f"pod name {name!r}: use [a-z0-9-] like Kubernetes, not 'node'")
        if name in self.pods:
            raise ValueError(f"lab {self.name}: pod {name} exists")
        if not self._free_ips:
            raise RuntimeError(f"lab {self.name}: pod CIDR {self.pod_cidr} is full")
        ip = self._free_ips.pop(0)
        self._next_veth += 1
        pod = Pod(
            lab=self.home,
            name=name,
            ip=ip,
            ip6=self.ip6_of(ip),
            netns=f"{netns.PREFIX}{self.name}-{name}",
            cgroup=self.cgroup / name,
            node_veth=f"bpfpv{self._next_veth}",
        )
        self.pods[name] = pod
        try:
            self._wire_pod(pod)
        except BaseException:
            self.remove_pod(pod)
            raise
        return pod

    def _wire_pod(self, pod: Pod) -> None:
        cgroups.create(pod.cgroup)
        netns.add(pod.netns)
        # Both ends are created straight in their namespaces: nothing ever exists on the host.
        netns.ip(
            "link", "add", "eth0", "type", "veth",
            "peer", "name", pod.node_veth, "netns", self.node_netns,
            netns=pod.netns,
        )  # fmt: skip
        netns.ip("link", "set", pod.node_veth, "master", BRIDGE, "up", netns=self.node_netns)
        netns.ip(
            "addr", "add", f"{pod.ip}/{self.pod_cidr.prefixlen}", "dev", "eth0", netns=pod.netns
        )
        netns.ip(
            "-6", "addr", "add", f"{pod.ip6}/{self.pod_cidr6.prefixlen}", "dev", "eth0", "nodad",
            netns=pod.netns,
        )  # fmt: skip
        netns.ip("link", "set", "eth0", "up", netns=pod.netns)
        netns.ip("route", "add", "default", "via", self.node_ip, netns=pod.netns)
        netns.ip("-6", "route", "add", "default", "via", self.node_ip6, netns=pod.netns)

    def remove_pod(self, pod: Pod | str) -> None:
        """Stop the pod's processes, delete its namespace (and veth) and cgroup; free its IP."""
        pod = self.pods[pod] if isinstance(pod, str) else pod
        self.processes.stop_owned_by(pod.name)
        netns.delete(pod.netns)
        cgroups.remove_tree(pod.cgroup, refuge=self.cgroup.parent)
        self.pods.pop(pod.name, None)
        self._free_ips.insert(0, pod.ip)
        self._free_ips.sort(key=ipaddress.ip_address)

    # -- the node --------------------------------------------------------------------------

    def node_popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Start argv in the node namespace (the agent runs this way); stopped on teardown."""
        return self.processes.start(argv, self.node_netns, owner="", **kw)

    def node_run(
        self, argv: list[str], timeout: float = 30.0, check: bool = False
    ) -> subprocess.CompletedProcess:
        """Run argv in the node namespace to completion; stdout and stderr captured as text."""
        return self.processes.run(argv, self.node_netns, None, "", timeout, check)
