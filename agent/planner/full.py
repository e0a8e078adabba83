"""The full plan: every desired service port against all the kernel holds (at start,
after a failed write, on the periodic re-read, or when much changed). Pure."""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace

from agent.model.types import DesiredState
from agent.planner.capacity import Capacity, fit_to_capacity, map_usage
from agent.planner.diff import diff
from agent.planner.entries import claim, entry, frontend_key, shrunk
from agent.planner.kernel import AppliedState, FrontendKey, KernelService, Plan
from agent.planner.scopes import (
    ServiceKey,
    ServiceName,
    assign_ids,
    name_order,
    service_key,
    service_of,
)


def plan(desired: DesiredState, applied: Mapping[int, KernelService],
         keep_unclaimed: Collection[int] = (), maglev_m: int = 0,
         capacity: Capacity | None = None) -> Plan:
    """The full plan. Backends first, then the frontend that points at them; on removal
    the frontend goes first. The phases are global, so the order also holds when a
    frontend moves from one service port to another within one sync.

    A frontend claimed by two service ports stays with the one the kernel already gives
    it to; between new claimants the first by name wins (no flapping on restarts).
    keep_unclaimed: ids of service ports in the kernel kept, not deleted, when nothing
    desired claims them (adopted at start while the source has input it never read: they
    may be that input's); the frontends a desired port claims go to it all the same.
    maglev_m: Maglev table size for frontends of external kinds; 0: random choice.
    capacity: a Service whose change would overflow a map is refused whole (Plan.refused),
    by name order; see capacity.fit_to_capacity."""
    keys = sorted(map(service_key, desired), key=name_order)

    def attempt(held: dict[ServiceName, str]) -> tuple[Plan, list[ServiceKey]]:
        return _plan_all(desired, keys, applied, keep_unclaimed, maglev_m, held), keys

    return fit_to_capacity(attempt, capacity, map_usage(applied.values(), maglev_m), applied,
                           lambda: {f for s in applied.values() for f in s.frontends},
                           maglev_m)


def _plan_all(desired: DesiredState, order: list[ServiceKey],
              applied: Mapping[int, KernelService], keep_unclaimed: Collection[int],
              maglev_m: int, held: dict[ServiceName, str]) -> Plan:
    """plan() with the Services in `held` left as the kernel holds them; `order`: the
    desired keys, named and by name."""
    ids = assign_ids(order, {s.name_hash: s.svc_id for s in applied.values() if s.name_hash},
                     applied)
    before = {f: s.svc_id for s in applied.values() for f in s.frontends}
    owners: dict[FrontendKey, int] = {}
    for key in order:                              # incumbents first
        if service_of(key) in held:                # keeps every frontend it has
            old = applied.get(ids[key])
            owners.update(dict.fromkeys(old.frontends if old else (), ids[key]))
            continue
        for f in desired[key].frontends:
            fkey = frontend_key(f, key)
            if before.get(fkey) == ids[key]:
                owners.setdefault(fkey, ids[key])
    conflicts: list[str] = []
    losers: dict[FrontendKey, set] = {}
    result: AppliedState = {}
    refused_keys = set()
    last: list = []         # entry()'s previous backends and slot values
    for key in order:
        svc_id = ids[key]
        if service_of(key) in held:
            refused_keys.add(key)
            old = applied.get(svc_id)
            if old is None:           # new: not served, and its id is not taken
                del ids[key]
            else:                     # as the kernel has it, less the backends that left
                result[svc_id] = shrunk(old, desired[key])
            continue
        frontends = claim(key, desired[key], svc_id, owners, losers, conflicts)
        if frontends:     # else nothing can reach it: write no slots for it
            result[svc_id] = entry(key, desired[key], svc_id, frontends,
                                   applied.get(svc_id), maglev_m, last)
    claimed = set(ids.values()) if keep_unclaimed else set()
    for svc_id in sorted(keep_unclaimed):
        old = applied.get(svc_id)
        if old is not None and svc_id not in claimed:
            kept = tuple([f for f in old.frontends if f not in owners])
            if kept:
                result[svc_id] = replace(old, frontends=kept, stray_slots=(),
                                         stale_frontends=frozenset())
                owners.update(dict.fromkeys(kept, svc_id))
    ops, removed = diff(applied, result, owners, applied.keys() | result.keys(), maglev_m)
    return Plan(ops, result, ids, tuple(conflicts), owners,
                {f: frozenset(k) for f, k in losers.items()},
                sum(len(s.backends) for s in result.values()),
                max((*applied, *result, 0)) + 1, removed,
                map_usage(result.values(), maglev_m), dict(held), frozenset(refused_keys))
