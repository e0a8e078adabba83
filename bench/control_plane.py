"""Control-plane figures: full syncs against iptables-restore and nft -f of the same state,
single endpoint changes (source event -> kernel), time until connections follow, memory."""
from __future__ import annotations

import time

from bench import topology, workload
from bench.kubeproxy import load as kp_load
from bench.kubeproxy import render_rules

ENDPOINTS = 10
LOAD_BUDGET_S = 120.0        # longest rule load the bench waits for


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def full_syncs(beds, plan, agent, say) -> list[dict]:
    bpf = beds["bpfproxy"]
    rows = []
    estimates: dict[str, float] = {}
    for size in plan.cp_sizes:
        workload.withdraw(bpf.manifests)
        agent.wait(lambda s: s.service_ports == 0)
        work = workload.make(size, ENDPOINTS)
        # serialized before the clock starts: publishing is only renames, as kubectl
        # apply to a ConfigMap volume would be
        staged = work.stage(bpf.manifests)
        start = time.time()
        workload.publish(staged)
        status = agent.wait(lambda s, n=size, t=start: s.service_ports == 2 * n
                            and s.last_sync_unix > t)
        rss, maps = topology.agent_memory(bpf.agent.process.pid)
        row = {"services": size, "endpoints": ENDPOINTS,
               "file_to_kernel_s": status.last_sync_unix - start,
               "event_to_kernel_s": status.last_event_to_kernel_seconds,
               "sync_s": status.last_sync_seconds, "agent_rss": rss, "map_bytes": maps}
        if size <= plan.rule_limit:
            desired = work.desired()
            for kind in ("iptables", "nftables"):
                # as far as their own load time allows: skip a size whose load, scaled
                # from the smaller one, would take longer than the budget (quadratically:
                # nft -f and iptables-nft-restore grow faster than linearly)
                guess = estimates.get(kind, 0.0) * size * size
                if guess > LOAD_BUDGET_S:
                    row[f"{kind}_skipped"] = f"~{guess:.0f} s expected"
                    continue
                netns = beds[kind].lab.node_netns
                kp_load.FLUSH[kind](netns)
                seconds = kp_load.LOAD[kind](render_rules(kind, desired,
                                                          beds[kind].lab.node_ip), netns)
                row[f"{kind}_s"] = seconds
                estimates[kind] = seconds / (size * size)
                kp_load.FLUSH[kind](netns)
        rows.append(row)
        say(f"full sync {size:,} x {ENDPOINTS}: bpfproxy {row['file_to_kernel_s']:.3f}s "
            f"(event->kernel {row['event_to_kernel_s']:.3f}s), iptables "
            f"{row.get('iptables_s', float('nan')):.3f}s, nftables "
            f"{row.get('nftables_s', float('nan')):.3f}s, rss {rss / 2**20:.0f} MiB")
    workload.withdraw(bpf.manifests)
    agent.wait(lambda s: s.service_ports == 0)
    return rows


def probe_objects(bed, with_extra: bool) -> list[dict]:
    ips = bed.backend_ips + ([bed.extra_pods[0].ip] if with_extra else [])
    probe = workload.make(1, len(ips), backend_ips=ips, first=PROBE_INDEX,
                          target_port=topology.NAME_PORT)
    return probe.objects


PROBE_INDEX = 999_999      # the probe service's index: its own name and ClusterIP


def endpoint_changes(beds, plan, agent, say) -> dict:
    """A cluster of cp_change_size services; one service in its own file gains and loses
    an endpoint, cp_changes times. Measures source event -> kernel, and the time until a
    client's new connections reach the new backend."""
    bed = beds["bpfproxy"]
    probe_path = bed.manifests / "probe.json"
    size = plan.cp_change_size
    workload.publish(workload.make(size - 1, ENDPOINTS).stage(bed.manifests))
    workload.Workload(1, 3, probe_objects(bed, False)).write(probe_path)
    agent.wait(lambda s: s.service_ports == 2 * size)
    event_to_kernel, file_to_kernel = [], []
    for i in range(plan.cp_changes):
        before = agent.status().change_syncs
        start = time.time()
        workload.Workload(1, 4, probe_objects(bed, i % 2 == 0)).write(probe_path)
        status = agent.wait(lambda s, b=before: s.change_syncs > b, timeout=60)
        event_to_kernel.append(status.last_event_to_kernel_seconds)
        file_to_kernel.append(status.last_sync_unix - start)
        # single changes, not a storm: past the agent's burst, min-sync-period (0.1 s)
        # would hold each change back, and that is rate limiting, not latency
        time.sleep(0.15)

    vip = workload.cluster_ip(PROBE_INDEX)
    extra = bed.extra_pods[0].name
    with_extra = (plan.cp_changes - 1) % 2 == 0        # the state the loop above left
    reach = []
    for _ in range(plan.cp_reach):
        if with_extra:
            before = agent.status().change_syncs
            workload.Workload(1, 3, probe_objects(bed, False)).write(probe_path)
            agent.wait(lambda s, b=before: s.change_syncs > b, timeout=60)
        running = bed.client.start_client("tcp", vip, 80, duration=1.5, timeout=0.5,
                                          timeline=True)
        time.sleep(0.5)                            # the client is up and connecting
        start = time.monotonic()
        workload.Workload(1, 4, probe_objects(bed, True)).write(probe_path)
        with_extra = True
        result = running.result()
        seen = [result.started + t for t, answer in result.timeline
                if answer.startswith(extra) and result.started + t >= start]
        if seen:
            reach.append(seen[0] - start)
    workload.withdraw(bed.manifests)
    probe_path.unlink()
    agent.wait(lambda s: s.service_ports == 0)
    summary = {
        "services": size, "changes": len(event_to_kernel),
        "event_to_kernel_p50_s": percentile(event_to_kernel, 0.5),
        "event_to_kernel_p99_s": percentile(event_to_kernel, 0.99),
        "file_to_kernel_p50_s": percentile(file_to_kernel, 0.5),
        "file_to_kernel_p99_s": percentile(file_to_kernel, 0.99),
        "reach_samples": len(reach), "reach_attempts": plan.cp_reach,
        "reach_p50_s": percentile(reach, 0.5), "reach_max_s": max(reach) if reach else None,
    }
    say(f"endpoint change at {size:,} services: event->kernel p50 "
        f"{summary['event_to_kernel_p50_s']:.4f}s p99 {summary['event_to_kernel_p99_s']:.4f}s; "
        f"new connections reach the new backend after p50 "
        f"{(summary['reach_p50_s'] or float('nan')):.3f}s ({len(reach)}/{plan.cp_reach} seen)")
    return summary


def measure(beds, plan, agent, say) -> dict:
    bed = beds["bpfproxy"]
    workload.withdraw(bed.manifests)
    agent.wait(lambda s: s.service_ports == 0)
    # a fresh agent (it adopts the empty maps): Python keeps the heap the 100k-service
    # traffic phase grew, and the memory figures are about the sizes measured here. Not
    # needed when the traffic phase held no more services than the first full sync (the
    # quick bench, the suite's smallest run): the agent's heap never grew past it
    if max(plan.sizes, default=0) > min(plan.cp_sizes):
        bed.agent.stop()
        bed.agent.start()
    return {"full_syncs": full_syncs(beds, plan, agent, say),
            "endpoint_changes": endpoint_changes(beds, plan, agent, say)}
