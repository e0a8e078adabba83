"""Capacity: the entries a plan takes in each budgeted map, and which Services do not
fit. plan() and plan_changes() share one fit-to-capacity loop (fit_to_capacity). Pure."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Container, Iterable, Mapping
from ipaddress import IPv4Address, IPv6Address
from operator import attrgetter

from agent import maglev
from agent.planner.kernel import (
    MAGLEV_ROW,
    SVC_F_MAGLEV,
    FrontendKey,
    KernelService,
    Plan,
    PutFrontend,
    PutMaglev,
    PutRange,
    PutSlot,
)
from agent.planner.scopes import ServiceKey, ServiceName, service_of

# Entries each budgeted map holds at most, by its name in bpf/maps.h (BUDGETED_MAPS). The
# pinned maps' real max_entries; a map not named is unbounded.
Capacity = Mapping[str, int]


def frontend_map(family: int) -> str:
    return f"bpfp_svc{family}"


def slot_map(family: int) -> str:
    return f"bpfp_slot{family}"


RANGE_MAP, MAGLEV_MAP = "bpfp_srcrange", "bpfp_maglev"
# checked against agent/datapath/layout.py MAPS by tests/unit/test_datapath_config.py
BUDGETED_MAPS = (frontend_map(4), frontend_map(6), slot_map(4), slot_map(6), RANGE_MAP,
                 MAGLEV_MAP)
# plans with the Services given (-> why) left as the kernel holds them; returns the plan
# and the keys it planned (whose Services may be refused)
Attempt = Callable[[dict[ServiceName, str]], tuple[Plan, Iterable[ServiceKey]]]


def fit_to_capacity(attempt: Attempt, capacity: Capacity | None,
                    baseline: Mapping[str, int], applied: Mapping[int, KernelService],
                    in_kernel: Callable[[], Container[FrontendKey]], maglev_m: int) -> Plan:
    """The plan of attempt() with every Service whose change would overflow a map refused
    whole (Plan.refused), by name order (see refusals): held Services grow until the plan
    fits or holding more would not change it. baseline: what the kernel holds in each map
    (applied's usage); in_kernel(): the frontends it holds, asked only when over."""
    held: dict[ServiceName, str] = {}
    while True:
        p, planned = attempt(held)
        if not capacity or fits(baseline, p.usage, capacity):
            return p
        more = refusals(costs(p, applied, in_kernel().__contains__, maglev_m,
                              {p.ids[k]: service_of(k) for k in planned if k in p.ids}),
                        baseline, capacity)
        if more.keys() <= held.keys():
            return p
        held.update((k, v) for k, v in more.items() if k not in held)


def maglev_rows(maglev_m: int) -> int:
    return -(-(maglev_m or maglev.M_MAX) // MAGLEV_ROW)


_FRONTEND_MAP = {IPv4Address: frontend_map(4), IPv6Address: frontend_map(6)}
_ADDRESS = attrgetter("address")


def map_usage(services: Iterable[KernelService], maglev_m: int) -> dict[str, int]:
    """Entries the service ports take in each budgeted map."""
    used: Counter = Counter()
    slots: dict[int, int] = {}         # keys as before: a family once a port has it
    ranges = maglev_entries = 0
    seen = False
    rows = maglev_rows(maglev_m)
    for s in services:
        # the frontends' maps by their address type, counted in C (a full plan counts
        # every frontend twice)
        used.update(map(_FRONTEND_MAP.__getitem__, map(type, map(_ADDRESS, s.frontends))))
        slots[s.family] = slots.get(s.family, 0) + len(s.backends) + len(s.stray_slots)
        seen = True
        ranges += len(s.source_ranges)
        if s.flags & SVC_F_MAGLEV:
            maglev_entries += rows
        maglev_entries += s.stray_maglev_rows
    for family, count in slots.items():
        used[slot_map(family)] += count
    if seen:
        used[RANGE_MAP] += ranges
        used[MAGLEV_MAP] += maglev_entries
    return dict(used)


def fits(baseline: Mapping[str, int], usage: Mapping[str, int], capacity: Capacity) -> bool:
    """Cheap and sure: every entry of the result written anew on top of what the kernel
    holds (deletions come last, so a map peaks before them) still fits."""
    return all(baseline.get(m, 0) + usage.get(m, 0) <= n for m, n in capacity.items())


def costs(p: Plan, applied: Mapping[int, KernelService],
          in_kernel: Callable[[FrontendKey], bool], maglev_m: int,
          service_by_id: Mapping[int, ServiceName]) -> dict[ServiceName, Counter]:
    """Entries each Service's writes add to each map: keys the kernel does not hold yet
    (an update of a key it holds needs no room). Slots of kept entries add nothing."""
    by_service: dict[ServiceName, Counter] = {}
    for op in p.ops:
        svc_id = getattr(op, "svc_id", None)
        if svc_id not in service_by_id:
            continue
        old = applied.get(svc_id)
        if isinstance(op, PutSlot):
            new = old is None or (op.slot >= len(old.backends)
                                  and op.slot not in old.stray_slots)
            entry = slot_map(op.family)
        elif isinstance(op, PutFrontend):
            new, entry = not in_kernel(op.frontend), frontend_map(op.frontend.address.version)
        elif isinstance(op, PutRange):
            new, entry = old is None or op.network not in old.source_ranges, RANGE_MAP
        elif isinstance(op, PutMaglev):
            new = old is None or not old.flags & SVC_F_MAGLEV
            entry = MAGLEV_MAP
        else:
            continue
        if new:
            cost = by_service.setdefault(service_by_id[svc_id], Counter())
            cost[entry] += maglev_rows(maglev_m) if entry == MAGLEV_MAP else 1
    return by_service


def refusals(by_service: Mapping[ServiceName, Counter], baseline: Mapping[str, int],
             capacity: Capacity) -> dict[ServiceName, str]:
    """Services whose new entries do not fit beside the others', and why. By name: the
    same Services stay refused sync after sync, and the first by name goes in when room
    returns. Removals free room only once the kernel has them (they are written last)."""
    room = {m: n - baseline.get(m, 0) for m, n in capacity.items()}
    refused = {}
    for service in sorted(by_service):
        cost = by_service[service]
        short = sorted(m for m, n in cost.items() if m in room and n > room[m])
        if short:
            refused[service] = "; ".join(
                f"{m} full: {max(room[m], 0)} of {capacity[m]} entries free, the change "
                f"needs {cost[m]}" for m in short)
            continue
        for m, n in cost.items():
            if m in room:
                room[m] -= n
    return refused

