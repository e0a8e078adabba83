"""Wires the rooms together: source events -> model -> planner -> datapath, in one loop.

A bounded-frequency runner coalesces events (at most one sync per min_sync_period, at
least one per sync_period); kernel calls run in a thread so the API stays responsive."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from agent import model
from agent.model.types import EndpointSlice, ObjectKey, Service, ServicePortName, ServicePortState
from agent.planner import AppliedState, KernelService, plan
from agent.sources.events import ObjectChange

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AppliedServicePort:
    """A service port as the kernel serves it, with the names the API reports."""
    name: ServicePortName
    family: int
    kernel: KernelService
    desired: ServicePortState          # for backend states (ready/terminating)

    def backend_state(self, address, port) -> str:
        for b in self.desired.backends:
            if b.address == address and b.port == port:
                return b.state.value
        return "unknown"


@dataclass
class AgentStatus:
    synced: bool = False
    syncs: int = 0
    sync_errors: int = 0
    last_sync_unix: float = 0.0
    last_sync_seconds: float = 0.0
    services: tuple[AppliedServicePort, ...] = ()
    source: str = ""
    node_name: str = ""


@dataclass
class Agent:
    changes: Callable[[], AsyncIterator[list[ObjectChange]]]
    maps: object                               # ServiceMaps (BpfServiceMaps in production)
    min_sync_period: float = 0.1
    sync_period: float = 30.0
    status: AgentStatus = field(default_factory=AgentStatus)

    def __post_init__(self) -> None:
        self._objects: dict[ObjectKey, Service | EndpointSlice] = {}
        self._applied: AppliedState = {}
        self._listed = asyncio.Event()     # the source's first, complete listing arrived
        self._dirty = asyncio.Event()
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Adopt what the kernel holds, then sync whenever the source changes."""
        loop = asyncio.get_running_loop()
        self._applied = await loop.run_in_executor(None, self.maps.read_back)
        log.info("event=adopted service_ports=%d", len(self._applied))
        watcher = asyncio.create_task(self._watch_source(), name="source")
        try:
            await self._sync_loop()
        finally:
            watcher.cancel()

    def stop(self) -> None:
        self._stop.set()

    async def _watch_source(self) -> None:
        try:
            async for batch in self.changes():
                for change in batch:
                    if change.obj is None:
                        self._objects.pop(change.key, None)
                    else:
                        self._objects[change.key] = change.obj
                self._listed.set()
                self._dirty.set()
        except asyncio.CancelledError:
            raise
        except Exception:
            # a source that dies must not take the kernel state with it: log and stop
            # syncing new changes; what is programmed keeps serving.
            log.exception("event=source_failed")

    async def _sync_loop(self) -> None:
        # Never program a half-listed world: wait for the complete first listing.
        while not self._listed.is_set():
            if await self._wait(self._listed, None):
                return
        last = 0.0
        while not self._stop.is_set():
            wait = self.min_sync_period - (time.monotonic() - last)
            if wait > 0 and await self._wait(self._stop, wait):
                return
            self._dirty.clear()
            last = time.monotonic()
            await self._sync_once()
            if await self._wait(self._dirty, self.sync_period if self.status.synced else 1.0):
                return

    async def _wait(self, event: asyncio.Event, timeout: float | None) -> bool:
        """Wait for event (or timeout); True when the agent is stopping."""
        stop = asyncio.create_task(self._stop.wait())
        other = asyncio.create_task(event.wait())
        await asyncio.wait({stop, other}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        other.cancel()
        return self._stop.is_set()

    async def _sync_once(self) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        services = [o for o in self._objects.values() if isinstance(o, Service)]
        slices = [o for o in self._objects.values() if isinstance(o, EndpointSlice)]
        desired = model.desired_state(services, slices)
        result = plan(desired, self._applied)
        for conflict in result.conflicts:
            log.warning("event=frontend_conflict detail=%r", conflict)
        try:
            if result.ops:
                await loop.run_in_executor(None, self.maps.apply, result.ops)
        except Exception as exc:
            self.status.sync_errors += 1
            log.error("event=sync_failed ops=%d error=%r action=retry_after_resync",
                      len(result.ops), str(exc))
            # What reached the kernel is unknown: the kernel is the record.
            self._applied = await loop.run_in_executor(None, self.maps.read_back)
            return
        self._applied = result.result
        elapsed = time.perf_counter() - started
        self.status.services = tuple(
            AppliedServicePort(key[0], key[1], result.result[svc_id], desired[key])
            for key, svc_id in sorted(result.ids.items(), key=lambda kv: str(kv[0][0]))
            if svc_id in result.result)
        self.status.syncs += 1
        self.status.last_sync_unix = time.time()
        self.status.last_sync_seconds = elapsed
        if not self.status.synced:
            log.info("event=first_sync service_ports=%d ops=%d seconds=%.3f",
                     len(desired), len(result.ops), elapsed)
        elif result.ops:
            log.info("event=sync service_ports=%d ops=%d seconds=%.3f",
                     len(desired), len(result.ops), elapsed)
        self.status.synced = True


def backend_count(services: tuple[AppliedServicePort, ...]) -> int:
    return len({(b.address, b.port) for s in services for b in s.kernel.backends})

