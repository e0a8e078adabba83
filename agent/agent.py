"""Wires the rooms together: source events -> model -> planner -> datapath, in one loop.

The Agent is assembled as kube-proxy's Proxier is, from small parts, each in its file: a
change tracker (changes.py), a map budget (budget.py), a sync runner (runner.py: at most
one sync per min_sync_period, at least one per sync_period), the sync step (sync_step.py:
model and planner, in a thread so the API stays responsive), the cleanup of what the
kernel no longer serves (cleanup.py) and the read model the API reads (status.py)."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol as TypingProtocol

from agent.budget import MapBudget
from agent.changes import ChangeTracker
from agent.cleanup import (
    FlowCleanup,
    StaleStateCleaner,
    UdpCleanup,
    gone_ids,
    lost_udp_backends,
)
from agent.model.health import ServiceHealth, by_port
from agent.model.types import NodeContext
from agent.planner import (
    AppliedState,
    BackendAddr,
    DeleteFrontend,
    DeleteSlot,
    FrontendKey,
    MapFullError,
    Plan,
)
from agent.runner import SyncRunner
from agent.service_maps import ServiceMaps
from agent.sources.events import HeldBack, ObjectChange
from agent.status import AgentStatus, AppliedServicePort, AppliedView
from agent.sync_step import SyncStep, freeze_after_full_sync

__all__ = ["Agent", "AgentStatus", "AppliedServicePort", "AppliedView", "ServiceMaps",
           "Source"]

log = logging.getLogger(__name__)

# more services than this share changed: recompute everything. The sync step's compute
# at 10k x 10, CPU: a quarter changed 0.7 s incremental vs 1.5-1.7 s full, a half about
# even (1.6 / 1.9 s), all of them 2.5-3.3 vs 1.8-2.3 s (issue 16, third pass)
FULL_SYNC_SHARE = 0.5
# an incremental sync of at least this many services leaves much long-lived memory too:
# frozen like a full sync's (a churn of 10k x 10 arrives as incremental batches)
FREEZE_AFTER_SERVICES = 1000


class Source(TypingProtocol):
    def changes(self) -> AsyncIterator[list[ObjectChange]]: ...
    # input that cannot be read now, as of the last batch (read on the loop); its objects
    # stay listed at their last good version, and only what is `unknown` keeps kernel
    # state adopted at start
    @property
    def held_back(self) -> tuple[HeldBack, ...]: ...
    # optional: on_event, set by the agent, is told of bad input the source found (on the
    # loop); it reaches the API's event stream as the agent's own events do


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
    udp_cleanup: UdpCleanup | None = None
    # Maglev table size for traffic from outside the node (--lb-algorithm maglev); 0: random
    maglev_m: int = 0
    # forgets the tracked UDP flows (TC path) of backends their service port lost, given
    # {svc_id: lost backends}; returns how many entries went
    flow_cleanup: FlowCleanup | None = None
    # told of each sync, failure and conflict as (kind, fields), on the loop; must not
    # block (the API's event hub queues per client and drops for slow ones)
    on_event: Callable[[str, dict], None] | None = None
    # given, after each sync the kernel accepted, on the loop: every healthCheckNodePort
    # with the service it reports on and its ready endpoints here (model.health)
    service_health: Callable[[dict[int, ServiceHealth]], None] | None = None
    # after each full sync, what it left in memory leaves the collector's walks
    # (sync_step.freeze_after_full_sync; the agent process's, not a test's)
    freeze_heap: bool = False

    def __post_init__(self) -> None:
        # the parts, wired with what they were given at construction
        self._changes = ChangeTracker(self.node.node_name)
        self._budget = MapBudget(self.maps, self.maglev_m)
        self._step = SyncStep(self.maps.supports, self.maglev_m,
                              with_health=self.service_health is not None)
        self._cleaner = StaleStateCleaner(self.maps, self.flow_cleanup, self.udp_cleanup,
                                          self._still_served)
        # the record of what the kernel holds
        self._applied: AppliedState = {}
        self._plan: Plan | None = None     # the last plan the kernel holds; None: replan all
        self._kernel_stale = False         # a write failed: re-read the kernel before planning
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
        self._budget.read()
        log.info("event=adopted service_ports=%d", len(self._applied))
        if hasattr(self.source, "on_event"):
            self.source.on_event = lambda kind, fields: self._emit(kind, **fields)
        watcher = asyncio.create_task(self._watch_source(), name="source")
        runner = SyncRunner(self._sync_once, self.min_sync_period, self.sync_period,
                            self._dirty, self._stop)
        try:
            await runner.run(self._listed)
        finally:
            watcher.cancel()
        return 1 if self.status.failure else 0

    def stop(self) -> None:
        self._stop.set()

    async def _watch_source(self) -> None:
        try:
            async for batch in self.source.changes():
                self._changes.record_batch(batch)
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

    async def _sync_once(self, reread_kernel: bool = False) -> bool:
        """One model -> planner -> datapath pass. Never raises: a failure is logged and
        counted, and the kernel is re-read so the next attempt starts from the truth."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        changes = self._changes.checkout()
        since, dirty = changes.since, changes.services
        periodic = reread_kernel and not self._kernel_stale
        reread_kernel = reread_kernel or self._kernel_stale
        keep, reconcile, why = self._kept_adopted()
        full = (reread_kernel or self._plan is None or bool(keep) or reconcile
                or changes.node_changed
                or len(dirty) > FULL_SYNC_SHARE * max(self._changes.service_count, 1))
        try:
            if reread_kernel:
                self._applied = await loop.run_in_executor(None, self.maps.read_back)
                self._kernel_stale = False
                self._budget.after_reread(self._applied, periodic)
            # the model and the planner run in a thread on a snapshot of the objects: a
            # large sync takes seconds of CPU, and the API must answer meanwhile. A full
            # sync with nothing changed since the last one the kernel took (the periodic
            # re-read) plans the kernel against that sync's desired state: no model.
            again = (full and not dirty and not changes.node_changed and not keep
                     and not reconcile and self._plan is not None)
            inputs = None if again else self._changes.snapshot(full, dirty, self.node)
            computed = await loop.run_in_executor(
                None, self._step.compute, full, inputs, keep, self._applied, self._plan,
                self._budget.limits())
            result = computed.plan
            for conflict in result.conflicts:
                log.warning("event=frontend_conflict detail=%r", conflict)
                self._emit("conflict", message=conflict)
            if result.ops:
                await loop.run_in_executor(None, self.maps.apply, result.ops)
        except Exception as exc:
            self.status.sync_errors += 1
            if isinstance(exc, MapFullError):      # the budget was wrong: lower it
                self._budget.refused_insert(exc.map_name)
            log.error("event=sync_failed error=%r action=retry", str(exc),
                      exc_info=not isinstance(exc, OSError))
            # unknown what reached the kernel: the next sync re-reads it and replans all
            self._plan, self._kernel_stale = None, True
            self._changes.not_applied(since)    # still not in the kernel: the oldest stamp
            self._emit("sync_failed", message=str(exc))
            return False
        if since is not None:
            self.status.last_event_to_kernel_seconds = time.monotonic() - since
            self.status.change_syncs += 1
        # service ports gone from the kernel: their ids may be reused, their counters not
        gone = gone_ids(result, self._plan)
        lost = lost_udp_backends(result, self._applied) if self._cleaner.forgets_flows else {}
        # the kernel holds it: write the overlays of an incremental sync into the record
        result, desired = self._step.commit(computed)
        self._plan, self._applied = result, result.result
        if self.service_health is not None:
            self._report_health()
        self._report_refused(result)
        if result.ops:     # the kernel took them: the plan is kept without its op objects
            self._plan = replace(result, ops=())     # (220k at 10k x 10: ~17 MiB)
        kept = ()
        if keep:     # claimed now, or gone from the kernel: no longer kept on suspicion
            self._adopted.intersection_update(result.result)
            self._adopted.difference_update(result.ids.values())
            kept = tuple(sorted(self._adopted))
        self.status.view = AppliedView(result.result, desired, result.ids,
                                       (len(result.result), len(result.owners),
                                        result.slot_total), kept, why, result.usage)
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
        if self.freeze_heap and (full or len(dirty) >= FREEZE_AFTER_SERVICES):
            freeze_after_full_sync()
        await self._cleaner.after_sync(gone, lost, result.removed_udp)
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

    def _still_served(self, frontend: FrontendKey, backend: BackendAddr) -> bool:
        """Whether a socket sent to `frontend` and balanced to `backend` is still right."""
        svc_id = self._plan.owners.get(frontend) if self._plan else None
        kernel = self._applied.get(svc_id) if svc_id is not None else None
        return kernel is not None and backend in kernel.backends

    def _report_health(self) -> None:
        """Hand the health checks to service_health; its failure is logged, not raised."""
        try:
            self.service_health(by_port(self._step.health_parts))
        except Exception:
            log.exception("event=service_health_update_failed")
