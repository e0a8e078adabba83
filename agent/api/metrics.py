"""Prometheus metrics on --metrics (default 127.0.0.1:10249, kube-proxy's port), named as
kube-proxy names its own with our prefix: bpfproxy_sync_proxy_rules_duration_seconds, ...

Histograms are observed from sync events; everything else is read at scrape time, in the
HTTP server's thread (kernel reads never run on the agent's loop)."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from wsgiref.simple_server import make_server

from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, _get_best_family, _SilentHandler
from prometheus_client.registry import Collector

from agent.api import queries
from agent.api.events import Event
from agent.api.observed import Observed
from agent.datapath.inventory import Counters, acceleration_states

log = logging.getLogger(__name__)

PREFIX = "bpfproxy"
DEFAULT_METRICS = "127.0.0.1:10249"
# kube-proxy's: exponential from 1 ms (metrics.go: prometheus.ExponentialBuckets(0.001,2,15))
SYNC_BUCKETS = tuple(0.001 * 2 ** i for i in range(15))
# conntrack maps of the TC datapath, by pin name prefix
CONNTRACK_MAPS = ("bpfp_ct", "bpfp_conntrack")
COUNTER_FIELDS = ("connections", "packets", "bytes", "refused", "dropped")


class StateCollector(Collector):
    """What the agent and the kernel hold at scrape time."""

    def __init__(self, observed: Observed) -> None:
        self.observed = observed

    def collect(self) -> Iterator[Metric]:
        o, s = self.observed, self.observed.status
        info = GaugeMetricFamily(f"{PREFIX}_info", "The agent's version and node.",
                                 labels=["version", "node"])
        info.add_metric([o.version, s.node_name], 1)
        yield info
        yield GaugeMetricFamily(f"{PREFIX}_synced", "1 once the first full sync is in the "
                                "kernel.", value=int(s.synced))
        yield GaugeMetricFamily(f"{PREFIX}_sync_proxy_rules_last_timestamp_seconds",
                                "When the last sync reached the kernel (unix time).",
                                value=s.last_sync_unix)
        syncs = CounterMetricFamily(f"{PREFIX}_sync_proxy_rules", "Successful syncs, "
                                    "full (everything recomputed) or partial (changes only).",
                                    labels=["kind"])
        syncs.add_metric(["full"], s.full_syncs)
        syncs.add_metric(["partial"], s.syncs - s.full_syncs)
        yield syncs
        service_ports, frontends, backends = s.view.counts
        yield GaugeMetricFamily(f"{PREFIX}_service_ports", "Service ports (per address "
                                "family) in the kernel.", value=service_ports)
        yield GaugeMetricFamily(f"{PREFIX}_frontends", "Frontends (address:port/protocol) "
                                "in the kernel.", value=frontends)
        yield GaugeMetricFamily(f"{PREFIX}_backend_slots", "Backend slots in the kernel (a "
                                "pod serving two service ports counts twice).", value=backends)
        yield GaugeMetricFamily(f"{PREFIX}_services_refused", "Services whose change did "
                                "not fit the maps, now.", value=len(s.refused))
        refused = GaugeMetricFamily(f"{PREFIX}_service_refused", "1 for each Service whose "
                                    "change did not fit the maps (the kernel keeps what it "
                                    "had of it).", labels=["namespace", "service"])
        for service in sorted(s.refused):
            refused.add_metric(service.split("/", 1), 1)
        yield refused
        yield from self._held_back(o, s)
        errors = CounterMetricFamily(f"{PREFIX}_errors", "Errors since start, by kind.",
                                     labels=["kind"])
        for kind, count in sorted(o.errors().items()):
            errors.add_metric([kind], count)
        yield errors
        yield GaugeMetricFamily(f"{PREFIX}_event_watchers", "WatchEvents streams open.",
                                value=o.hub.subscribers)
        yield from self._flows(s.flows)
        if o.inventory is not None:
            yield from self._kernel(o, s)

    def _kernel(self, o: Observed, s) -> Iterator[Metric]:
        try:
            maps = o.inventory.maps(o.map_entries)
        except OSError:
            maps = []
        entries = GaugeMetricFamily(f"{PREFIX}_bpf_map_entries", "Entries in a pinned map.",
                                    labels=["map"])
        capacity = GaugeMetricFamily(f"{PREFIX}_bpf_map_max_entries", "A pinned map's "
                                     "capacity.", labels=["map"])
        memory = GaugeMetricFamily(f"{PREFIX}_bpf_map_memory_bytes", "Kernel memory a "
                                   "pinned map holds (fdinfo memlock).", labels=["map"])
        for m in maps:
            entries.add_metric([m.name], m.entries)
            capacity.add_metric([m.name], m.max_entries)
            memory.add_metric([m.name], m.memory_bytes)
        yield entries
        yield capacity
        yield memory
        yield GaugeMetricFamily(f"{PREFIX}_conntrack_entries", "Flows tracked by the TC "
                                "datapath's conntrack maps.",
                                value=sum(m.entries for m in maps
                                          if m.name.startswith(CONNTRACK_MAPS)))
        try:
            programs = o.inventory.programs()
        except OSError:
            programs = []
        attached = GaugeMetricFamily(f"{PREFIX}_program_attached", "1 when our program is "
                                     "attached at the hook, 0 when it is missing.",
                                     labels=["program", "hook", "target"])
        for p in programs:
            attached.add_metric([p.name, p.hook, p.target], int(p.attached))
        yield attached
        acceleration = GaugeMetricFamily(
            f"{PREFIX}_acceleration", "1 for each --interfaces device with --acceleration on: "
            "state xdp (the XDP program attached), tc_fallback (best-effort left it to the TC "
            "programs: no native XDP) or missing.", labels=["interface", "mode", "state"])
        mode = o.inventory.acceleration
        for interface, state in acceleration_states(mode, programs):
            acceleration.add_metric([interface, mode, state], 1)
        yield acceleration
        try:
            counted = o.inventory.events()
        except OSError:
            counted = {}
        events = CounterMetricFamily(
            f"{PREFIX}_datapath_events", "What the programs did that no service counter "
            "shows. socket: revnat_failed, no_socket_storage (replies may show the backend's "
            "address), revnat_replaced; tc: no_snat_port, tcp_not_syn (both dropped), "
            "snat_port_reused, flow_expired.", labels=["program", "event"])
        for (program, name), value in sorted(counted.items()):
            events.add_metric([program, name], value)
        yield events
        yield from self._services(o, s)

    @staticmethod
    def _held_back(o: Observed, s) -> Iterator[Metric]:
        """What waits for unreadable input, by file (or resource), object and reason; and
        the service ports the kernel keeps for input never read (ListServices shows them)."""
        held = GaugeMetricFamily(f"{PREFIX}_source_held_back", "1 for each object kept at "
                                 "its last good version because its input cannot be read "
                                 "now (object \"\": input never read, content unknown).",
                                 labels=["origin", "object", "reason"])
        for h in o.source_held_back:
            for obj in [str(k) for k in h.objects] or [""]:
                held.add_metric([h.origin, obj, h.reason[:200]], 1)
        yield held
        yield GaugeMetricFamily(f"{PREFIX}_service_ports_held_back", "Service ports in the "
                                "kernel that no listed object claims, kept for input never "
                                "read (adopted at start).", value=len(s.view.kept))

    @staticmethod
    def _flows(flows) -> Iterator[Metric]:
        """The TC path's flow table at its last sweep (datapath.conntrack)."""
        if flows is None:
            return
        yield GaugeMetricFamily(f"{PREFIX}_flows", "Live flows from outside the node "
                                "(TC path), at the last sweep.", value=flows.flows)
        yield GaugeMetricFamily(f"{PREFIX}_snat_ports_in_use", "Node ports held by live "
                                "SNATed flows, at the last sweep.",
                                value=flows.snat_ports_in_use)
        yield GaugeMetricFamily(f"{PREFIX}_snat_ports_busiest_backend", "The most node "
                                "ports held towards one backend; new flows to it are "
                                "dropped when this reaches bpfproxy_snat_port_range.",
                                value=flows.snat_ports_busiest)
        yield GaugeMetricFamily(f"{PREFIX}_snat_port_range", "SNAT ports per backend.",
                                value=flows.snat_port_range)

    def _services(self, o: Observed, s) -> Iterator[Metric]:
        try:
            stats = o.inventory.stats()
        except OSError:
            return
        labels = ["namespace", "service", "port_name", "protocol"]
        families = {f: CounterMetricFamily(f"{PREFIX}_service_{f}",
                                           f"Per service port: {help_text}", labels=labels)
                    for f, help_text in (
                        ("connections", "connections balanced to a backend."),
                        ("packets", "packets through the TC path."),
                        ("bytes", "bytes through the TC path, both directions."),
                        ("refused", "connections refused or dropped: no usable backend."),
                        ("dropped", "packets dropped by loadBalancerSourceRanges."))}
        by_port: dict[tuple, Counters] = {}
        named = [sp for sp in s.services if not sp.held_back]
        for row in queries.port_stats(s.view, stats, named):
            n = row.port.name        # both address families of a port summed
            by_port.setdefault((n.namespace, n.name, n.port_name, n.protocol.value),
                               Counters()).add(row.counters)
        for key, counters in sorted(by_port.items()):
            for f in COUNTER_FIELDS:
                families[f].add_metric(list(key), getattr(counters, f))
        yield from families.values()


class Metrics:
    """The registry: the state collector plus the sync histograms fed by hub events."""

    def __init__(self, observed: Observed) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.sync_duration = Histogram(
            f"{PREFIX}_sync_proxy_rules_duration_seconds", "How long a sync took (model, "
            "plan, kernel write).", buckets=SYNC_BUCKETS, registry=self.registry)
        self.programming = Histogram(
            f"{PREFIX}_network_programming_duration_seconds", "From the source delivering "
            "a change to the kernel holding it.", buckets=SYNC_BUCKETS, registry=self.registry)
        self.registry.register(StateCollector(observed))
        observed.hub.listen(self.on_event)

    def on_event(self, event: Event) -> None:
        if event.kind != "sync":
            return
        self.sync_duration.observe(event.fields.get("duration_seconds", 0.0))
        if event.fields.get("event_to_kernel_seconds"):
            self.programming.observe(event.fields["event_to_kernel_seconds"])


def split_address(address: str, flag: str) -> tuple[str, int]:
    """host:port or [v6]:port -> (host, port); ValueError naming the flag."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{flag} {address!r}: expected HOST:PORT (e.g. 127.0.0.1:10249)")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(address: str, observed: Observed, bind: Callable | None = None):
    """Start the HTTP server (its own thread); returns it (shutdown() to stop).
    bind(fn, *args): where the port is bound (capabilities.PortBinder.run, for a port below
    1024 after the capability drop); the serving thread starts here either way."""
    host, port = split_address(address, "--metrics")
    metrics = Metrics(observed)
    server = (bind or _here)(_http_server, host, port, metrics.registry)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("event=metrics_listening address=%s", address)
    return server


def _http_server(host: str, port: int, registry: CollectorRegistry) -> ThreadingWSGIServer:
    """prometheus_client's start_wsgi_server without its thread: bound, not serving."""
    class Server(ThreadingWSGIServer):
        pass

    Server.address_family, host = _get_best_family(host, port)
    return make_server(host, port, make_wsgi_app(registry), Server,
                       handler_class=_SilentHandler)


def _here(bind: Callable, *args):
    return bind(*args)
