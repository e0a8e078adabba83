"""Wires the rooms together: source events -> model -> planner -> datapath, in one loop.

A bounded-frequency runner coalesces events (at most one sync per min_sync_period, at
least one per sync_period); kernel calls run in a thread so the API stays responsive."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol as TypingProtocol

from agent import model
from agent.model.health import ServiceHealth, by_port, service_health_parts
from agent.model.types import (
    DesiredState,
    EndpointSlice,
    Node,
    NodeContext,
    ObjectKey,
    Protocol,
    Service,
    ServicePortName,
    ServicePortState,
)
from agent.planner import (
    AppliedState,
    BackendAddr,
    DeleteFrontend,
    DeleteSlot,
    FrontendKey,
    KernelService,
    MapFullError,
    Overlay,
    Plan,
    PutSlot,
    by_scope,
    commit,
    map_usage,
    plan,
    plan_changes,
)
from agent.sources.events import HeldBack, ObjectChange

log = logging.getLogger(__name__)

RETRY_FIRST = 0.5          # seconds before retrying a failed sync; doubles up to RETRY_MAX
RETRY_MAX = 10.0
SYNC_BURST = 2             # syncs allowed back to back before min_sync_period applies
FULL_SYNC_SHARE = 0.25     # more services than this share changed: recompute everything
BUDGET_STEP = 64           # entries a lowered map budget grows by, at least, per period


class Source(TypingProtocol):
    def changes(self) -> AsyncIterator[list[ObjectChange]]: ...
    # input that cannot be read now, as of the last batch (read on the loop); its objects
    # stay listed at their last good version, and only what is `unknown` keeps kernel
    # state adopted at start
    @property
    def held_back(self) -> tuple[HeldBack, ...]: ...
    # optional: on_event, set by the agent, is told of bad input the source found (on the
    # loop); it reaches the API's event stream as the agent's own events do


class ServiceMaps(TypingProtocol):
    def apply(self, ops) -> None: ...
    def read_back(self) -> AppliedState: ...
    def supports(self, family: int, protocol: Protocol) -> bool: ...


@dataclass(frozen=True, slots=True)
class AppliedServicePort:
    """A service port as the kernel serves it (all its frontends, internal and external,
    and every backend any of them reaches), with the names the API reports."""
    name: ServicePortName
    family: int
    frontends: tuple[tuple[FrontendKey, str], ...]     # (frontend, kind)
    backends: tuple[tuple[BackendAddr, str], ...]      # (backend, ready | terminating)
    held_back: str = ""     # why the kernel keeps it though no object listed claims it

    @classmethod
    def adopted(cls, kernel: KernelService, why: str) -> AppliedServicePort:
        """A service port adopted from the kernel that no listed object names (its
        owner is unknown): what the maps hold of it, and why it stays."""
        frontends = sorted({replace(f, scope=0) for f in kernel.frontends},
                           key=lambda f: (int(f.address), f.port))
        protocol = frontends[0].protocol if frontends else Protocol.TCP
        return cls(ServicePortName("", "", "", protocol), kernel.family,
                   tuple((f, "unknown") for f in frontends),
                   tuple((b, "unknown") for b in kernel.backends), why)

    @classmethod
    def merge(cls, name: ServicePortName, family: int,
              parts: list[tuple[KernelService, ServicePortState]]) -> AppliedServicePort:
        kinds = {FrontendKey(f.address, f.port, f.protocol): f.kind.value
                 for _, desired in parts for f in desired.frontends}
        states = {BackendAddr(b.address, b.port): b.state.value
                  for _, desired in parts for b in desired.backends}
        # a frontend seen by traffic from outside only (scope 1) is the same address
        frontends = sorted({replace(f, scope=0) for kernel, _ in parts for f in kernel.frontends},
                           key=lambda f: (int(f.address), f.port))
        backends = list(dict.fromkeys(b for kernel, _ in parts for b in kernel.backends))
        return cls(name, family, tuple((f, kinds.get(f, "unknown")) for f in frontends),
                   tuple((b, states.get(b, "unknown")) for b in backends))


@dataclass(frozen=True)
class AppliedView:
    """What the kernel holds after a sync, named: built into API answers only on request
    (a sync's cost must follow its change, not the cluster's size)."""
    applied: AppliedState
    desired: DesiredState
    ids: dict[tuple[ServicePortName, int], int]
    # (service ports, frontends, backend slots), known from the plan without a scan
    counts: tuple[int, int, int] = (0, 0, 0)
    # svc_ids adopted at start that the kernel keeps for input never read, and why
    kept: tuple[int, ...] = ()
    kept_reason: str = ""

    @functools.cached_property
    def service_ports(self) -> tuple[AppliedServicePort, ...]:
        parts: dict[tuple[ServicePortName, int], list] = {}
        for key, svc_id in self.ids.items():
            if svc_id in self.applied and key in self.desired:
                parts.setdefault(key[:2], []).append((self.applied[svc_id],
                                                      self.desired[key]))
        named = tuple(AppliedServicePort.merge(name, family, parts[name, family])
                      for name, family in sorted(parts, key=lambda k: (str(k[0]), k[1])))
        return named + tuple(AppliedServicePort.adopted(self.applied[i], self.kept_reason)
                             for i in self.kept if i in self.applied)


@dataclass
class AgentStatus:
    synced: bool = False
    syncs: int = 0
    sync_errors: int = 0
    last_sync_unix: float = 0.0
    last_sync_seconds: float = 0.0
    view: AppliedView = field(default_factory=lambda: AppliedView({}, {}, {}))
    source: str = ""
    node_name: str = ""
    failure: str = ""                  # why the agent stopped on its own, if it did
    # From the source delivering a change to the kernel holding it, for the last sync
    # that carried changes (periodic syncs without one do not count).
    last_event_to_kernel_seconds: float = 0.0
    full_syncs: int = 0                # syncs that recomputed everything (the rest: changes)
    change_syncs: int = 0              # syncs that carried changes from the source
    # Services whose change does not fit the maps, "namespace/name" -> why; the kernel
    # keeps what it had of them. services_refused counts each time one was refused.
    refused: dict[str, str] = field(default_factory=dict)
    services_refused: int = 0
    # the TC path's flow table at its last sweep (datapath.conntrack.FlowTableStats);
    # None: no TC path, or not swept yet
    flows: object | None = None

    @property
    def services(self) -> tuple[AppliedServicePort, ...]:
        return self.view.service_ports


@dataclass
class Agent:
    source: Source
    maps: ServiceMaps
    min_sync_period: float = 0.1
    sync_period: float = 30.0
    status: AgentStatus = field(default_factory=AgentStatus)
    # this node: its name picks its Node object (zone, addresses); --node-ip and
    # --nodeport-addresses win over the Node object's addresses
    node: NodeContext = field(default_factory=NodeContext)
    # closes connected UDP sockets still aimed at backends a sync removed; given the
    # removed backends and still_served(frontend, backend) to spare sockets that are fine
    udp_cleanup: Callable[[frozenset[BackendAddr], Callable[[FrontendKey, BackendAddr],
                                                            bool]], int] | None = None
    # Maglev table size for traffic from outside the node (--lb-algorithm maglev); 0: random
    maglev_m: int = 0
    # forgets the tracked UDP flows (TC path) of backends their service port lost, given
    # {svc_id: lost backends}; returns how many entries went
    flow_cleanup: Callable[[dict[int, set[BackendAddr]]], int] | None = None
    # told of each sync, failure and conflict as (kind, fields), on the loop; must not
    # block (the API's event hub queues per client and drops for slow ones)
    on_event: Callable[[str, dict], None] | None = None
    # given, after each sync the kernel accepted, on the loop: every healthCheckNodePort
    # with the service it reports on and its ready endpoints here (model.health)
    service_health: Callable[[dict[int, ServiceHealth]], None] | None = None

    def __post_init__(self) -> None:
        # the objects, indexed by the service they belong to (kube-proxy's change trackers)
        self._services: dict[tuple[str, str], Service] = {}
        self._slices: dict[tuple[str, str], dict[ObjectKey, EndpointSlice]] = {}
        self._slice_owner: dict[ObjectKey, tuple[str, str]] = {}
        self._changed: set[tuple[str, str]] = set()      # services changed since the sync
        self._parts: dict[tuple[str, str], frozenset] = {}   # service -> its desired keys
        self._applied: AppliedState = {}
        self._desired: DesiredState = {}
        self._plan: Plan | None = None     # the last plan the kernel holds; None: replan all
        self._kernel_stale = False         # a write failed: re-read the kernel before planning
        self._node_object: Node | None = None
        self._node_changed = False         # topology and NodePorts depend on it: replan all
        self._unsupported: set[tuple[ServicePortName, int]] = set()
        self._pending_since: float | None = None   # oldest change not yet in the kernel
        self._health_parts: dict = {}      # service -> (health check port, its health)
        self._next_health: dict = {}       # computed with the sync in flight
        self._lost_flows: dict[int, set[BackendAddr]] = {}   # UDP flows to forget, next
        self._flow_task: asyncio.Future | None = None
        self._capacity: dict[str, int] | None = None   # the maps' sizes; None: unbounded
        self._full_maps: set[str] = set()  # refused an insert: budget what they took
        self._clamps: dict[str, int] = {}  # map -> entries it took before refusing more
        # svc_ids adopted at start that no listed object claimed yet: kept while the
        # source has input it never read (they may be its), reconciled once it has none
        self._adopted: set[int] = set()
        self._listed = asyncio.Event()     # the source's first, complete listing arrived
        self._dirty = asyncio.Event()
        self._stop = asyncio.Event()

    async def run(self) -> int:
        """Adopt what the kernel holds, then sync whenever the source changes. Returns the
        exit code: 0 when stopped, 1 when the source ended on its own."""
        loop = asyncio.get_running_loop()
        self._applied = await loop.run_in_executor(None, self.maps.read_back)
        self._adopted = set(self._applied)
        self._capacity = self._read_capacity()
        log.info("event=adopted service_ports=%d", len(self._applied))
        if hasattr(self.source, "on_event"):
            self.source.on_event = lambda kind, fields: self._emit(kind, **fields)
        watcher = asyncio.create_task(self._watch_source(), name="source")
        try:
            await self._sync_loop()
        finally:
            watcher.cancel()
        return 1 if self.status.failure else 0

    def stop(self) -> None:
        self._stop.set()

    async def _watch_source(self) -> None:
        try:
            async for batch in self.source.changes():
                if batch and self._pending_since is None:
                    self._pending_since = time.monotonic()
                for change in batch:
                    self._record(change)
                # an empty batch after the first: what the source holds back changed
                self._listed.set()
                self._dirty.set()
            self.status.failure = "source ended"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.status.failure = f"source failed: {exc}"
            log.exception("event=source_failed")
        self._emit("source_failed", message=self.status.failure)
        # What is programmed keeps serving (the kernel holds it); the agent exits so that
        # its supervisor restarts it with a fresh source.
        log.error("event=agent_exiting reason=%r programs=left_attached", self.status.failure)
        self._stop.set()

    def _record(self, change: ObjectChange) -> None:
        """File the change under its service and mark that service dirty."""
        key, obj = change.key, change.obj
        if key.kind == "Service":
            name = (key.namespace, key.name)
            if obj is None:
                self._services.pop(name, None)
            else:
                self._services[name] = obj
            self._changed.add(name)
        elif key.kind == "Node":
            if key.name == self.node.node_name:
                self._node_object = obj
                self._node_changed = True
        elif key.kind == "EndpointSlice":
            old_owner = self._slice_owner.pop(key, None)
            if old_owner is not None:
                self._slices[old_owner].pop(key, None)
                if not self._slices[old_owner]:
                    del self._slices[old_owner]
                self._changed.add(old_owner)
            if obj is not None:
                owner = (key.namespace, obj.service_name)
                self._slices.setdefault(owner, {})[key] = obj
                self._slice_owner[key] = owner
                self._changed.add(owner)

    async def _sync_loop(self) -> None:
        # Never program a half-listed world: wait for the complete first listing.
        if await self._wait(self._listed, None):
            return
        # A token bucket, as kube-proxy's BoundedFrequencyRunner: a lone change is synced
        # at once; a storm is held to one sync per min_sync_period after a short burst.
        tokens, refilled = float(SYNC_BURST), time.monotonic()
        retry = RETRY_FIRST
        reread = False
        while not self._stop.is_set():
            now = time.monotonic()
            tokens = min(SYNC_BURST, tokens + (now - refilled) / max(self.min_sync_period, 1e-6))
            refilled = now
            if tokens < 1:
                if await self._wait(self._stop, (1 - tokens) * self.min_sync_period):
                    return
                tokens, refilled = 1.0, time.monotonic()
            tokens -= 1
            self._dirty.clear()
            if await self._sync_once(reread_kernel=reread):
                retry, timeout = RETRY_FIRST, self.sync_period
            else:
                timeout, retry = retry, min(retry * 2, RETRY_MAX)
            if await self._wait(self._dirty, timeout):
                return
            # A timeout (no event): the periodic sync reads the kernel first, so drift
            # (an entry deleted from outside, a crashed write) is repaired.
            reread = not self._dirty.is_set()

    async def _wait(self, event: asyncio.Event, timeout: float | None) -> bool:
        """Wait for event (or timeout); True when the agent is stopping."""
        stop = asyncio.create_task(self._stop.wait())
        other = asyncio.create_task(event.wait())
        await asyncio.wait({stop, other}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        other.cancel()
        return self._stop.is_set()

    async def _sync_once(self, reread_kernel: bool = False) -> bool:
        """One model -> planner -> datapath pass. Never raises: a failure is logged and
        counted, and the kernel is re-read so the next attempt starts from the truth."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        since, self._pending_since = self._pending_since, None
        dirty, self._changed = self._changed, set()
        periodic = reread_kernel and not self._kernel_stale
        reread_kernel = reread_kernel or self._kernel_stale
        keep, reconcile, why = self._kept_adopted()
        full = (reread_kernel or self._plan is None or bool(keep) or reconcile
                or self._node_changed
                or len(dirty) > FULL_SYNC_SHARE * max(len(self._services), 1))
        self._node_changed = False
        try:
            if reread_kernel:
                self._applied = await loop.run_in_executor(None, self.maps.read_back)
                self._kernel_stale = False
                self._rebudget(periodic)
            # the model and the planner run in a thread on a snapshot of the objects: a
            # large sync takes seconds of CPU, and the API must answer meanwhile
            inputs = self._inputs(full, dirty)
            result, desired, parts = await loop.run_in_executor(
                None, self._compute, full, inputs, keep)
            for conflict in result.conflicts:
                log.warning("event=frontend_conflict detail=%r", conflict)
                self._emit("conflict", message=conflict)
            if result.ops:
                await loop.run_in_executor(None, self.maps.apply, result.ops)
        except Exception as exc:
            self.status.sync_errors += 1
            if isinstance(exc, MapFullError):      # the budget was wrong: lower it
                self._full_maps.add(exc.map_name)
            log.error("event=sync_failed error=%r action=retry", str(exc),
                      exc_info=not isinstance(exc, OSError))
            # unknown what reached the kernel: the next sync re-reads it and replans all
            self._plan, self._kernel_stale = None, True
            if since is not None:       # still not in the kernel: keep the oldest stamp
                self._pending_since = min(since, self._pending_since or since)
            self._emit("sync_failed", message=str(exc))
            return False
        if since is not None:
            self.status.last_event_to_kernel_seconds = time.monotonic() - since
            self.status.change_syncs += 1
        # service ports gone from the kernel: their ids may be reused, their counters not
        gone = {op.svc_id for op in result.ops if isinstance(op, DeleteSlot)}
        if self._plan is not None:
            gone.update(self._plan.owners.get(op.frontend) for op in result.ops
                        if isinstance(op, DeleteFrontend))
        gone = {i for i in gone if i is not None and i not in result.result}
        lost = self._lost_udp_backends(result) if self.flow_cleanup is not None else {}
        # the kernel holds it: write the overlays of an incremental sync into the record
        result = commit(result)
        if isinstance(desired, Overlay):
            desired, parts = desired.commit(), parts.commit()
        self._plan, self._applied, self._desired, self._parts = \
            result, result.result, desired, parts
        if self.service_health is not None:
            self._health_parts = self._next_health
            self._report_health()
        self._report_refused(result)
        kept = ()
        if keep:     # claimed now, or gone from the kernel: no longer kept on suspicion
            self._adopted.intersection_update(result.result)
            self._adopted.difference_update(result.ids.values())
            kept = tuple(sorted(self._adopted))
        self.status.view = AppliedView(result.result, desired, result.ids,
                                       (len(result.result), len(result.owners),
                                        result.slot_total), kept, why)
        elapsed = time.perf_counter() - started
        self.status.syncs += 1
        self.status.full_syncs += full
        self.status.last_sync_unix = time.time()
        self.status.last_sync_seconds = elapsed
        if not self.status.synced or (result.ops and full):
            log.info("event=%s service_ports=%d ops=%d seconds=%.3f",
                     "sync" if self.status.synced else "first_sync", len(desired),
                     len(result.ops), elapsed)
        elif result.ops:
            log.debug("event=sync_changes services=%d ops=%d seconds=%.4f", len(dirty),
                      len(result.ops), elapsed)
        self.status.synced = True
        self._emit("sync", duration_seconds=elapsed, operations=len(result.ops), full=full,
                   event_to_kernel_seconds=(self.status.last_event_to_kernel_seconds
                                            if since is not None else 0.0),
                   service_ports=len(result.result))
        forget = getattr(self.maps, "forget_counters", None)
        if gone and forget is not None:
            try:        # before the next sync: a full plan may give the ids out again
                await loop.run_in_executor(None, forget, gone)
            except Exception as exc:
                log.error("event=counter_cleanup_failed error=%r", str(exc))
        if lost:
            self._forget_flows(lost)
        if result.removed_udp and self.udp_cleanup is not None:
            # not awaited: a slow sweep over many pods must not hold back the next sync
            task = loop.run_in_executor(None, self.udp_cleanup, result.removed_udp,
                                        self._still_served)
            task.add_done_callback(_log_cleanup)
        return True

    def _kept_adopted(self) -> tuple[frozenset[int], bool, str]:
        """(svc_ids adopted at start to keep though nothing listed claims them, whether
        this sync reconciles them, why they are kept). Kept only while the source has
        input it never read: a restarted agent cannot tell what that input held, so it
        may be their owner. What the source listed and then deleted is never among them
        (claimed once, they left the set), nor is any other file's change held back."""
        if not self._adopted:
            return frozenset(), False, ""
        unknown = [held.origin for held in self.source.held_back if held.unknown]
        if unknown:
            return frozenset(self._adopted), False, (
                f"adopted from the kernel at start; no listed object claims it; kept while "
                f"{', '.join(unknown)} cannot be read (it may be theirs)")
        if self.status.synced:
            log.info("event=adopted_reconciled service_ports=%d reason=%r",
                     len(self._adopted), "no input left unread")
        self._adopted.clear()
        return frozenset(), True, ""

    def _read_capacity(self) -> dict[str, int] | None:
        """The maps' sizes, when the datapath tells them (the planner budgets against)."""
        reader = getattr(self.maps, "capacity", None)
        if reader is None:
            return None
        try:
            return dict(reader())
        except Exception as exc:  # noqa: BLE001 -- keep the last sizes known
            log.error("event=capacity_read_failed error=%r", str(exc))
            return self._capacity

    def _budget(self) -> dict[str, int] | None:
        if self._capacity is None:
            return None
        return {m: min(n, self._clamps.get(m, n)) for m, n in self._capacity.items()}

    def _rebudget(self, periodic: bool) -> None:
        """After a kernel re-read: a map that refused an insert the planner counted room
        for (memcg ENOMEM; someone else wrote to it) is budgeted at what it holds now, and
        stays so until the map takes more: a periodic re-read asks it (_raise_clamps)."""
        self._capacity = self._read_capacity()
        if periodic and self._clamps:
            self._raise_clamps()
        if not self._full_maps:
            return
        held = map_usage(self._applied.values(), self.maglev_m)
        for name in sorted(self._full_maps):
            self._clamps[name] = held.get(name, 0)
            log.warning("event=map_budget_lowered map=%s entries=%d max_entries=%s "
                        "reason=%r", name, self._clamps[name],
                        (self._capacity or {}).get(name, "unknown"),
                        "the map refused an insert; services that do not fit are refused")
        self._full_maps.clear()

    def _raise_clamps(self) -> None:
        """A lowered budget doubles (at least BUDGET_STEP entries) each period the map takes
        that many more entries (probe entries no program reads, written and removed by
        maps.room_for), and goes once it reaches the map's size: never a failed sync to
        find out. A kernel door that cannot probe tries the real sizes again."""
        room_for = getattr(self.maps, "room_for", None)
        for name, clamp in sorted(self._clamps.items()):
            size = (self._capacity or {}).get(name, clamp)
            step = min(size - clamp, max(clamp, BUDGET_STEP))
            try:
                taken = room_for is None or room_for(name, step)
            except Exception as exc:  # noqa: BLE001 -- keep the budget, ask next period
                log.error("event=map_probe_failed map=%s error=%r", name, str(exc))
                taken = False
            if not taken:
                continue
            if clamp + step >= size:
                del self._clamps[name]
            else:
                self._clamps[name] = clamp + step
            log.info("event=map_budget_raised map=%s entries=%d max_entries=%d", name,
                     min(clamp + step, size), size)

    def _report_refused(self, result: Plan) -> None:
        """Log, count and tell each Service the maps refused, once, and when it goes in."""
        refused = {f"{ns}/{name}": why for (ns, name), why in sorted(result.refused.items())}
        for service, why in refused.items():
            if service not in self.status.refused:
                self.status.services_refused += 1
                log.error("event=service_refused service=%s reason=%r action=%s", service,
                          why, "kept as the kernel had it; retried every sync")
                self._emit("service_refused", message=f"Service {service} refused: {why}; "
                           f"the kernel keeps what it had of it", namespace=service.split(
                               "/")[0], name=service.split("/", 1)[1], reason=why)
        for service in self.status.refused.keys() - refused.keys():
            log.info("event=service_accepted service=%s reason=%r", service,
                     "room in the maps again, or its change went")
        self.status.refused = refused
        # room freed by this sync's deletions counts only once the kernel has them (they
        # are written last): try the refused again at once rather than a period later
        if refused and any(isinstance(op, (DeleteSlot, DeleteFrontend)) for op in result.ops):
            self._dirty.set()

    def _emit(self, kind: str, **fields) -> None:
        """Tell on_event; an observer's failure is logged, never raised into the loop."""
        if self.on_event is not None:
            try:
                self.on_event(kind, fields)
            except Exception:
                log.exception("event=observer_failed kind=%s", kind)

    def _lost_udp_backends(self, result: Plan) -> dict[int, set[BackendAddr]]:
        """{svc_id: backends it no longer has} for UDP service ports this plan changed
        (before commit: self._applied still holds what the kernel had)."""
        touched = {op.svc_id for op in result.ops if isinstance(op, (PutSlot, DeleteSlot))}
        lost = {}
        for svc_id in touched:
            old = self._applied.get(svc_id)
            if old is None or not any(f.protocol is Protocol.UDP for f in old.frontends):
                continue
            new = result.result.get(svc_id)
            gone = set(old.backends) - set(new.backends if new else ())
            if gone:
                lost[svc_id] = gone
        return lost

    def _forget_flows(self, lost: dict[int, set[BackendAddr]]) -> None:
        """kube-proxy clears conntrack entries of UDP endpoints that went away (TCP flows
        are left alone: a terminating backend keeps its connections). One scan of the
        flow table at a time; what comes meanwhile goes into the next."""
        for svc_id, backends in lost.items():
            self._lost_flows.setdefault(svc_id, set()).update(backends)
        if self._flow_task is not None and not self._flow_task.done():
            return
        batch, self._lost_flows = self._lost_flows, {}
        if not batch:
            return
        self._flow_task = asyncio.get_running_loop().run_in_executor(
            None, self.flow_cleanup, batch)
        self._flow_task.add_done_callback(self._flows_forgotten)

    def _flows_forgotten(self, task: asyncio.Future) -> None:
        if task.exception() is not None:
            log.error("event=flow_cleanup_failed error=%r", str(task.exception()))
        elif task.result():
            log.info("event=flows_forgotten entries=%d reason=udp_backend_gone",
                     task.result())
        if self._lost_flows:
            self._forget_flows({})

    def _still_served(self, frontend: FrontendKey, backend: BackendAddr) -> bool:
        """Whether a socket sent to `frontend` and balanced to `backend` is still right."""
        svc_id = self._plan.owners.get(frontend) if self._plan else None
        kernel = self._applied.get(svc_id) if svc_id is not None else None
        return kernel is not None and backend in kernel.backends

    def _inputs(self, full: bool, dirty: set[tuple[str, str]]):
        """What _compute reads, copied on the loop (the source keeps changing the dicts)."""
        node = NodeContext.from_node(self._node_object, self.node.node_name,
                                     self.node.node_ips, self.node.node_port_cidrs)
        if full:
            return node, list(self._services.values()), \
                [s for by_key in self._slices.values() for s in by_key.values()]
        return node, {name: (self._services.get(name),
                             list(self._slices.get(name, {}).values())) for name in dirty}

    def _compute(self, full: bool, inputs, keep: frozenset[int]):
        """(plan, desired state, desired keys by service): everything, or only what the
        dirty services produce, planned against the last plan the kernel holds."""
        with _gc_paused():
            if self.service_health is not None:     # from the same snapshot, same thread
                self._next_health = self._health_for(full, inputs)
            return self._compute_full(inputs, keep) if full else \
                self._compute_changes(inputs)

    def _health_for(self, full: bool, inputs) -> dict:
        """Health check parts of every service: all of them, or the last ones with the
        dirty services' recomputed (a sync's cost follows its change)."""
        if full:
            node, services, slices = inputs
            return service_health_parts(services, slices, node)
        node, by_name = inputs
        parts = dict(self._health_parts)
        for name, (service, slices) in by_name.items():
            parts.pop(name, None)
            if service is not None:
                parts.update(service_health_parts([service], slices, node))
        return parts

    def _report_health(self) -> None:
        """Hand the health checks to service_health; its failure is logged, not raised."""
        try:
            self.service_health(by_port(self._health_parts))
        except Exception:
            log.exception("event=service_health_update_failed")

    def _compute_full(self, inputs, keep: frozenset[int]):
        node, services, slices = inputs
        desired = by_scope(self._servable(model.desired_state(services, slices, node)))
        parts: dict[tuple[str, str], set] = {}
        for key in desired:
            parts.setdefault((key[0].namespace, key[0].name), set()).add(key)
        result = plan(desired, self._applied, keep_unclaimed=keep,
                      maglev_m=self.maglev_m, capacity=self._budget())
        return result, desired, {k: frozenset(v) for k, v in parts.items()}

    def _compute_changes(self, inputs):
        node, by_name = inputs
        desired, parts = Overlay(self._desired), Overlay(self._parts)
        changed = set()
        for name, (service, slices) in by_name.items():
            part = by_scope(self._servable(model.desired_state(
                [service] if service else [], slices, node)))
            old_keys = parts.pop(name, frozenset())
            for key in old_keys - part.keys():
                del desired[key]
                changed.add(key)
            for key, state in part.items():
                if desired.get(key) != state:
                    desired[key] = state
                    changed.add(key)
            if part:
                parts[name] = frozenset(part)
        return plan_changes(desired, self._plan, changed, self.maglev_m,
                            self._budget()), desired, parts

    def _servable(self, desired: DesiredState) -> DesiredState:
        """Only what the datapath can serve; the rest is logged once per service port."""
        out: DesiredState = {}
        for key, state in desired.items():
            if self.maps.supports(key[1], key[0].protocol):
                out[key] = state
            elif key not in self._unsupported:
                self._unsupported.add(key)
                log.warning("event=service_port_unsupported service_port=%s family=IPv%d "
                            "reason=%r", key[0], key[1], "not in this datapath yet; skipped")
        return out


def _log_cleanup(task: asyncio.Future) -> None:
    if task.exception() is not None:
        log.error("event=udp_cleanup_failed error=%r", str(task.exception()))
    elif task.result():
        log.info("event=stale_udp_sockets_closed count=%d", task.result())


@contextlib.contextmanager
def _gc_paused():
    """A sync allocates many small objects and no cycles: letting the collector walk the
    whole heap meanwhile tripled its time (10k services x 10 endpoints: 1.3 s -> 0.4 s)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
