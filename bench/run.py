"""`make bench` / `make bench-quick`: bpfproxy vs kube-proxy's iptables and nftables layouts
vs no proxy, on real network-namespace pods, interleaved rep by rep; writes bench/results/.
East-west (pods to services) first, then north-south (bench/north_south.py: from outside
through node 1 of a two-node lab).

Every figure is reported as a ratio to a baseline measured in the same run."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from bench import control_plane, loadgen, north_south, report, sources, topology, workload
from bench.kubeproxy import load as kp_load
from bench.kubeproxy import render_rules
from bench.stats import Series

RESULTS = Path(__file__).resolve().parent / "results"
CONTESTANTS = ("direct", "bpfproxy", "iptables", "nftables")


@dataclass
class Plan:
    sizes: list[int]
    reps: int
    seconds: float
    rule_limit: int                  # iptables/nftables contestants up to this many services
    cp_sizes: list[int]              # control plane: full sync sizes (x10 endpoints)
    cp_change_size: int              # services present during the single-endpoint changes
    cp_changes: int
    cp_reach: int
    # control plane from both sources (bench/sources.py): (services, endpoints) sizes
    src_sizes: list[tuple[int, int]] = field(default_factory=list)
    src_reps: int = 2
    src_changes: int = 6
    sources: tuple[str, ...] = sources.SOURCES
    north_south: north_south.Plan | None = None     # None: not measured

    @classmethod
    def full(cls) -> Plan:
        return cls([1, 1000, 10000, 50000, 100000], reps=4, seconds=0.8, rule_limit=10000,
                   cp_sizes=[1000, 10000, 100000], cp_change_size=10000, cp_changes=200,
                   cp_reach=20, src_sizes=[(10000, 10), (50000, 3)], src_reps=2,
                   src_changes=10, north_south=north_south.Plan.full())

    @classmethod
    def quick(cls) -> Plan:
        return cls([1, 1000], reps=3, seconds=0.4, rule_limit=1000, cp_sizes=[1000],
                   cp_change_size=1000, cp_changes=30, cp_reach=5,
                   src_sizes=[(1000, 10)], src_reps=2, src_changes=4,
                   north_south=north_south.Plan.quick())


@dataclass
class Results:
    plan: Plan
    # (size, contestant, target, mode) -> metric -> Series
    figures: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(Series)))
    load_seconds: dict = field(default_factory=dict)     # (size, contestant) -> seconds
    skipped: dict = field(default_factory=dict)          # (size, contestant) -> why
    memory: dict = field(default_factory=dict)           # size -> (rss, map bytes)
    drift: dict = field(default_factory=dict)            # "start"/"end" -> Series
    control: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    north_south: north_south.NorthSouth | None = None
    started: float = field(default_factory=time.time)

    def add(self, key: tuple, result: dict) -> None:
        metrics = self.figures[key]
        if result["mode"] == "tcp_stream":
            metrics["bits_per_second"].add(result["bits_per_second"])
        else:
            metrics["rate"].add(result["rate"])
            metrics["p50_us"].add(result["p50_us"])
            metrics["p99_us"].add(result["p99_us"])
        metrics["errors"].add(sum(result["errors"].values()))


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def targets(bed: topology.Bed, size: int) -> list[tuple[str, str, int, str]]:
    """(target name, address, port, mode) measured for one contestant at one size."""
    pod = bed.backend_ips[0]
    if bed.kind == "direct":
        return [("pod", pod, topology.PORT, "tcp_crr"), ("pod", pod, topology.PORT, "udp_rr"),
                ("pod", pod, topology.PORT, "tcp_stream")]
    first, last = workload.cluster_ip(0), workload.cluster_ip(size - 1)
    return [("first", first, 80, "tcp_crr"), ("first", first, 53, "udp_rr"),
            ("last", last, 80, "tcp_crr"), ("last", last, 53, "udp_rr"),
            ("non-service", pod, topology.PORT, "tcp_crr"),
            ("first", first, 80, "tcp_stream")]


def program(beds: dict[str, topology.Bed], size: int, plan: Plan, results: Results,
            agent: topology.AgentClient) -> list[str]:
    """Give every contestant the same `size` services; returns the contestants in play."""
    traffic = workload.make(size, 3, backend_ips=beds["direct"].backend_ips)
    bpf = beds["bpfproxy"]
    staged = traffic.stage(bpf.manifests)
    start = time.time()
    workload.publish(staged)          # replaces the files of the previous size...
    workload.withdraw(bpf.manifests, keep={final for _, final in staged})   # ...drops the rest
    agent.wait(lambda s: s.service_ports == 2 * size and s.last_sync_unix > start)
    results.load_seconds[size, "bpfproxy"] = agent.status().last_sync_unix - start
    results.memory[size] = topology.agent_memory(bpf.agent.process.pid)
    playing = ["direct", "bpfproxy"]
    desired = traffic.desired()
    for kind in ("iptables", "nftables"):
        netns = beds[kind].lab.node_netns
        kp_load.FLUSH[kind](netns)
        if size > plan.rule_limit:
            results.skipped[size, kind] = f"not loaded above {plan.rule_limit:,} services"
            continue
        results.load_seconds[size, kind] = kp_load.LOAD[kind](
            render_rules(kind, desired, beds[kind].lab.node_ip), netns)
        playing.append(kind)
    return playing


def measure_size(beds, size: int, plan: Plan, results: Results, agent) -> None:
    playing = program(beds, size, plan, results, agent)
    loaded = (f"{k} loaded in {results.load_seconds.get((size, k), 0):.2f}s"
              for k in playing if k != "direct")
    say(f"size {size:,}: " + ", ".join(loaded))
    for rep in range(plan.reps):
        for kind in playing:                       # A B C D, A B C D, ...
            bed = beds[kind]
            for target, addr, port, mode in targets(bed, size):
                result = bed.run_client(mode, addr, port, plan.seconds)
                results.add((size, kind, target, mode), result)
        say(f"  rep {rep + 1}/{plan.reps} done")


def measure_drift(beds, plan: Plan, results: Results, label: str) -> None:
    series = results.drift.setdefault(label, Series())
    for _ in range(plan.reps):
        result = beds["direct"].run_client("tcp_crr", beds["direct"].backend_ips[0],
                                           topology.PORT, plan.seconds)
        series.add(result["rate"])


def measure_east_west(plan: Plan, results: Results, binary, args) -> None:
    """Pods to services on one node per contestant, then the control plane."""
    beds: dict[str, topology.Bed] = {}
    try:
        # the source trials need only the bpfproxy node (its client pod and backends)
        for kind in ("bpfproxy",) if args.only_sources else CONTESTANTS:
            beds[kind] = topology.build(kind, binary, extra_backends=1 if kind == "bpfproxy"
                                        else 0)
        agent = topology.AgentClient(beds["bpfproxy"].agent.api)
        if args.only_sources:
            plan.sizes = []
        else:
            measure_drift(beds, plan, results, "start")
            for size in plan.sizes:
                measure_size(beds, size, plan, results, agent)
            measure_drift(beds, plan, results, "end")
            if not args.no_control_plane:
                results.control = control_plane.measure(beds, plan, agent, say)
        if plan.src_sizes and not args.no_control_plane:
            say(f"control plane from both sources: {plan.src_sizes}, {plan.src_reps} reps")
            results.sources = sources.measure(beds["bpfproxy"], plan.src_sizes, plan.src_reps,
                                              plan.src_changes, plan.sources, say)
        agent.close()
    finally:
        for bed in beds.values():
            bed.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for development")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                        help="override the service counts, e.g. 1,1000")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--seconds", type=float, help="length of one measurement")
    parser.add_argument("--cp-sizes", type=lambda s: [int(x) for x in s.split(",")],
                        help="control plane full-sync sizes")
    parser.add_argument("--cp-changes", type=int, help="single endpoint changes to time")
    parser.add_argument("--cp-reach", type=int, help="changes timed until traffic follows")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-control-plane", action="store_true")
    parser.add_argument("--src-sizes", type=lambda s: [tuple(int(n) for n in x.split("x"))
                                                       for x in s.split(",")],
                        help="control plane from both sources: SERVICESxENDPOINTS[,...]")
    parser.add_argument("--src-reps", type=int, help="interleaved reps of the source trials")
    parser.add_argument("--src-changes", type=int, help="single changes per source trial")
    parser.add_argument("--sources", type=lambda s: tuple(s.split(",")),
                        help=f"of {','.join(sources.SOURCES)}")
    parser.add_argument("--only-sources", action="store_true",
                        help="only the control plane from both sources (no traffic)")
    parser.add_argument("--no-north-south", action="store_true",
                        help="skip the north-south section (traffic from outside)")
    parser.add_argument("--only-north-south", action="store_true",
                        help="only the north-south section")
    parser.add_argument("--ns-reps", type=int, help="north-south interleaved reps")
    parser.add_argument("--ns-seconds", type=float, help="north-south: one measurement's length")
    parser.add_argument("--ns-frontends", type=lambda s: tuple(s.split(",")),
                        help="north-south frontends: nodeport,lb")
    parser.add_argument("--ns-contestants", type=lambda s: tuple(s.split(",")),
                        help="north-south contestants, of "
                             + ",".join(c.name for c in north_south.CONTESTANTS))
    args = parser.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan.full()
    if args.sizes:
        plan.sizes = args.sizes
    for name in ("reps", "seconds", "cp_sizes", "cp_changes", "cp_reach", "src_sizes",
                 "src_reps", "src_changes", "sources"):
        if getattr(args, name):
            setattr(plan, name, getattr(args, name))
    if args.cp_sizes:
        plan.cp_change_size = max(args.cp_sizes)
    if args.no_north_south:
        plan.north_south = None
    elif plan.north_south is not None:
        for name, value in (("reps", args.ns_reps), ("seconds", args.ns_seconds),
                            ("frontends", args.ns_frontends),
                            ("contestants", args.ns_contestants)):
            if value:
                setattr(plan.north_south, name, value)
        if "direct" not in plan.north_south.contestants:   # every ratio is to it
            plan.north_south.contestants = ("direct", *plan.north_south.contestants)
        unknown = set(plan.north_south.contestants) - set(north_south.BY_NAME)
        if unknown:
            parser.error(f"--ns-contestants: unknown {sorted(unknown)}")
    results = Results(plan)
    binary = loadgen.build()
    if args.only_north_south:
        plan.sizes, plan.src_sizes = [], []
    else:
        measure_east_west(plan, results, binary, args)
    if plan.north_south is not None and not args.only_sources:
        results.north_south = north_south.measure(binary, plan.north_south, say)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(results.started))
    name = "quick" if args.quick else "full"
    markdown = report.markdown(results)
    (args.out / f"{name}-latest.md").write_text(markdown)
    (args.out / f"{name}-latest.json").write_text(json.dumps(report.as_json(results), indent=1))
    png = report.plot(results, args.out / f"{name}-latest.png")
    print(markdown)
    say(f"saved {args.out / f'{name}-latest.md'}" + (f" and {png}" if png else "")
        + f" (run {stamp}, {time.time() - results.started:.0f}s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
