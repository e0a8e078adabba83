"""The gRPC status API (bpfproxy.v1.Agent, grpc.health.v1, reflection): read-only answers
from the agent's applied state and the kernel inventory; never writes either.

Listens on a unix socket (unix:///run/bpfproxy/api.sock, mode 0660) or host:port, with TLS
(and client certificates) when given. Kernel reads and page building run in the API's
own two threads, so no client can take the threads the sync loop writes the kernel with."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from socket import inet_ntoa

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agent.api import queries
from agent.api.events import Event, TooManySubscribers
from agent.api.generated import agent_pb2, agent_pb2_grpc
from agent.api.observed import Observed
from agent.api.queries import Filter, InvalidRequest
from agent.datapath.inventory import Counters
from agent.status import AgentStatus, AppliedServicePort, PortMemo

log = logging.getLogger(__name__)

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name
MAX_CONCURRENT_RPCS = 128      # beyond: RESOURCE_EXHAUSTED, not an unbounded backlog


@dataclass(frozen=True)
class WatchLimits:
    """How long a WatchEvents stream may hold its place (one of EventHub.max_subscribers
    and of the concurrent RPCs); its queue is bounded by the hub (events.QUEUE_SIZE)."""
    # an event the client's connection has not taken for this long (it stopped reading,
    # and gRPC's buffers are full) ends the stream: its hub place is freed at once
    stall_seconds: float = 60.0
    # then the stream ends (OK) and the client watches again; drawn at random in this
    # range, as kube-apiserver does for watches (--min-request-timeout, 1800 s, to twice
    # that), so that clients do not all come back at once
    lifetime_seconds: tuple[float, float] = (1800.0, 3600.0)

    def server_options(self) -> list[tuple[str, int]]:
        """The backstop for a call its handler cannot end: with a write pending, gRPC
        Python can neither send a status nor cancel the call, so the connection goes
        (GOAWAY past any stream's lifetime, then closed after stall_seconds)."""
        return [("grpc.max_connection_age_ms", int(self.lifetime_seconds[1] * 1250)),
                ("grpc.max_connection_age_grace_ms", int(self.stall_seconds * 1000))]


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path | None = None      # given: clients must present a certificate it signed

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.ca.read_bytes() if self.ca else None,
            require_client_auth=self.ca is not None)


# ---- messages --------------------------------------------------------------------------

def add_service_ports(into, ports: Iterable[AppliedServicePort],
                      allocations: Mapping | None = None) -> None:
    """Append each service port's message to the repeated field into (a response's).
    Built in place with add(): a message per frontend and backend handed to a constructor
    is copied into its parent by upb, which made a 50k-service listing twice as slow.
    allocations: the manifest source's, by (namespace, name): marks what it allocated."""
    allocations = allocations or {}
    add_port = into.add
    for sp in ports:
        n = sp.name
        allocated = allocations.get((n.namespace, n.name))
        text = _address_text(sp.family)
        m = add_port(namespace=n.namespace, name=n.name, port_name=n.port_name,
                     protocol=n.protocol._value_, family=sp.family,
                     type=queries.service_type(sp), held_back=sp.held_back)
        add = m.frontends.add
        for f, kind in sp.frontends:
            address = text(f.address)
            add(address=address, port=f.port, kind=kind,
                allocated=_allocated(allocated, address, f.port, kind))
        add = m.backends.add
        for b, state in sp.backends:
            add(address=text(b.address), port=b.port, state=state)


def _ipv4_text(address) -> str:
    """str() of an IPv4Address (or of its int), in C: ipaddress joins the octets in
    Python, a third of a service listing's CPU."""
    return inet_ntoa((address if type(address) is int else address._ip).to_bytes(4, "big"))


def _address_text(family: int) -> Callable:
    return _ipv4_text if family == 4 else str


def service_port_message(sp: AppliedServicePort, allocations: Mapping | None = None
                         ) -> agent_pb2.ServicePort:
    response = agent_pb2.GetServiceResponse()
    add_service_ports(response.ports, [sp], allocations)
    return response.ports[0]


def encoded_page(ports: Sequence[AppliedServicePort], memo: PortMemo,
                 allocations: Mapping | None, next_token: str = "") -> bytes:
    """ListServicesResponse(services=ports, next_page_token=next_token), serialized: the
    concatenation of each port's kept encoding (field 1, framed once) and the token (field
    2), as protobuf lays out a message's repeated field. A port's encoding is made on its
    first request and kept in memo (AgentStatus.memo) until a sync changes the port or
    the manifest source changes what it allocated to it; GetServiceResponse's ports are
    field 1 too, so the same bytes make its answer."""
    allocations = allocations or {}
    entries = memo.ports
    out: list[bytes] = []
    missing: list[tuple[int, AppliedServicePort, object]] = []
    for sp in ports:
        n = sp.name
        allocation = allocations.get((n.namespace, n.name))
        entry = entries.get((n, sp.family))
        kept = _kept(entry.kept, allocation) if entry is not None and entry.port is sp \
            else None
        if kept is None:
            missing.append((len(out), sp, allocation))
            kept = b""
        out.append(kept)
    if missing:
        built = agent_pb2.GetServiceResponse()
        add_service_ports(built.ports, [sp for _, sp, _ in missing], allocations)
        for (at, sp, allocation), message in zip(missing, built.ports, strict=True):
            body = message.SerializeToString()
            framed = b"\x0a" + _varint(len(body)) + body
            out[at] = framed
            entry = entries.get((sp.name, sp.family))
            if entry is not None and entry.port is sp:
                entry.kept = framed if allocation is None else (allocation, framed)
    if next_token:
        token = next_token.encode()
        out.append(b"\x12" + _varint(len(token)) + token)
    return b"".join(out)


def _kept(kept, allocation) -> bytes | None:
    """A kept encoding if it was made with this allocation: kept as the bytes alone when
    nothing was allocated (most ports: less memory), else (allocation, bytes)."""
    if kept is None or type(kept) is bytes:
        return kept if allocation is None else None
    return kept[1] if kept[0] is allocation or kept[0] == allocation else None


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _allocated(allocation, address: str, port: int, kind: str) -> bool:
    if allocation is None:
        return False
    if kind == "ClusterIP":
        return address in allocation.cluster_ips
    return kind == "NodePort" and port in allocation.node_ports


def service_ports_message(status: AgentStatus) -> list[agent_pb2.ServicePort]:
    return [service_port_message(sp) for sp in status.services]


def counters_message(c: Counters) -> agent_pb2.Counters:
    return agent_pb2.Counters(connections=c.connections, packets=c.packets, bytes=c.bytes,
                              refused=c.refused, dropped=c.dropped)


def event_message(event: Event) -> agent_pb2.Event:
    f = event.fields
    return agent_pb2.Event(
        time_unix=event.time_unix, kind=event.kind, message=str(f.get("message", "")),
        duration_seconds=f.get("duration_seconds", 0.0), operations=f.get("operations", 0),
        full=bool(f.get("full", False)),
        event_to_kernel_seconds=f.get("event_to_kernel_seconds", 0.0),
        service_ports=f.get("service_ports", 0), dropped_before=event.dropped_before,
        namespace=str(f.get("namespace", "")), name=str(f.get("name", "")))


def _filter(request) -> Filter:
    f = request.filter
    return Filter.parse(f.namespace, f.name, f.address)


# ---- the service -----------------------------------------------------------------------

class AgentService(agent_pb2_grpc.AgentServicer):
    def __init__(self, observed: Observed, executor: ThreadPoolExecutor,
                 watch_limits: WatchLimits = WatchLimits()) -> None:
        self.observed = observed
        self.executor = executor
        self.watch_limits = watch_limits
        self.sorted_views = queries.SortedViewCache()

    def _sorted(self) -> queries.SortedView:
        """The applied state in key order, sorted once per sync (in an API thread)."""
        status = self.observed.status
        return self.sorted_views.of(status.view, status.memo)

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _refuse(self, context, exc: InvalidRequest, rpc: str):
        self.observed.invalid_requests += 1
        log.info("event=api_invalid_request rpc=%s error=%r", rpc, str(exc))
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def GetStatus(self, request, context):
        o, s = self.observed, self.observed.status
        programs, maps, events = await self._in_thread(self._kernel_inventory)
        service_ports, frontends, backends = s.view.counts
        return agent_pb2.Status(
            synced=s.synced, node_name=s.node_name, service_ports=service_ports,
            frontends=frontends, backends=backends, last_sync_unix=s.last_sync_unix,
            syncs=s.syncs, sync_errors=s.sync_errors, source=s.source,
            last_event_to_kernel_seconds=s.last_event_to_kernel_seconds,
            last_sync_seconds=s.last_sync_seconds, change_syncs=s.change_syncs,
            version=o.version, full_syncs=s.full_syncs, started_unix=o.started_unix,
            source_state=agent_pb2.SourceState(kind=o.source_kind, location=o.source_location,
                                               complete=o.source_complete,
                                               stalled=o.source_stalled,
                                               held_back=[agent_pb2.HeldBack(
                                                   origin=h.origin, reason=h.reason,
                                                   objects=[str(k) for k in h.objects],
                                                   unknown=h.unknown)
                                                   for h in o.source_held_back]),
            programs=programs, maps=maps, errors=o.errors(),
            pin_dir=str(o.inventory.pin_dir) if o.inventory else "",
            refused_services=[agent_pb2.RefusedService(
                namespace=service.split("/", 1)[0], name=service.split("/", 1)[1],
                reason=reason) for service, reason in sorted(s.refused.items())],
            flows=_flow_table(s.flows),
            admission_problems=[agent_pb2.AdmissionProblem(
                namespace=namespace, name=name, reason=reason, served=served)
                for namespace, name, reason, served in o.admission_problems],
            datapath_events={f"{program}.{name}": count
                             for (program, name), count in events.items()})

    def _kernel_inventory(self):
        """Programs, maps and the programs' counters; a failed read leaves its part empty
        (counted as kernel_read by the inventory) so that status still answers."""
        inv = self.observed.inventory
        if inv is None:
            return [], [], {}

        def read(part, empty):
            try:
                return part()
            except OSError:
                return empty
        programs = [agent_pb2.Program(name=a.name, hook=a.hook, target=a.target,
                                      attached=a.attached, program_id=a.program_id,
                                      state=a.state, detail=a.fallback)
                    for a in read(inv.programs, [])]
        maps = [agent_pb2.MapUsage(name=m.name, type=m.type, entries=m.entries,
                                   max_entries=m.max_entries, memory_bytes=m.memory_bytes)
                for m in read(lambda: inv.maps(self.observed.map_entries), [])]
        return programs, maps, read(inv.events, {})

    async def _list(self, request, context, method: str, page):
        """A paged list RPC: page(filter, page size, page token) in a thread, for the
        request's filter and paging; a request that does not parse is refused."""
        try:
            flt, size = _filter(request), queries.page_size(request.page_size)
            return await self._in_thread(page, flt, size, request.page_token)
        except InvalidRequest as exc:
            await self._refuse(context, exc, method)

    async def ListServices(self, request, context):
        return await self._list(request, context, "ListServices", self._services_page)

    def _services_page(self, flt: Filter, size: int, token: str) -> bytes:
        """The page already serialized (encoded_page): served as it is (_serialize)."""
        ports, next_token = queries.select_services(self._sorted(), flt, size, token)
        return encoded_page(ports, self.observed.status.memo, self.observed.allocations,
                            next_token)

    async def GetService(self, request, context):
        try:
            if not request.namespace or not request.name:
                raise InvalidRequest("namespace and name are both required")
            flt = Filter.parse(request.namespace, request.name)
        except InvalidRequest as exc:
            await self._refuse(context, exc, "GetService")
            return
        ports = [sp for sp in self.observed.status.services if flt.service(sp)]
        if not ports:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"Service {request.namespace}/{request.name}: not in the "
                                f"kernel (no such Service, or none of its ports is served)")
        return encoded_page(sorted(ports, key=queries.service_key),
                            self.observed.status.memo, self.observed.allocations)

    async def ListBackends(self, request, context):
        return await self._list(request, context, "ListBackends", self._backends_page)

    def _backends_page(self, flt: Filter, size: int, token: str):
        rows, next_token = queries.select_backends(self._sorted(), flt, size, token)
        return agent_pb2.ListBackendsResponse(backends=[agent_pb2.BackendEntry(
            namespace=sp.name.namespace, name=sp.name.name, port_name=sp.name.port_name,
            protocol=sp.name.protocol.value, family=sp.family, address=str(b.address),
            port=b.port, state=state) for sp, b, state in rows], next_page_token=next_token)

    async def GetStats(self, request, context):
        if self.observed.inventory is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no kernel counters here")
        try:
            return await self._list(request, context, "GetStats", self._stats_page)
        except OSError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"reading the counters map failed: {exc}")

    def _stats_page(self, flt: Filter, size: int, token: str):
        view = self.observed.status.view
        pages = self.sorted_views.of(view, self.observed.status.memo)
        ports, next_token = queries.select_services(pages, flt, size, token)
        rows = queries.port_stats(view, self.observed.inventory.stats(), ports, pages.svc_ids)
        return agent_pb2.GetStatsResponse(services=[agent_pb2.ServiceStats(
            namespace=r.port.name.namespace, name=r.port.name.name,
            port_name=r.port.name.port_name, protocol=r.port.name.protocol.value,
            family=r.port.family, counters=counters_message(r.counters),
            backends=[agent_pb2.BackendStats(address=str(b.address), port=b.port, state=state,
                                             counters=counters_message(c))
                      for b, state, c in r.backends]) for r in rows],
            next_page_token=next_token)

    async def WatchEvents(self, request, context):
        try:
            subscription = self.observed.hub.subscribe()
        except TooManySubscribers as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        limits, loop = self.watch_limits, asyncio.get_running_loop()
        ends = loop.time() + random.uniform(*limits.lifetime_seconds)
        peer = context.peer()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(subscription.next(), ends - loop.time())
                except TimeoutError:
                    log.debug("event=api_watch_ended reason=lifetime peer=%s", peer)
                    return          # OK: the client watches again
                try:
                    await asyncio.wait_for(context.write(event_message(event)),
                                           limits.stall_seconds)
                except TimeoutError:
                    break
        finally:
            subscription.close()
        self.observed.watches_stalled += 1
        log.info("event=api_watch_ended reason=stalled peer=%s seconds=%.0f", peer,
                 limits.stall_seconds)
        # Its place is free now. A write is still pending in gRPC, so no status can
        # follow it: end the handler as cancelled; the connection's age ends the call.
        raise asyncio.CancelledError(f"not read for {limits.stall_seconds:.0f} s")


# ---- health ----------------------------------------------------------------------------

def _health_tracker(observed: Observed, servicer: health.aio.HealthServicer):
    """SERVING once the first sync is in the kernel; NOT_SERVING when the source failed."""
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING

    async def set_all(state) -> None:
        for name in ("", SERVICE_NAME):
            await servicer.set(name, state)

    def on_event(event: Event) -> None:
        if event.kind == "sync":
            asyncio.get_running_loop().create_task(set_all(serving))
        elif event.kind == "source_failed":
            asyncio.get_running_loop().create_task(set_all(not_serving))

    return set_all(serving if observed.status.synced else not_serving), on_event


# ---- start -----------------------------------------------------------------------------

def _unix_path(address: str) -> Path | None:
    return Path(address.removeprefix("unix://")) if address.startswith("unix://") else None


def _warn_if_open(address: str, tls: TlsFiles | None) -> None:
    """A TCP listener without client certificates answers anyone who reaches it."""
    if tls is None:
        log.warning("event=api_insecure address=%s hint=%r", address,
                    "TCP without --api-tls-cert/--api-tls-key: anyone who reaches it reads "
                    "the node's services")
    elif tls.ca is None:
        log.warning("event=api_insecure address=%s hint=%r", address,
                    "TLS without --api-tls-ca: the certificate proves the server, not the "
                    "client; anyone who reaches it reads the node's services")


def _listen_unix(path: Path, add_port: Callable[[str], int]) -> int:
    """Bind in a fresh 0700 directory of our own, give the socket its mode there, then
    rename it into place: it is 0660 from the moment anyone can reach it, and no chmod
    ever follows a path that someone could have swapped for a symlink (rename replaces
    whatever is at the path, a stale socket or a link, and never follows it)."""
    # group-only, like the socket (a directory given to us, e.g. a hostPath, is kept)
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bpfp-", dir=path.parent))    # 0700
    try:
        staged = staging / "s"          # short: a socket path has 107 bytes at most
        bound = add_port(f"unix://{staged}")
        if bound:
            os.chmod(staged, 0o660)
            os.replace(staged, path)
        return bound
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_on_stop(server: grpc.aio.Server, path: Path) -> None:
    """gRPC removes the socket it bound when it stops, but it bound the staging name:
    remove ours, unless another agent has put its own there since."""
    ours = os.lstat(path)
    stop = server.stop

    async def stop_and_remove(grace: float | None) -> None:
        try:
            await stop(grace)
        finally:
            with contextlib.suppress(OSError):
                now = os.lstat(path)
                if (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino):
                    os.unlink(path)

    server.stop = stop_and_remove


async def start(address: str, observed: Observed | AgentStatus,
                tls: TlsFiles | None = None,
                watch_limits: WatchLimits = WatchLimits(),
                bind: Callable | None = None) -> grpc.aio.Server:
    """bind(fn, *args): where the port is bound (capabilities.PortBinder.run, for a port
    below 1024 after the agent's capability drop); default here."""
    if isinstance(observed, AgentStatus):
        observed = Observed(observed)
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="api")
    server = grpc.aio.server(maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
                             options=watch_limits.server_options())
    _add_agent_service(AgentService(observed, executor, watch_limits), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    initial, on_event = _health_tracker(observed, health_servicer)
    await initial
    observed.hub.listen(on_event)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    def add_port(where: str) -> int:
        if tls:
            return (bind or _here)(server.add_secure_port, where, tls.credentials())
        return (bind or _here)(server.add_insecure_port, where)

    path = _unix_path(address)
    if path is None:
        _warn_if_open(address, tls)
    try:
        bound = _listen_unix(path, add_port) if path is not None else add_port(address)
    except (RuntimeError, OSError) as exc:
        raise OSError(f"cannot listen on --api {address}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot listen on --api {address}")
    if path is not None:
        _remove_on_stop(server, path)
    await server.start()
    log.info("event=api_listening address=%s tls=%s client_certs=%s", address,
             tls is not None, bool(tls and tls.ca))
    return server


def _add_agent_service(servicer: AgentService, server: grpc.aio.Server) -> None:
    """As agent_pb2_grpc.add_AgentServicer_to_server, every method from the proto's
    descriptor, except that an answer may come already serialized (bytes: ListServices')."""
    handlers = {}
    for method in agent_pb2.DESCRIPTOR.services_by_name["Agent"].methods:
        request = getattr(agent_pb2, method.input_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else \
            grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name),
                                     request_deserializer=request.FromString,
                                     response_serializer=_serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME,
                                                                          handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _serialize(answer) -> bytes:
    return answer if isinstance(answer, bytes) else answer.SerializeToString()


def _here(bind: Callable, *args):
    return bind(*args)


def _flow_table(stats) -> agent_pb2.FlowTable | None:
    """datapath.conntrack.FlowTableStats as the API says it; None before a first sweep."""
    if stats is None:
        return None
    return agent_pb2.FlowTable(
        entries=stats.entries, flows=stats.flows, snat_ports_in_use=stats.snat_ports_in_use,
        snat_ports_busiest=stats.snat_ports_busiest, snat_port_range=stats.snat_port_range,
        removed=stats.removed, swept_unix=stats.finished_unix, events=stats.events)
