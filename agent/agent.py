"""Wires the rooms together: source events -> model -> planner -> datapath, in one loop.

A bounded-frequency runner coalesces events (at most one sync per min_sync_period, at
least one per sync_period); kernel calls run in a thread so the API stays responsive."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol as TypingProtocol

from agent import model
from agent.model.types import (
    DesiredState,
    EndpointSlice,
    ObjectKey,
    Protocol,
    Service,
    ServicePortName,
    ServicePortState,
)
from agent.planner import AppliedState, KernelService, plan
from agent.sources.events import ObjectChange

log = logging.getLogger(__name__)

RETRY_FIRST = 0.5          # seconds before retrying a failed sync; doubles up to RETRY_MAX
RETRY_MAX = 10.0


class Source(TypingProtocol):
    def changes(self) -> AsyncIterator[list[ObjectChange]]: ...
    @property
    def complete(self) -> bool: ...     # False while some input could not be read


class ServiceMaps(TypingProtocol):
    def apply(self, ops) -> None: ...
    def read_back(self) -> AppliedState: ...
    def supports(self, family: int, protocol: Protocol) -> bool: ...


@dataclass(frozen=True, slots=True)
class AppliedServicePort:
    """A service port as the kernel serves it, with the names the API reports."""
    name: ServicePortName
    family: int
    kernel: KernelService
    desired: ServicePortState          # for backend states (ready/terminating) and kinds

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
    failure: str = ""                  # why the agent stopped on its own, if it did
    # From the source delivering a change to the kernel holding it, for the last sync
    # that carried changes (periodic syncs without one do not count).
    last_event_to_kernel_seconds: float = 0.0


@dataclass
class Agent:
    source: Source
    maps: ServiceMaps
    min_sync_period: float = 0.1
    sync_period: float = 30.0
    status: AgentStatus = field(default_factory=AgentStatus)

    def __post_init__(self) -> None:
        self._objects: dict[ObjectKey, Service | EndpointSlice] = {}
        self._applied: AppliedState = {}
        self._desired: DesiredState = {}
        self._ids: dict[tuple[ServicePortName, int], int] = {}
        self._unsupported: set[tuple[ServicePortName, int]] = set()
        self._pending_since: float | None = None   # oldest change not yet in the kernel
        self._listed = asyncio.Event()     # the source's first, complete listing arrived
        self._dirty = asyncio.Event()
        self._stop = asyncio.Event()

    async def run(self) -> int:
        """Adopt what the kernel holds, then sync whenever the source changes. Returns the
        exit code: 0 when stopped, 1 when the source ended on its own."""
        loop = asyncio.get_running_loop()
        self._applied = await loop.run_in_executor(None, self.maps.read_back)
        log.info("event=adopted service_ports=%d", len(self._applied))
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
                    if change.obj is None:
                        self._objects.pop(change.key, None)
                    else:
                        self._objects[change.key] = change.obj
                self._listed.set()
                self._dirty.set()
            self.status.failure = "source ended"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.status.failure = f"source failed: {exc}"
            log.exception("event=source_failed")
        # What is programmed keeps serving (the kernel holds it); the agent exits so that
        # its supervisor restarts it with a fresh source.
        log.error("event=agent_exiting reason=%r programs=left_attached", self.status.failure)
        self._stop.set()

    async def _sync_loop(self) -> None:
        # Never program a half-listed world: wait for the complete first listing.
        if await self._wait(self._listed, None):
            return
        last = 0.0
        retry = RETRY_FIRST
        reread = False
        while not self._stop.is_set():
            wait = self.min_sync_period - (time.monotonic() - last)
            if wait > 0 and await self._wait(self._stop, wait):
                return
            self._dirty.clear()
            last = time.monotonic()
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
        try:
            if reread_kernel:
                self._applied = await loop.run_in_executor(None, self.maps.read_back)
            services = [o for o in self._objects.values() if isinstance(o, Service)]
            slices = [o for o in self._objects.values() if isinstance(o, EndpointSlice)]
            desired = self._servable(model.desired_state(services, slices))
            result = plan(desired, self._applied, keep_unclaimed=not self.source.complete)
            for conflict in result.conflicts:
                log.warning("event=frontend_conflict detail=%r", conflict)
            if result.ops:
                await loop.run_in_executor(None, self.maps.apply, result.ops)
        except Exception as exc:
            self.status.sync_errors += 1
            log.error("event=sync_failed error=%r action=retry", str(exc),
                      exc_info=not isinstance(exc, OSError))
            try:
                self._applied = await loop.run_in_executor(None, self.maps.read_back)
            except Exception as read_exc:
                log.error("event=read_back_failed error=%r", str(read_exc))
            self._publish()
            if since is not None:       # still not in the kernel: keep the oldest stamp
                self._pending_since = min(since, self._pending_since or since)
            return False
        if since is not None:
            self.status.last_event_to_kernel_seconds = time.monotonic() - since
        self._applied, self._desired, self._ids = result.result, desired, result.ids
        self._publish()
        elapsed = time.perf_counter() - started
        self.status.syncs += 1
        self.status.last_sync_unix = time.time()
        self.status.last_sync_seconds = elapsed
        if not self.status.synced or result.ops:
            log.info("event=%s service_ports=%d ops=%d seconds=%.3f",
                     "sync" if self.status.synced else "first_sync", len(desired),
                     len(result.ops), elapsed)
        self.status.synced = True
        return True

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

    def _publish(self) -> None:
        """The API's view: what the kernel holds, named by the last plan's ids."""
        self.status.services = tuple(
            AppliedServicePort(key[0], key[1], self._applied[svc_id], self._desired[key])
            for key, svc_id in sorted(self._ids.items(), key=lambda kv: str(kv[0][0]))
            if svc_id in self._applied and key in self._desired)


def backend_count(services: tuple[AppliedServicePort, ...]) -> int:
    return len({(b.address, b.port) for s in services for b in s.kernel.backends})
