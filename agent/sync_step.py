"""The sync step: a snapshot of the objects -> model -> by_scope parts -> planner, for every
Service or only the changed ones, and the desired state the kernel holds once it took it.
compute() runs in a thread on the snapshot; commit() on the loop, after the kernel took it."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass

from agent import model
from agent.model.health import service_health_parts
from agent.model.types import DesiredState, Protocol, ServicePortName
from agent.planner import (
    AppliedState,
    Overlay,
    PartKey,
    Plan,
    by_scope,
    commit,
    plan,
    plan_changes,
)

log = logging.getLogger(__name__)

ServiceName = tuple[str, str]          # (namespace, name)


@dataclass(frozen=True, slots=True)
class Computed:
    """One step's outcome, not yet in the kernel (its mappings may be overlays)."""
    plan: Plan
    desired: DesiredState                        # by_scope parts, keyed by PartKey
    parts: dict[ServiceName, frozenset[PartKey]]  # each Service's desired keys
    health: dict | None                          # health check parts; None: not asked


class SyncStep:
    def __init__(self, supports: Callable[[int, Protocol], bool], maglev_m: int,
                 with_health: bool) -> None:
        self._supports = supports      # whether the datapath serves (family, protocol)
        self._maglev_m = maglev_m
        self._with_health = with_health
        # what the kernel holds, as desired state (the last committed step)
        self.desired: DesiredState = {}
        self.parts: dict[ServiceName, frozenset[PartKey]] = {}
        self.health_parts: dict = {}   # service -> (health check port, its health)
        self._unsupported: set[tuple[ServicePortName, int]] = set()

    def compute(self, full: bool, inputs, keep: frozenset[int], applied: AppliedState,
                previous: Plan | None, budget: dict[str, int] | None) -> Computed:
        """Everything (a full plan against `applied`), or only what the changed services
        of the snapshot produce, planned against `previous`, the plan the kernel holds.
        inputs None (full only): nothing changed since the last commit; the desired
        state the kernel took then is planned against `applied` again."""
        with _gc_paused():
            if inputs is None:
                return Computed(plan(self.desired, applied, keep_unclaimed=keep,
                                     maglev_m=self._maglev_m, capacity=budget),
                                self.desired, self.parts, None)
            # from the same snapshot, same thread
            health = self._health_for(full, inputs) if self._with_health else None
            if full:
                return self._compute_full(inputs, keep, applied, budget, health)
            return self._compute_changes(inputs, previous, budget, health)

    def commit(self, computed: Computed) -> tuple[Plan, DesiredState]:
        """The kernel holds it: write the overlays of an incremental step into the record."""
        result = commit(computed.plan)
        desired, parts = computed.desired, computed.parts
        if isinstance(desired, Overlay):
            desired, parts = desired.commit(), parts.commit()
        self.desired, self.parts = desired, parts
        if computed.health is not None:
            self.health_parts = computed.health
        return result, desired

    def _health_for(self, full: bool, inputs) -> dict:
        """Health check parts of every service: all of them, or the last ones with the
        dirty services' recomputed (a sync's cost follows its change)."""
        if full:
            node, services, slices = inputs
            return service_health_parts(services, slices, node)
        node, by_name = inputs
        parts = dict(self.health_parts)
        for name, (service, slices) in by_name.items():
            parts.pop(name, None)
            if service is not None:
                parts.update(service_health_parts([service], slices, node))
        return parts

    def _compute_full(self, inputs, keep: frozenset[int], applied: AppliedState,
                      budget: dict[str, int] | None, health: dict | None) -> Computed:
        node, services, slices = inputs
        desired = by_scope(self._servable(model.desired_state(services, slices, node)))
        parts: dict[ServiceName, set[PartKey]] = {}
        for key in desired:
            parts.setdefault((key.name.namespace, key.name.name), set()).add(key)
        result = plan(desired, applied, keep_unclaimed=keep, maglev_m=self._maglev_m,
                      capacity=budget)
        return Computed(result, desired, {k: frozenset(v) for k, v in parts.items()}, health)

    def _compute_changes(self, inputs, previous: Plan, budget: dict[str, int] | None,
                         health: dict | None) -> Computed:
        node, by_name = inputs
        desired, parts = Overlay(self.desired), Overlay(self.parts)
        changed = set()
        # one model call for every changed service (each service's part is its own: the
        # full step groups them the same way), not one per service: a churn of thousands
        # of services paid the per-call cost thousands of times
        everything = by_scope(self._servable(model.desired_state(
            [service for service, _ in by_name.values() if service is not None],
            [s for _, slices in by_name.values() for s in slices], node)))
        grouped: dict[ServiceName, dict] = {}
        for key, state in everything.items():
            grouped.setdefault((key.name.namespace, key.name.name), {})[key] = state
        for name in by_name:
            part = grouped.get(name, {})
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
        result = plan_changes(desired, previous, changed, self._maglev_m, budget)
        return Computed(result, desired, parts, health)

    def _servable(self, desired: DesiredState) -> DesiredState:
        """Only what the datapath can serve; the rest is logged once per service port."""
        out: DesiredState = {}
        for key, state in desired.items():
            name, family = key
            if self._supports(family, name.protocol):
                out[key] = state
            elif key not in self._unsupported:
                self._unsupported.add(key)
                log.warning("event=service_port_unsupported service_port=%s family=IPv%d "
                            "reason=%r", name, family, "not in this datapath yet; skipped")
        return out


# --- the collector around large syncs --------------------------------------------------
# A 10k x 10 world is ~1.5M objects with hardly a cycle among them (a gen-2 collection at
# that size finds 0-50), yet every gen-2 collection walks them all: 0.3-1.2 s each, two
# while the first listing is read and three while every EndpointSlice is rewritten.

START_PAUSE_LONGEST = 120.0    # s: a source that never lists does not keep it off longer
_start_pause: list = []        # the timer that ends the start pause, while it runs


def pause_collector_for_start() -> None:
    """No cyclic collection while the first listing is read and synced (on the loop):
    freeze_after_full_sync() ends the pause, or START_PAUSE_LONGEST does."""
    if gc.isenabled() and not _start_pause:
        gc.disable()
        _start_pause.append(asyncio.get_running_loop().call_later(
            START_PAUSE_LONGEST, _end_start_pause))


def _end_start_pause() -> None:
    if _start_pause:
        _start_pause.pop().cancel()
        gc.enable()


def freeze_after_full_sync() -> None:
    """What a full sync left in memory is long-lived: out of the collector's walks
    (gc.freeze; reference counting still frees it when a later sync drops it). Cycles
    are collected first: after the start pause, once over everything (the start's garbage
    cycles, ~6 MiB at 10k x 10, would stay otherwise); later the young ones only."""
    if _start_pause:
        _end_start_pause()
        gc.collect()
    elif gc.isenabled():
        gc.collect(1)
    gc.freeze()


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
