"""Turns bench results into one Markdown report (tables of medians, spreads and ratios to
the same run's baseline, plus where we stand against the targets) and a PNG plot."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from bench import north_south, sources
from bench.stats import Series, fmt_rate, fmt_ratio, fmt_seconds, fmt_us, ratio

TARGET_NAMES = {"pod": "backend pod (no proxy)", "first": "first service",
                "last": "last service", "non-service": "non-service address"}


def _get(results, size, kind, target, mode, metric) -> Series:
    return results.figures.get((size, kind, target, mode), {}).get(metric, Series())


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def connection_tables(results) -> list[str]:
    out = ["## Connection cost vs cluster size", "",
           "TCP_CRR: connect, 1-byte request and answer, close, one client thread pinned "
           "with the servers on one CPU. UDP_RR: 1-byte request/response on one socket. "
           "Ratios are to **direct** (the client connects to the backend pod itself) "
           "measured in the same run. ⚠ marks a spread (max-min)/median above 10 %.", ""]
    for size in results.plan.sizes:
        direct_tcp = _get(results, size, "direct", "pod", "tcp_crr", "rate").median
        direct_udp = _get(results, size, "direct", "pod", "udp_rr", "rate").median
        out += [f"### {size:,} service{'s' if size != 1 else ''} (3 endpoints each)", "",
                "| contestant | target | TCP_CRR /s | vs direct | p50 µs | p99 µs "
                "| UDP_RR /s | vs direct | errors |",
                "|---|---|---|---|---|---|---|---|---|"]
        for kind in ("direct", "bpfproxy", "iptables", "nftables"):
            if (size, kind) in results.skipped:
                out.append(f"| {kind} | - | {results.skipped[size, kind]} | | | | | | |")
                continue
            for target in ("pod", "first", "last", "non-service"):
                tcp = _get(results, size, kind, target, "tcp_crr", "rate")
                if tcp.median is None:
                    continue
                udp = _get(results, size, kind, target, "udp_rr", "rate")
                errors = sum(sum(_get(results, size, kind, target, m, "errors").values)
                             for m in ("tcp_crr", "udp_rr"))
                out.append(
                    f"| {kind} | {TARGET_NAMES[target]} | {fmt_rate(tcp)} | "
                    f"{fmt_ratio(ratio(tcp.median, direct_tcp))} | "
                    f"{fmt_us(_get(results, size, kind, target, 'tcp_crr', 'p50_us'))} | "
                    f"{fmt_us(_get(results, size, kind, target, 'tcp_crr', 'p99_us'))} | "
                    f"{fmt_rate(udp)} | {fmt_ratio(ratio(udp.median, direct_udp))} | "
                    f"{errors:,.0f} |")
        out.append("")
    return out


def throughput_table(results) -> list[str]:
    out = ["## Steady-state throughput (bulk TCP on one established connection)", "",
           "| services | direct | bpfproxy | iptables | nftables |", "|---|---|---|---|---|"]
    for size in results.plan.sizes:
        base = _get(results, size, "direct", "pod", "tcp_stream", "bits_per_second").median
        cells = []
        for kind in ("direct", "bpfproxy", "iptables", "nftables"):
            target = "pod" if kind == "direct" else "first"
            s = _get(results, size, kind, target, "tcp_stream", "bits_per_second")
            cells.append("-" if s.median is None else
                         f"{s.median / 1e9:.1f} Gbit/s ({fmt_ratio(ratio(s.median, base))})"
                         + (" ⚠" if s.noisy else ""))
        out.append(f"| {size:,} | " + " | ".join(cells) + " |")
    return out + [""]


def program_table(results) -> list[str]:
    out = ["## Programming the traffic workload and memory", "",
           "Time from publishing the manifest (bpfproxy) or starting the rule load "
           "(iptables-restore, nft -f) to the state being in the kernel; agent RSS and the "
           "memory of the BPF maps it holds (from fdinfo).", "",
           "| services | bpfproxy | iptables-restore | nft -f | agent RSS | BPF maps |",
           "|---|---|---|---|---|---|"]
    for size in results.plan.sizes:
        rss, maps = results.memory.get(size, (None, None))
        out.append(f"| {size:,} | {fmt_seconds(results.load_seconds.get((size, 'bpfproxy')))} | "
                   f"{fmt_seconds(results.load_seconds.get((size, 'iptables')))} | "
                   f"{fmt_seconds(results.load_seconds.get((size, 'nftables')))} | "
                   f"{_mib(rss)} | {_mib(maps)} |")
    return out + [""]


def control_tables(results) -> list[str]:
    control = results.control
    if not control:
        return []
    out = ["## Control plane", "",
           "Full sync: an agent with nothing to serve is given N services x 10 endpoints in "
           "one manifest (published with one rename). *file -> kernel* includes noticing the "
           "file and parsing it; *event -> kernel* starts when the source delivers the "
           "change. The same state loaded with iptables-restore and nft -f for comparison.", "",
           "| services x 10 | file -> kernel | event -> kernel | iptables-restore | nft -f "
           "| vs nft | agent RSS | BPF maps |", "|---|---|---|---|---|---|---|---|"]
    for row in control["full_syncs"]:
        nft = row.get("nftables_s")
        ipt = fmt_seconds(row.get("iptables_s")) if "iptables_skipped" not in row else \
            f"not run ({row['iptables_skipped']})"
        nft_cell = fmt_seconds(nft) if "nftables_skipped" not in row else \
            f"not run ({row['nftables_skipped']})"
        out.append(f"| {row['services']:,} | {fmt_seconds(row['file_to_kernel_s'])} | "
                   f"{fmt_seconds(row['event_to_kernel_s'])} | {ipt} | {nft_cell} | "
                   f"{fmt_ratio(ratio(nft, row['file_to_kernel_s']))} faster | "
                   f"{_mib(row['agent_rss'])} | {_mib(row['map_bytes'])} |")
    ch = control["endpoint_changes"]
    out += ["", f"Single endpoint change ({ch['changes']} changes, one service of "
            f"{ch['services']:,} gains or loses an endpoint in its own manifest file):", "",
            "| measure | p50 | p99 / max |", "|---|---|---|",
            f"| source event -> kernel | {fmt_seconds(ch['event_to_kernel_p50_s'])} | "
            f"{fmt_seconds(ch['event_to_kernel_p99_s'])} |",
            f"| file written -> kernel | {fmt_seconds(ch['file_to_kernel_p50_s'])} | "
            f"{fmt_seconds(ch['file_to_kernel_p99_s'])} |",
            f"| file written -> new connections reach the new backend "
            f"({ch['reach_samples']}/{ch['reach_attempts']}) | {fmt_seconds(ch['reach_p50_s'])} | "
            f"{fmt_seconds(ch['reach_max_s'])} (max) |", ""]
    return out


def targets_table(results) -> list[str]:
    sizes = results.plan.sizes
    big, mid = max(sizes), (10000 if 10000 in sizes else max(s for s in sizes if s > 1)
                            if len(sizes) > 1 else sizes[0])

    def rate(size, kind, target):
        return _get(results, size, kind, target, "tcp_crr", "rate").median

    rows = [("bpfproxy rate at the largest size vs direct", ">= 0.98x",
             fmt_ratio(ratio(rate(big, "bpfproxy", "last"), rate(big, "direct", "pod")))),
            ("bpfproxy at the largest size vs itself at 1 service", ">= 0.98x",
             fmt_ratio(ratio(rate(big, "bpfproxy", "last"), rate(1, "bpfproxy", "last")))
             if 1 in sizes else "-"),
            (f"bpfproxy vs nftables at {mid:,} (last service)", ">= 1.2x",
             fmt_ratio(ratio(rate(mid, "bpfproxy", "last"), rate(mid, "nftables", "last")))),
            (f"bpfproxy vs iptables at {mid:,} (last service)", ">= 3x",
             fmt_ratio(ratio(rate(mid, "bpfproxy", "last"), rate(mid, "iptables", "last"))))]
    control = results.control
    if control:
        by = {r["services"]: r for r in control["full_syncs"]}
        row = by.get(10000) or by[max(by)]
        rows += [(f"full sync {row['services']:,} x 10 (file -> kernel)", "<= 0.5 s",
                  fmt_seconds(row["file_to_kernel_s"])),
                 (f"full sync {row['services']:,} x 10 vs nft -f", ">= 25x faster",
                  fmt_ratio(ratio(row.get("nftables_s"), row["file_to_kernel_s"]))),
                 ("single endpoint change, event -> kernel p99", "<= 5 ms",
                  fmt_seconds(control["endpoint_changes"]["event_to_kernel_p99_s"])),
                 ("new connections reach a new backend (max)", "<= 50 ms",
                  fmt_seconds(control["endpoint_changes"]["reach_max_s"])),
                 (f"agent RSS at {row['services']:,} x 10", "<= 150 MiB",
                  _mib(row["agent_rss"]))]
    out = ["## Where we stand against the targets", "", "| target | goal | measured |",
           "|---|---|---|"]
    out += [f"| {name} | {goal} | {value} |" for name, goal, value in rows]
    return out + [""]


def markdown(results) -> str:
    plan = results.plan
    drift_start = results.drift.get("start", Series())
    drift_end = results.drift.get("end", Series())
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(results.started))
    head = [f"# bpfproxy benchmark ({when})",
            "",
            f"Machine: {platform.node()}, Linux {platform.release()}, "
            f"{len(os.sched_getaffinity(0))} CPUs. Sizes {plan.sizes}, "
            f"{plan.reps} interleaved reps of {plan.seconds}s per figure; iptables and nftables "
            f"contestants up to {plan.rule_limit:,} services.", "",
            f"Drift of the baseline (direct TCP_CRR): {fmt_rate(drift_start)} at the start, "
            f"{fmt_rate(drift_end)} at the end "
            f"({fmt_ratio(ratio(drift_end.median, drift_start.median))}).", ""]
    if not plan.sizes:          # --only-sources / --only-north-south: no traffic phase
        head = head[:2] + [f"Machine: {platform.node()}, Linux {platform.release()}, "
                           f"{len(os.sched_getaffinity(0))} CPUs. No east-west traffic "
                           f"phase in this run.", ""]
    traffic = (targets_table(results) + connection_tables(results)
               + throughput_table(results) + program_table(results)) if plan.sizes else []
    return "\n".join(head + traffic
                     + control_tables(results) + sources.markdown(results.sources)
                     + north_south.markdown(results.north_south))


def as_json(results) -> dict:
    figures = {"|".join(map(str, key)): {m: s.values for m, s in metrics.items()}
               for key, metrics in results.figures.items()}
    return {"plan": {k: v for k, v in vars(results.plan).items()
                     if k != "north_south"}, "figures": figures,
            "load_seconds": {f"{k[0]}|{k[1]}": v for k, v in results.load_seconds.items()},
            "skipped": {f"{k[0]}|{k[1]}": v for k, v in results.skipped.items()},
            "memory": {str(k): v for k, v in results.memory.items()},
            "drift": {k: s.values for k, s in results.drift.items()},
            "control": results.control,
            "sources": sources.as_json(results.sources) if results.sources else {},
            "north_south": north_south.as_json(results.north_south)}


def plot(results, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sizes = results.plan.sizes
    if not sizes:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for kind, target, style in (("bpfproxy", "last", "-o"), ("bpfproxy", "non-service", ":o"),
                                ("iptables", "last", "-s"), ("iptables", "non-service", ":s"),
                                ("nftables", "last", "-^"), ("nftables", "non-service", ":^")):
        xs, ys = [], []
        for size in sizes:
            base = _get(results, size, "direct", "pod", "tcp_crr", "rate").median
            value = _get(results, size, kind, target, "tcp_crr", "rate").median
            if value and base:
                xs.append(size)
                ys.append(value / base)
        if xs:
            ax.plot(xs, ys, style, label=f"{kind} ({TARGET_NAMES[target]})")
    ax.axhline(1.0, color="grey", linewidth=1, label="direct (no proxy)")
    ax.set_xscale("log")
    ax.set_xlim(0.6, max(sizes) * 1.6)
    ax.set_xlabel("services (3 endpoints each)")
    ax.set_ylabel("TCP connection rate / direct")
    ax.set_title("Connection rate vs cluster size (same-run ratio to no proxy)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
