"""The incremental plan: only the service ports that changed since the plan the kernel
holds, its result an overlay on that plan's (a sync costs what changed). Pure."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from agent.planner.capacity import Capacity, fit_to_capacity, map_usage
from agent.planner.diff import diff
from agent.planner.entries import claim, entry, frontend_key, shrunk
from agent.planner.kernel import FrontendKey, Plan
from agent.planner.overlay import Overlay
from agent.planner.scopes import ServiceKey, ServiceName, name_order, service_key, service_of


def plan_changes(desired: Mapping, previous: Plan, changed: Iterable[tuple],
                 maglev_m: int = 0, capacity: Capacity | None = None) -> Plan:
    """The same operations as plan(), for the service ports in `changed` only (added,
    modified or removed since `previous`, whose result the kernel holds): the cost of a
    sync follows the change, not the cluster. Frontends keep their owners. The result
    reads through to previous's; commit() it once the kernel holds it. The ports of
    Services previous refused are tried again; capacity as for plan()."""
    changed = set(map(service_key, changed)) | previous.refused_keys

    def attempt(held: dict[ServiceName, str]) -> tuple[Plan, list[ServiceKey]]:
        return _plan_changes(desired, previous, changed, maglev_m, held)

    return fit_to_capacity(attempt, capacity, previous.usage, previous.result,
                           lambda: previous.owners, maglev_m)


def _plan_changes(desired: Mapping, previous: Plan, changed: set[ServiceKey], maglev_m: int,
                  held: dict[ServiceName, str]) -> tuple[Plan, list[ServiceKey]]:
    """plan_changes() with the Services in `held` left as previous has them (their
    removed ports excepted: a removal only frees room), and the keys it planned."""
    result, ids, owners = Overlay(previous.result), Overlay(previous.ids), \
        Overlay(previous.owners)
    refused_keys = {k for k in changed if k in desired and service_of(k) in held}
    changed = sorted(set(changed) - refused_keys, key=name_order)
    released: set[FrontendKey] = set()
    touched: set[int] = set()
    for key in refused_keys:           # refused growth, but removals still go: no room needed
        svc_id = ids.get(key)
        old = result.get(svc_id) if svc_id is not None else None
        if old is not None and (new := shrunk(old, desired[key])) != old:
            result[svc_id] = new
            touched.add(svc_id)
    for key in changed:                            # removals free their frontends first
        if key in desired:
            continue
        svc_id = ids.pop(key, None)
        old = result.pop(svc_id, None) if svc_id is not None else None
        if old is not None:
            touched.add(svc_id)
            for f in old.frontends:
                if owners.get(f) == svc_id:
                    del owners[f]
                    released.add(f)
    for key in changed:                            # so do frontends a port no longer wants
        svc_id = ids.get(key)
        old = result.get(svc_id) if svc_id is not None else None
        if key in desired and old is not None:
            wanted = {frontend_key(f, key) for f in desired[key].frontends}
            for f in [f for f in old.frontends if f not in wanted]:
                if owners.get(f) == svc_id:
                    del owners[f]
                    released.add(f)
    # A released frontend goes to a port that lost it earlier: re-plan those ports too.
    losers = {f: set(keys) for f, keys in previous.losers.items()}
    again = {k for f in released for k in losers.pop(f, ()) if k in desired}
    refused_keys.update(k for k in again if service_of(k) in held)
    changed = sorted((set(changed) | again) - refused_keys, key=name_order)
    for f in list(losers):
        losers[f].difference_update(changed)
        if not losers[f]:
            del losers[f]
    # never reuse an id within the plan that frees it: a slot write must not land on a
    # table a frontend still points at
    next_id = previous.next_id
    conflicts: list[str] = []
    last: list = []         # entry()'s previous backends and slot values
    for key in changed:
        if key not in desired:
            continue
        state = desired[key]
        svc_id = ids.get(key)
        if svc_id is None:
            svc_id = ids[key] = next_id
            next_id += 1
        touched.add(svc_id)
        old = result.get(svc_id)
        frontends = claim(key, state, svc_id, owners, losers, conflicts)
        for f in [f for f in old.frontends if f not in frontends] if old else ():
            if owners.get(f) == svc_id:
                del owners[f]
        if frontends:
            result[svc_id] = entry(key, state, svc_id, frontends, old, maglev_m, last)
        else:
            result.pop(svc_id, None)
    ops, removed = diff(previous.result, result, owners, touched, maglev_m)
    slot_total = previous.slot_total + sum(
        len(result[i].backends) if i in result else 0 for i in touched) - sum(
        len(previous.result[i].backends) if i in previous.result else 0 for i in touched)
    usage = Counter(previous.usage)
    usage.update(map_usage((result[i] for i in touched if i in result), maglev_m))
    usage.subtract(map_usage((previous.result[i] for i in touched if i in previous.result),
                             maglev_m))
    return Plan(ops, result, ids, tuple(conflicts), owners,
                {f: frozenset(k) for f, k in losers.items()}, slot_total, next_id, removed,
                dict(usage), dict(held), frozenset(refused_keys)), changed

