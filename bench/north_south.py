"""North-south: an outside client sends to a NodePort and a LoadBalancer address of node 1,
whose backend is on node 1 (local) or node 2 (remote); every contestant forwards on node 1.

One two-node lab cluster per contestant (lab.cluster: nodes on a wire, an outside client),
identical in shape; a contestant is only how node 1 forwards (CONTESTANTS). Figures per
target and rep, interleaved contestant by contestant, reported beside the same run's direct
routing:
  - packet rate: loadgen udp_flood (64 flows of 64-byte frames by sendmmsg) at full speed,
    counted at the backend pod's ingress (an nft netdev counter that drops them there).
    Everything runs on one core (CORE): the sender, and, as veth hands a packet to its peer
    in the sender's own softirq, every hop after it (wire, node 1, node 2, the pod). The
    sender's CPU time (rusage, softirq work included) plus that core's ksoftirqd time, per
    packet delivered, is the path's cost on one core; a contestant's own cost is its
    difference to direct routing's in the same rep. No second CPU: handing packets to one
    (RPS) costs the sending core an IPI whenever the other had drained its queue, and that
    cost, larger the faster node 1 is, swamped the proxies' own (bench/README.md);
  - the bpfproxy programs' own time per packet (run_time_ns of
    node 1's TC and XDP programs, counted while the bench holds BPF_ENABLE_STATS);
  - loss below capacity: the same flood paced at LOSS_FRACTION of the rate just measured;
  - TCP_CRR (rate, p50/p99) and bulk TCP from outside."""
from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import json
import os
import resource
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import loadgen
from bench.stats import Series, fmt_rate, fmt_ratio, ratio
from lab import manifests, netns
from lab.agent_runner import AgentRunner
from lab.cluster import Cluster
from lab.pod import Pod

CORE = 1                         # the sender, the servers, and so every hop's softirq
TCP_PORT, FLOOD_PORT = 8080, 8081   # backend ports: loadgen server / the counting sink
LOSS_FRACTION = 0.5              # the paced flood runs at this share of measured capacity
FLOWS = 64
SINK_TABLE = "bpfpsink"
BACKENDS = {"local": (1, "loc"), "remote": (2, "rem")}           # where -> (node, pod name)
SERVICES = {  # where -> (service name, cluster IP, LB IP, TCP nodePort, UDP nodePort)
    "local": ("ns-local", "10.96.0.10", "192.0.2.10", 30080, 30053),
    "remote": ("ns-remote", "10.96.0.11", "192.0.2.11", 30081, 30054)}
SERVICE_PORTS = {"tcp": 80, "udp": 53}
NODE1 = 1


# --- contestants: how node 1 forwards ---------------------------------------------------

@dataclass(frozen=True)
class Contestant:
    """name: column in the report. setup(bed) makes node 1 forward for it; None = not built
    yet (the row says so). via_service: False for direct routing (the client sends to the
    pod's own address, node 1 only routes)."""
    name: str
    what: str
    setup: Callable[[NsBed], None] | None
    via_service: bool = True
    not_built: str = ""


def _setup_direct(bed: NsBed) -> None:
    # The outside world routes pod CIDRs via node 1 (node 1 routes node 2's via node 2).
    for i in (1, 2):
        netns.ip("route", "replace", str(bed.cluster.nodes[i].pod_cidr), "via",
                 bed.cluster.node_ip(NODE1), netns=bed.cluster.external_netns)


def _setup_rules(kind: str) -> Callable[[NsBed], None]:
    def setup(bed: NsBed) -> None:
        from bench.kubeproxy import load as kp_load
        from bench.kubeproxy import render_rules
        node = bed.cluster.nodes[NODE1]
        kp_load.LOAD[kind](render_rules(kind, bed.desired(), bed.cluster.node_ip(NODE1)),
                           node.node_netns)
    return setup


def _setup_bpfproxy_tc(bed: NsBed) -> None:
    node = bed.cluster.nodes[NODE1]
    args = ("--node-ip", bed.cluster.node_ip(NODE1), "--interfaces", bed.cluster.uplink(NODE1))
    bed.agent = AgentRunner(node, bed.manifests, extra_args=args, node_name="node1")
    bed.agent.start()


def _setup_bpfproxy_xdp(bed: NsBed) -> None:
    """The TC contestant with the XDP program in front (the remote backend's flows are
    forwarded there). The lab's veths need what real NICs do not (an XDP program on the
    wire's port, senders that finish their checksums): Cluster.prepare_for_xdp."""
    bed.cluster.prepare_for_xdp()
    node = bed.cluster.nodes[NODE1]
    args = ("--node-ip", bed.cluster.node_ip(NODE1), "--interfaces", bed.cluster.uplink(NODE1),
            "--acceleration", "native")
    bed.agent = AgentRunner(node, bed.manifests, extra_args=args, node_name="node1")
    bed.agent.start()


def _setup_bpfproxy_dsr(bed: NsBed) -> None:
    """Direct server return: node 1 forwards the request to node 2 with the service address
    in an IP option, node 2's agent delivers it to the pod and sends the answer straight to
    the client from the service address, so every node runs the agent."""
    for i in (NODE1, 2):
        args = ("--node-ip", bed.cluster.node_ip(i), "--interfaces", bed.cluster.uplink(i),
                "--nodeport-mode", "dsr")
        runner = AgentRunner(bed.cluster.nodes[i], bed.manifests, extra_args=args,
                             node_name=f"node{i}")
        if i == NODE1:
            bed.agent = runner
        else:
            bed.others.append(runner)
        runner.start()


CONTESTANTS: tuple[Contestant, ...] = (
    Contestant("direct", "routing to the pod's own address (no NAT): the limit",
               _setup_direct, via_service=False),
    Contestant("iptables", "kube-proxy's iptables layout (KUBE-NODEPORTS, KUBE-EXT, DNAT, "
               "MASQUERADE; legacy x_tables)", _setup_rules("iptables")),
    Contestant("nftables", "kube-proxy's nftables layout (service-nodeports, external-, "
               "masquerade)", _setup_rules("nftables")),
    Contestant("bpfproxy-tc", "bpfproxy's TC NodePort programs", _setup_bpfproxy_tc),
    Contestant("bpfproxy-xdp", "bpfproxy with --acceleration native: XDP forwards the "
               "remote backend's flows, the TC programs the rest", _setup_bpfproxy_xdp),
    Contestant("bpfproxy-dsr", "bpfproxy with --nodeport-mode dsr on both nodes (TC "
               "programs): node 2 delivers and answers the client itself",
               _setup_bpfproxy_dsr),
)
BY_NAME = {c.name: c for c in CONTESTANTS}


# --- one cluster per contestant -----------------------------------------------------------

@dataclass
class NsBed:
    contestant: Contestant
    cluster: Cluster
    pods: dict[str, Pod]                     # "local"/"remote" -> the backend pod
    manifests: Path
    loadgen: Path
    agent: AgentRunner | None = None           # node 1's
    others: list[AgentRunner] = field(default_factory=list)   # other nodes' agents

    def desired(self):
        """The model's desired state for node 1, from the manifests (as kube-proxy sees it)."""
        import yaml

        from agent.model import desired_state
        from agent.model.objects import parse_endpoint_slice, parse_service
        from agent.model.types import NodeContext
        docs = [d for f in sorted(self.manifests.glob("*.yaml"))
                for d in yaml.safe_load_all(f.read_text()) if d]
        services = [parse_service(d) for d in docs if d["kind"] == "Service"]
        slices = [parse_endpoint_slice(d) for d in docs if d["kind"] == "EndpointSlice"]
        node = NodeContext("node1", (ipaddress.ip_address(self.cluster.node_ip(NODE1)),))
        return desired_state(services, slices, node)

    def address(self, where: str, frontend: str, protocol: str) -> tuple[str, int]:
        """Where the outside client sends for (backend location, frontend kind, protocol)."""
        pod = self.pods[where]
        if not self.contestant.via_service:
            return pod.ip, TCP_PORT if protocol == "tcp" else FLOOD_PORT
        _, _, lb_ip, tcp_np, udp_np = SERVICES[where]
        if frontend == "lb":
            return lb_ip, SERVICE_PORTS[protocol]
        return self.cluster.node_ip(NODE1), tcp_np if protocol == "tcp" else udp_np

    def client(self, argv: list[str], seconds: float) -> dict:
        done = self.cluster.external.run(["taskset", "-c", str(CORE), str(self.loadgen),
                                          *argv], timeout=seconds + 30, check=True)
        return loadgen.parse_result(done.stdout)

    def sink_count(self, where: str) -> int:
        done = self.pods[where].run(["nft", "-j", "list", "table", "netdev", SINK_TABLE],
                                    check=True)
        for item in json.loads(done.stdout)["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    return expr["counter"]["packets"]
        raise RuntimeError(f"{self.pods[where].name}: no counter in the sink table")

    def close(self) -> None:
        for agent in (self.agent, *self.others):
            if agent is not None:
                agent.close()
        self.cluster.close()


def _write_manifests(directory: Path, pods: dict[str, Pod]) -> None:
    for where, (name, cluster_ip, lb_ip, tcp_np, udp_np) in SERVICES.items():
        pod = pods[where]
        ports = [{"name": "tcp", "port": SERVICE_PORTS["tcp"], "targetPort": TCP_PORT,
                  "nodePort": tcp_np, "protocol": "TCP"},
                 {"name": "udp", "port": SERVICE_PORTS["udp"], "targetPort": FLOOD_PORT,
                  "nodePort": udp_np, "protocol": "UDP"}]
        node = f"node{BACKENDS[where][0]}"
        manifests.write(directory, f"{name}.yaml",
                        manifests.service(name, cluster_ip, ports, service_type="LoadBalancer",
                                          load_balancer_ingress=[lb_ip]),
                        manifests.endpoint_slice(
                            name, [pod.ip], [{"name": "tcp", "port": TCP_PORT, "protocol": "TCP"},
                                             {"name": "udp", "port": FLOOD_PORT,
                                              "protocol": "UDP"}], nodes={pod.ip: node}))


def _in_netns(namespace: str, argv: list[str], stdin: str | None = None) -> None:
    if not namespace.startswith(netns.PREFIX):
        raise ValueError(f"netns {namespace!r}: only bench namespaces")
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{namespace}: {' '.join(argv)}: {done.stderr.strip()}")


def _start_sink(pod: Pod) -> None:
    """An nft netdev ingress counter that drops the flood at the pod's door: what node 1
    delivered is counted, and the pod spends nothing more on it (no socket, no ICMP)."""
    rules = (f"table netdev {SINK_TABLE} {{\n chain ingress {{\n  type filter hook ingress "
             f'device "eth0" priority 0;\n  udp dport {FLOOD_PORT} counter drop\n }}\n}}\n')
    _in_netns(pod.netns, [netns.nsenter(), f"--net={netns.path(pod.netns)}", "nft", "-f", "-"],
              stdin=rules)


def _start_server(pod: Pod, binary: Path) -> None:
    server = pod.popen(["taskset", "-c", str(CORE), str(binary), "server", "--port",
                        str(TCP_PORT), "--threads", "1"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    if not loadgen.wait_ready(server, timeout=10):
        raise RuntimeError(f"loadgen server in {pod.name} did not start")


def build(contestant: Contestant, binary: Path, index: int) -> NsBed:
    cluster = Cluster(f"bns{index}{contestant.name[:4].replace('-', '')}")
    cluster.open()
    try:
        pods = {where: cluster.add_pod(node, name) for where, (node, name) in BACKENDS.items()}
        for pod in pods.values():
            _start_server(pod, binary)
            _start_sink(pod)
        netns.ip("route", "replace", "192.0.2.0/24", "via", cluster.node_ip(NODE1),
                 netns=cluster.external_netns)      # the load balancer sends to node 1
        if Path("/proc/sys/net/bridge").is_dir():   # br_netfilter loaded (by anyone)
            # the wire is the network outside the nodes, a switch: no iptables on its
            # frames (br_nf_* and their hooks: 1.3 µs per packet of direct routing in perf)
            netns.sysctl(cluster.wire_netns, {f"net.bridge.bridge-nf-call-{t}": 0
                                              for t in ("iptables", "ip6tables", "arptables")})
        directory = cluster.workdir / "manifests"
        directory.mkdir()
        _write_manifests(directory, pods)
        bed = NsBed(contestant, cluster, pods, directory, binary)
        contestant.setup(bed)
        return bed
    except BaseException:
        cluster.close()
        raise


# --- measuring ----------------------------------------------------------------------------

@dataclass
class Plan:
    reps: int
    seconds: float
    frontends: tuple[str, ...]          # "nodeport", "lb"
    contestants: tuple[str, ...] = tuple(c.name for c in CONTESTANTS)

    @classmethod
    def full(cls) -> Plan:
        return cls(reps=3, seconds=1.0, frontends=("nodeport", "lb"))

    @classmethod
    def quick(cls) -> Plan:
        return cls(reps=2, seconds=0.5, frontends=("nodeport",))


@dataclass
class NorthSouth:
    plan: Plan
    # (contestant, where, frontend) -> metric -> Series; direct's frontend is "pod"
    figures: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(Series)))
    errors: dict = field(default_factory=lambda: defaultdict(int))
    # (contestant, where, frontend) -> "phase error" (flood/paced/crr/bulk, loadgen's errno
    # name: ETIMEDOUT, ECONNRESET, EOF...) -> count: what went wrong, not only how often
    error_kinds: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    seconds: float = 0.0


def _children_cpu() -> float:
    """User + system seconds of this process's finished children (the sender, once run)."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _ksoftirqd_cpu(cpu: int) -> float:
    """Seconds ksoftirqd/cpu has run: softirq work the kernel deferred from the sender."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == f"ksoftirqd/{cpu}":
                return int((comm.parent / "schedstat").read_text().split()[0]) / 1e9
        except OSError:
            continue
    return 0.0


def _enable_bpf_stats() -> int:
    """BPF_ENABLE_STATS (libbpf's bpf_enable_stats, BPF_STATS_RUN_TIME): the kernel counts
    each program's run time while the returned fd is open; other holders (and the sysctl
    kernel.bpf_stats_enabled) are not disturbed."""
    libbpf = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
    fd = libbpf.bpf_enable_stats(0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "bpf_enable_stats")
    return fd


def _program_ids(bed: NsBed) -> list[int]:
    """Node 1's bpfproxy programs on its interface (TC and XDP), by their pinned links."""
    links = bed.agent.bpffs / "links" if bed.agent else None
    ids = []
    for link in sorted(links.glob("*-*")) if links and links.is_dir() else ():
        if link.name.startswith(("tc-", "xdp-")):
            shown = subprocess.run(["bpftool", "-j", "link", "show", "pinned", str(link)],
                                   capture_output=True, text=True, timeout=10, check=True)
            ids.append(json.loads(shown.stdout)["prog_id"])
    return ids


def _program_ns(ids: list[int]) -> int:
    """Sum of run_time_ns of these programs (counted while _enable_bpf_stats holds)."""
    total = 0
    for prog_id in ids:
        shown = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)],
                               capture_output=True, text=True, timeout=10, check=True)
        total += json.loads(shown.stdout).get("run_time_ns", 0)
    return total


def _settled_count(bed: NsBed, where: str, before: int) -> int:
    """The sink's count once packets in flight have landed (two equal reads 20 ms apart)."""
    last = bed.sink_count(where)
    for _ in range(100):
        time.sleep(0.02)
        now = bed.sink_count(where)
        if now == last:
            break
        last = now
    return last - before


def flood(bed: NsBed, where: str, frontend: str, seconds: float, rate: float = 0.0) -> dict:
    addr, port = bed.address(where, frontend, "udp")
    before = bed.sink_count(where)
    programs = _program_ids(bed)
    ns0 = _program_ns(programs)
    cpu0 = _children_cpu() + _ksoftirqd_cpu(CORE)
    sent = bed.client(["udp_flood", "--addr", addr, "--port", str(port), "--duration",
                       str(seconds), "--flows", str(FLOWS), "--rate", str(rate)], seconds)
    cpu = _children_cpu() + _ksoftirqd_cpu(CORE) - cpu0
    received = _settled_count(bed, where, before)
    return {"sent": sent["packets"], "received": received, "seconds": sent["seconds"],
            "pps": received / sent["seconds"], "cpu_s": cpu,
            "program_ns": _program_ns(programs) - ns0 if programs else None,
            "errors": sent["errors"]}


def measure_target(bed: NsBed, where: str, frontend: str, plan: Plan, out: NorthSouth) -> None:
    key = (bed.contestant.name, where, frontend)
    figures = out.figures[key]
    full = flood(bed, where, frontend, plan.seconds)
    figures["pps"].add(full["pps"])
    if full["received"]:
        figures["core_us_per_pkt"].add(1e6 * full["cpu_s"] / full["received"])
        if full["program_ns"] is not None:
            figures["program_ns_per_pkt"].add(full["program_ns"] / full["received"])
    paced = flood(bed, where, frontend, plan.seconds, rate=LOSS_FRACTION * full["pps"])
    figures["paced_sent"].add(paced["sent"])
    figures["paced_lost"].add(paced["sent"] - paced["received"])
    figures["paced_pps"].add(paced["pps"])
    addr, port = bed.address(where, frontend, "tcp")
    common = ["--addr", addr, "--port", str(port), "--duration", str(plan.seconds),
              "--warmup", "0.2"]
    crr = bed.client(["tcp_crr", *common], plan.seconds)
    figures["crr"].add(crr["rate"])
    figures["crr_p50_us"].add(crr["p50_us"])
    figures["crr_p99_us"].add(crr["p99_us"])
    stream = bed.client(["tcp_stream", *common], plan.seconds)
    figures["bits_per_second"].add(stream["bits_per_second"])
    figures["bulk_retransmits"].add(stream["retransmits"])   # a STALLED bulk: lost or idle
    out.errors[key] += 0                  # a row without errors says 0
    for phase, result in (("flood", full), ("paced", paced), ("crr", crr), ("bulk", stream)):
        for kind, n in result["errors"].items():
            out.errors[key] += n
            out.error_kinds[key][f"{phase} {kind}"] += n


def measure(binary: Path, plan: Plan, say) -> NorthSouth:
    out = NorthSouth(plan)
    start = time.monotonic()
    playing = [BY_NAME[n] for n in plan.contestants if BY_NAME[n].setup is not None]
    beds: dict[str, NsBed] = {}
    stats = _enable_bpf_stats()          # the programs' run_time_ns while this runs
    try:
        for i, contestant in enumerate(playing):
            beds[contestant.name] = build(contestant, binary, i)
        say(f"north-south: {', '.join(beds)} built; {plan.reps} reps of {plan.seconds}s, "
            f"frontends {', '.join(plan.frontends)}")
        for rep in range(plan.reps):
            for where in BACKENDS:
                for frontend in plan.frontends:
                    for contestant in playing:            # A B C D, A B C D, ...
                        if contestant.via_service:
                            measure_target(beds[contestant.name], where, frontend, plan, out)
                        elif frontend == plan.frontends[0]:   # direct: once per backend
                            measure_target(beds[contestant.name], where, "pod", plan, out)
            say(f"  north-south rep {rep + 1}/{plan.reps} done")
    finally:
        os.close(stats)
        for bed in beds.values():
            bed.close()
    out.seconds = time.monotonic() - start
    return out


# --- the report ---------------------------------------------------------------------------

FRONTEND_NAMES = {"pod": "pod address", "nodeport": "NodePort", "lb": "LoadBalancer IP"}
TC_COST_SHARE = 1 / 3            # target: TC's own cost per packet <= this share of iptables'
XDP_REMOTE_GAIN = 1.5            # target (18.2): XDP forwards >= this x kernel routing, remote


def _paired_costs(out: NorthSouth, name: str, where: str, frontend: str, metric: str,
                  inverse: bool) -> Series:
    """Per rep, the contestant's µs per packet minus direct routing's in the same rep."""
    mine = out.figures.get((name, where, frontend), {}).get(metric, Series()).values
    base = out.figures.get(("direct", where, "pod"), {}).get(metric, Series()).values
    costs = Series()
    for value, direct in zip(mine, base, strict=False):
        if inverse:
            if value and direct:
                costs.add(1e6 / value - 1e6 / direct)
        else:
            costs.add(value - direct)
    return costs


def _us(s: Series) -> str:
    if s.median is None:
        return "-"
    return f"{s.median:+.2f} [{min(s.values):+.2f}, {max(s.values):+.2f}]"


def _get(out: NorthSouth, name: str, where: str, frontend: str, metric: str) -> Series:
    return out.figures.get((name, where, frontend), {}).get(metric, Series())


def _rows(out: NorthSouth):
    """(contestant, where, frontend) in report order; unbuilt contestants once, marked."""
    for contestant in CONTESTANTS:
        if contestant.name not in out.plan.contestants:
            continue
        if contestant.setup is None:
            yield contestant, None, None
            continue
        frontends = out.plan.frontends if contestant.via_service else ("pod",)
        for where in BACKENDS:
            for frontend in frontends:
                yield contestant, where, frontend


def _errors_cell(out: NorthSouth, key: tuple[str, str, str]) -> str:
    """The count, and what they were when any: "2 (crr ETIMEDOUT 1, bulk ECONNRESET 1)"."""
    total = out.errors.get(key, 0)
    kinds = out.error_kinds.get(key, {})
    if not total:
        return "0"
    return f"{total:,} ({', '.join(f'{k} {n:,}' for k, n in sorted(kinds.items()))})"


def markdown(out: NorthSouth | None) -> list[str]:
    if out is None:
        return []
    plan = out.plan
    lines = [
        "## North-south: from outside to node 1 (NodePort, LoadBalancer)", "",
        f"An outside client namespace sends to node 1 of a two-node lab; the backend is on "
        f"node 1 (*local*) or node 2 (*remote*). {plan.reps} interleaved reps of "
        f"{plan.seconds}s per figure (median, [min, max] or ±spread); {out.seconds:.0f}s in "
        f"all. Everything runs on CPU {CORE}: the sender, and every hop after it in the "
        "sender's softirq (veth), so a packet's whole path is paid by one core. The machine "
        "is shared (2 CPUs, other engineers' tests): rates are noisy, the CPU time per packet "
        "much less so; compare within a run. *direct* sends to the "
        "pod's own address through node 1 (plain routing; the remote pod answers straight "
        "from node 2), the limit.", "",
        f"### Packet rate (UDP, {FLOWS} flows, 64-byte frames, sendmmsg)", "",
        "*received pps*: counted at the backend pod's ingress, sender at full speed. *core "
        "µs/pkt*: the sender's CPU time (rusage: its softirqs, i.e. every hop, included) plus "
        f"ksoftirqd/{CORE}'s, per packet delivered: the whole path on one core. *own cost*: µs "
        "per packet over direct routing, paired per rep, from that CPU time and end to end "
        "(1/pps). *programs ns/pkt*: node 1's bpfproxy programs (TC and XDP) by "
        "BPF_ENABLE_STATS (run_time_ns; includes the ~70 ns the statistics add per "
        "run on this VM). *lost at "
        f"{LOSS_FRACTION:.0%}*: packets sent but not received when paced at "
        f"{LOSS_FRACTION:.0%} of the rate just measured.", "",
        "| contestant | backend | frontend | received pps | vs direct | core µs/pkt "
        "| own cost, core µs | own cost, end to end µs | programs ns/pkt | lost at "
        f"{LOSS_FRACTION:.0%} (of sent) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for contestant, where, frontend in _rows(out):
        if where is None:
            lines.append(f"| {contestant.name} | - | - | {contestant.not_built} | | | | | | |")
            continue
        pps = _get(out, contestant.name, where, frontend, "pps")
        programs = _get(out, contestant.name, where, frontend, "program_ns_per_pkt")
        base = _get(out, "direct", where, "pod", "pps").median
        core = _get(out, contestant.name, where, frontend, "core_us_per_pkt")
        direct = contestant.name == "direct"
        lost = sum(_get(out, contestant.name, where, frontend, "paced_lost").values)
        sent = sum(_get(out, contestant.name, where, frontend, "paced_sent").values)
        lines.append(
            f"| {contestant.name} | {where} | {FRONTEND_NAMES[frontend]} | {fmt_rate(pps)} | "
            f"{fmt_ratio(ratio(pps.median, base))} | "
            f"{'-' if core.median is None else f'{core.median:.2f}'} | "
            f"{'-' if direct else _us(_paired_costs(out, contestant.name, where, frontend, 'core_us_per_pkt', False))} | "  # noqa: E501
            f"{'-' if direct else _us(_paired_costs(out, contestant.name, where, frontend, 'pps', True))} | "  # noqa: E501
            f"{'-' if programs.median is None else f'{programs.median:,.0f}'} | "
            f"{lost:,.0f} of {sent:,.0f} |")
    lines += ["", "### Connections and bulk throughput from outside", "",
              "TCP_CRR: connect, 1-byte request and answer, close, one client thread. Bulk: "
              "one TCP connection writing 64 KiB at a time.", "",
              "| contestant | backend | frontend | TCP_CRR /s | vs direct | p50 µs | p99 µs "
              "| bulk Gbit/s | vs direct | errors |", "|---|---|---|---|---|---|---|---|---|---|"]
    for contestant, where, frontend in _rows(out):
        if where is None:
            lines.append(f"| {contestant.name} | - | - | {contestant.not_built} "
                         "| | | | | | |")
            continue
        crr = _get(out, contestant.name, where, frontend, "crr")
        bulk = _get(out, contestant.name, where, frontend, "bits_per_second")
        base_crr = _get(out, "direct", where, "pod", "crr").median
        base_bulk = _get(out, "direct", where, "pod", "bits_per_second").median
        p50 = _get(out, contestant.name, where, frontend, "crr_p50_us").median
        p99 = _get(out, contestant.name, where, frontend, "crr_p99_us").median
        bulk_cell = "-" if bulk.median is None else \
            f"{bulk.median / 1e9:.2f} ±{100 * (bulk.spread or 0):.0f}%"
        lines.append(
            f"| {contestant.name} | {where} | {FRONTEND_NAMES[frontend]} | {fmt_rate(crr)} | "
            f"{fmt_ratio(ratio(crr.median, base_crr))} | "
            f"{'-' if p50 is None else f'{p50:,.0f}'} | {'-' if p99 is None else f'{p99:,.0f}'} "
            f"| {bulk_cell} | {fmt_ratio(ratio(bulk.median, base_bulk))} | "
            f"{_errors_cell(out, (contestant.name, where, frontend))} |")
    return lines + [""] + targets_markdown(out)


def target_rows(out: NorthSouth) -> list[tuple[str, str, str, bool | None]]:
    """(target, goal, measured, met: True/False, None when not measured)."""
    rows = []
    for where in BACKENDS:
        for frontend in out.plan.frontends:
            tc = _paired_costs(out, "bpfproxy-tc", where, frontend, "core_us_per_pkt", False)
            ipt = _paired_costs(out, "iptables", where, frontend, "core_us_per_pkt", False)
            name = (f"TC's own cost per packet <= 1/3 of iptables' ({where} backend, "
                    f"{FRONTEND_NAMES[frontend]})")
            if tc.median is None or ipt.median is None:
                rows.append((name, "<= 0.33x", "not measured", None))
                continue
            share = tc.median / ipt.median if ipt.median > 0 else float("inf")
            met = tc.median <= TC_COST_SHARE * ipt.median
            rows.append((name, "<= 0.33x", f"{tc.median:+.2f} vs {ipt.median:+.2f} µs "
                         f"({share:.2f}x)", met))
    for frontend in out.plan.frontends:
        name = (f"XDP forwards >= {XDP_REMOTE_GAIN}x the packets/s of kernel routing "
                f"(remote backend, {FRONTEND_NAMES[frontend]})")
        # packets/s one core carries = 1 / its CPU time per packet, paired per rep
        xdp = _get(out, "bpfproxy-xdp", "remote", frontend, "core_us_per_pkt").values
        direct = _get(out, "direct", "remote", "pod", "core_us_per_pkt").values
        gains = Series()
        for mine, base in zip(xdp, direct, strict=False):
            if mine and base:
                gains.add(base / mine)
        if gains.median is None:
            rows.append((name, f">= {XDP_REMOTE_GAIN}x", "not measured", None))
            continue
        rows.append((name, f">= {XDP_REMOTE_GAIN}x", f"{1e6 / Series(xdp).median:,.0f} vs "
                     f"{1e6 / Series(direct).median:,.0f} pkt/s per core ({gains.median:.2f}x"
                     f" [{min(gains.values):.2f}, {max(gains.values):.2f}])",
                     gains.median >= XDP_REMOTE_GAIN))
    for contestant in CONTESTANTS:
        if contestant.setup is None or contestant.name not in out.plan.contestants:
            continue
        lost = sent = 0.0
        for (name, _, _), metrics in out.figures.items():
            if name == contestant.name:
                lost += sum(metrics["paced_lost"].values)
                sent += sum(metrics["paced_sent"].values)
        if not sent:
            continue
        rows.append((f"{contestant.name} loses no packet below its capacity (paced at "
                     f"{LOSS_FRACTION:.0%})", "0 lost", f"{lost:,.0f} of {sent:,.0f}",
                     lost == 0))
    return rows


def targets_markdown(out: NorthSouth) -> list[str]:
    lines = ["### North-south targets", "", "| target | goal | measured | met |",
             "|---|---|---|---|"]
    for name, goal, measured, met in target_rows(out):
        verdict = "-" if met is None else ("met" if met else "**not met**")
        lines.append(f"| {name} | {goal} | {measured} | {verdict} |")
    return lines + [""]


def as_json(out: NorthSouth | None) -> dict:
    if out is None:
        return {}
    return {"plan": {"reps": out.plan.reps, "seconds": out.plan.seconds,
                     "frontends": list(out.plan.frontends),
                     "contestants": list(out.plan.contestants)},
            "seconds": out.seconds,
            "figures": {"|".join(key): {m: s.values for m, s in metrics.items()}
                        for key, metrics in out.figures.items()},
            "errors": {"|".join(key): n for key, n in out.errors.items()},
            "error_kinds": {"|".join(key): dict(kinds) for key, kinds in out.error_kinds.items()
                            if kinds},
            "targets": [{"target": n, "goal": g, "measured": m, "met": met}
                        for n, g, m, met in target_rows(out)]}
