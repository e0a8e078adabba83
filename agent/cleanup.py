"""After a sync the kernel took: what it no longer serves is forgotten elsewhere too. The
counters of service ports gone, the tracked UDP flows and the connected UDP sockets of
backends a service port lost (kube-proxy clears conntrack entries of UDP endpoints gone)."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from agent.model.types import Protocol
from agent.planner import (
    AppliedState,
    BackendAddr,
    DeleteFrontend,
    DeleteSlot,
    FrontendKey,
    Plan,
    PutSlot,
)
from agent.service_maps import ServiceMaps

log = logging.getLogger(__name__)

# closes connected UDP sockets still aimed at the backends given; still_served(frontend,
# backend) spares sockets that are fine; returns how many it closed
UdpCleanup = Callable[[frozenset[BackendAddr], Callable[[FrontendKey, BackendAddr], bool]],
                      int]
# forgets the tracked UDP flows (TC path) of {svc_id: lost backends}; returns how many went
FlowCleanup = Callable[[dict[int, set[BackendAddr]]], int]


def gone_ids(result: Plan, previous: Plan | None) -> set[int]:
    """Service ports this plan takes out of the kernel: their ids may be reused, their
    counters not (before commit: previous is the plan the kernel held)."""
    gone = {op.svc_id for op in result.ops if isinstance(op, DeleteSlot)}
    if previous is not None:
        gone.update(previous.owners.get(op.frontend) for op in result.ops
                    if isinstance(op, DeleteFrontend))
    return {i for i in gone if i is not None and i not in result.result}


def lost_udp_backends(result: Plan, applied: AppliedState) -> dict[int, set[BackendAddr]]:
    """{svc_id: backends it no longer has} for UDP service ports this plan changed
    (before commit: applied still holds what the kernel had)."""
    touched = {op.svc_id for op in result.ops if isinstance(op, (PutSlot, DeleteSlot))}
    lost = {}
    for svc_id in touched:
        old = applied.get(svc_id)
        if old is None or not any(f.protocol is Protocol.UDP for f in old.frontends):
            continue
        new = result.result.get(svc_id)
        gone = set(old.backends) - set(new.backends if new else ())
        if gone:
            lost[svc_id] = gone
    return lost


class StaleStateCleaner:
    def __init__(self, maps: ServiceMaps, flow_cleanup: FlowCleanup | None,
                 udp_cleanup: UdpCleanup | None,
                 still_served: Callable[[FrontendKey, BackendAddr], bool]) -> None:
        self._maps = maps              # its forget_counters(ids)
        self._flow_cleanup = flow_cleanup
        self._udp_cleanup = udp_cleanup
        self._still_served = still_served
        self._lost_flows: dict[int, set[BackendAddr]] = {}   # UDP flows to forget, next
        self._flow_task: asyncio.Future | None = None

    @property
    def forgets_flows(self) -> bool:
        return self._flow_cleanup is not None

    async def after_sync(self, gone: set[int], lost: dict[int, set[BackendAddr]],
                         removed_udp: frozenset[BackendAddr]) -> None:
        """Counters of `gone` ids (awaited), flows of `lost` backends and sockets aimed at
        `removed_udp` (both in the background). Failures are logged, never raised."""
        loop = asyncio.get_running_loop()
        if gone:
            try:        # before the next sync: a full plan may give the ids out again
                await loop.run_in_executor(None, self._maps.forget_counters, gone)
            except Exception as exc:
                log.error("event=counter_cleanup_failed error=%r", str(exc))
        if lost:
            self._forget_flows(lost)
        if removed_udp and self._udp_cleanup is not None:
            # not awaited: a slow sweep over many pods must not hold back the next sync
            task = loop.run_in_executor(None, self._udp_cleanup, removed_udp,
                                        self._still_served)
            task.add_done_callback(_log_udp_cleanup)

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
            None, self._flow_cleanup, batch)
        self._flow_task.add_done_callback(self._flows_forgotten)

    def _flows_forgotten(self, task: asyncio.Future) -> None:
        if task.exception() is not None:
            log.error("event=flow_cleanup_failed error=%r", str(task.exception()))
        elif task.result():
            log.info("event=flows_forgotten entries=%d reason=udp_backend_gone",
                     task.result())
        if self._lost_flows:
            self._forget_flows({})


def _log_udp_cleanup(task: asyncio.Future) -> None:
    if task.exception() is not None:
        log.error("event=udp_cleanup_failed error=%r", str(task.exception()))
    elif task.result():
        log.info("event=stale_udp_sockets_closed count=%d", task.result())
