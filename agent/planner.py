"""Pure diff of desired state against what the kernel holds, into ordered map operations.

Backend slots are written before the frontend that points at them; a frontend is removed
before its slots; unchanged service ports produce no operations."""
from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from agent import maglev
from agent.model.types import (
    DesiredState,
    FrontendKind,
    IPAddress,
    IPNetwork,
    Protocol,
    ServicePortName,
    ServicePortState,
)


@dataclass(frozen=True, slots=True)
class FrontendKey:
    """A frontend as the kernel keys it. scope 1: only traffic from outside the node (the
    TC programs) sees it; they look there first, then at scope 0, which every path sees."""
    address: IPAddress
    port: int
    protocol: Protocol
    scope: int = 0

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}/{self.protocol.value}" + (" (outside)" if self.scope else "")


@dataclass(frozen=True, slots=True)
class BackendAddr:
    address: IPAddress
    port: int


@dataclass(frozen=True, slots=True)
class KernelService:
    """One service port as the kernel holds it: its frontends and its slot table."""
    svc_id: int
    family: int
    frontends: frozenset[FrontendKey]
    backends: tuple[BackendAddr, ...]     # slot i holds backends[i]
    # Left by an interrupted write (a crash between two batches), found by read_back:
    stray_slots: tuple[int, ...] = ()     # slots past the count: invisible, to delete
    stray_maglev_rows: int = 0            # Maglev rows no frontend uses: to delete
    stale_frontends: frozenset[FrontendKey] = frozenset()   # count differs: to rewrite
    name_hash: int = 0                    # port_hash() of the owning service port
    affinity: int = 0                     # ClientIP session affinity timeout, s; 0: none
    flags: int = 0                        # SVC_F_*: how the TC path treats it
    source_ranges: tuple[IPNetwork, ...] = ()   # with SVC_F_SOURCE_RANGES: who may connect
    local: frozenset[BackendAddr] = frozenset()  # backends whose slot carries BE_LOCAL


# svc_value.flags (bpf/maps.h BPFP_SVC_F_*)
SVC_F_SOURCE_RANGES, SVC_F_MAGLEV = 1, 2
# backend4/6.flags (bpf/maps.h BPFP_BE_*): on this node, so never SNATed (Backend.local)
BE_LOCAL = 1
_NO_BACKENDS: frozenset[BackendAddr] = frozenset()

# What the kernel holds, by service id. read_back() rebuilds it from the maps alone.
AppliedState = dict[int, KernelService]


@dataclass(frozen=True, slots=True)
class PutSlot:
    family: int
    svc_id: int
    slot: int
    backend: BackendAddr
    flags: int = 0                        # BE_*


@dataclass(frozen=True, slots=True)
class PutFrontend:
    frontend: FrontendKey
    svc_id: int
    count: int
    name_hash: int = 0
    affinity: int = 0
    flags: int = 0


@dataclass(frozen=True, slots=True)
class DeleteFrontend:
    frontend: FrontendKey


@dataclass(frozen=True, slots=True)
class DeleteSlot:
    family: int
    svc_id: int
    slot: int


@dataclass(frozen=True, slots=True)
class PutRange:
    """A source range allowed to a svc_id's frontends (loadBalancerSourceRanges)."""
    svc_id: int
    network: IPNetwork


@dataclass(frozen=True, slots=True)
class DeleteRange:
    svc_id: int
    network: IPNetwork


@dataclass(frozen=True, slots=True)
class PutMaglev:
    """A svc_id's Maglev lookup table: entry i is a slot number."""
    svc_id: int
    table: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DeleteMaglev:
    svc_id: int
    size: int


MapOp = (PutSlot | PutFrontend | DeleteFrontend | DeleteSlot | PutRange | DeleteRange
         | PutMaglev | DeleteMaglev)


@dataclass(frozen=True, slots=True)
class Plan:
    ops: tuple[MapOp, ...]
    result: AppliedState                          # the kernel's state once ops are applied
    ids: dict[tuple[ServicePortName, int], int]   # which svc_id serves which service port
    conflicts: tuple[str, ...] = field(default=())  # frontends claimed twice
    owners: dict[FrontendKey, int] = field(default_factory=dict)   # frontend -> svc_id
    # service ports that lost a frontend to another: re-planned when it is released
    losers: dict[FrontendKey, frozenset] = field(default_factory=dict)
    slot_total: int = 0            # backend slots in result, kept without a scan
    next_id: int = 1               # above every id in use or just freed
    # UDP backends this plan takes out of a service port: connected sockets may still
    # point at them (agent/datapath/stale_sockets.py closes those)
    removed_udp: frozenset[BackendAddr] = frozenset()
    # entries of result in each budgeted map (Capacity's keys), kept without a scan
    usage: dict[str, int] = field(default_factory=dict)
    # Services whose change did not fit the maps, (namespace, name) -> why: the kernel
    # keeps what it had of them (nothing, when new). Their desired keys are retried by
    # the next plan_changes, so they go in once room returns.
    refused: dict[tuple[str, str], str] = field(default_factory=dict)
    refused_keys: frozenset = frozenset()


class MapFullError(RuntimeError):
    """A map had no room for an insert (E2BIG, ENOSPC). The map writer raises it, naming
    the map as Capacity does, so that the agent can budget below what the map took."""

    def __init__(self, map_name: str, message: str) -> None:
        super().__init__(message)
        self.map_name = map_name


# Entries each budgeted map holds at most, by its name in bpf/maps.h: "bpfp_svc4",
# "bpfp_svc6" (frontends), "bpfp_slot4", "bpfp_slot6" (backend slots), "bpfp_srcrange",
# "bpfp_maglev" (rows). The pinned maps' real max_entries; a map not named is unbounded.
Capacity = Mapping[str, int]
MAGLEV_ROW = 32         # Maglev table entries per bpfp_maglev row (bpf/maps.h)


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
    by name order; see _refusals."""
    baseline = map_usage(applied.values(), maglev_m)
    held: dict[tuple[str, str], str] = {}
    while True:
        p = _plan_all(desired, applied, keep_unclaimed, maglev_m, held)
        if not capacity or _fits(baseline, p.usage, capacity):
            return p
        before = {f for s in applied.values() for f in s.frontends}
        more = _refusals(_costs(p, applied, before.__contains__, maglev_m,
                                {p.ids[k]: _service(k) for k in desired if k in p.ids}),
                         baseline, capacity)
        if more.keys() <= held.keys():
            return p
        held.update((k, v) for k, v in more.items() if k not in held)


def _plan_all(desired: DesiredState, applied: Mapping[int, KernelService],
              keep_unclaimed: Collection[int], maglev_m: int,
              held: dict[tuple[str, str], str]) -> Plan:
    """plan() with the Services in `held` left as the kernel holds them."""
    ids = _assign_ids(desired, applied)
    order = sorted(desired, key=_name_order)
    before = {f: s.svc_id for s in applied.values() for f in s.frontends}
    owners: dict[FrontendKey, int] = {}
    for key in order:                              # incumbents first
        if _service(key) in held:                  # keeps every frontend it has
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
    for key in order:
        svc_id = ids[key]
        if _service(key) in held:
            refused_keys.add(key)
            old = applied.get(svc_id)
            if old is None:           # new: not served, and its id is not taken
                del ids[key]
            else:                     # as the kernel has it, less the backends that left
                result[svc_id] = _shrunk(old, desired[key])
            continue
        frontends = _claim(key, desired[key], svc_id, owners, losers, conflicts)
        if frontends:     # else nothing can reach it: write no slots for it
            result[svc_id] = _entry(key, desired[key], svc_id, frontends,
                                    applied.get(svc_id), maglev_m)
    claimed = set(ids.values()) if keep_unclaimed else set()
    for svc_id in sorted(keep_unclaimed):
        old = applied.get(svc_id)
        if old is not None and svc_id not in claimed:
            kept = frozenset(f for f in old.frontends if f not in owners)
            if kept:
                result[svc_id] = replace(old, frontends=kept, stray_slots=(),
                                         stale_frontends=frozenset())
                owners.update(dict.fromkeys(kept, svc_id))
    ops, removed = _diff(applied, result, owners, applied.keys() | result.keys(), maglev_m)
    return Plan(ops, result, ids, tuple(conflicts), owners,
                {f: frozenset(k) for f, k in losers.items()},
                sum(len(s.backends) for s in result.values()),
                max((*applied, *result, 0)) + 1, removed,
                map_usage(result.values(), maglev_m), dict(held), frozenset(refused_keys))


_GONE = object()


class Overlay(Mapping):
    """A mapping read through to a base and written locally: an incremental plan's
    result costs what changed. commit() writes the changes into the base, in place."""

    def __init__(self, base: Mapping) -> None:
        self.base = base.base if isinstance(base, Overlay) else base
        self.changes: dict = dict(base.changes) if isinstance(base, Overlay) else {}

    def __getitem__(self, key):
        value = self.changes.get(key, self.base.get(key, _GONE)) if key in self.changes \
            else self.base[key]
        if value is _GONE:
            raise KeyError(key)
        return value

    def __contains__(self, key) -> bool:
        if key in self.changes:
            return self.changes[key] is not _GONE
        return key in self.base

    def __iter__(self):
        yield from (k for k in self.base if k not in self.changes)
        yield from (k for k, v in self.changes.items() if v is not _GONE)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __setitem__(self, key, value) -> None:
        self.changes[key] = value

    def __delitem__(self, key) -> None:
        if key not in self:
            raise KeyError(key)
        self.changes[key] = _GONE

    def pop(self, key, default=None):
        if key not in self:
            return default
        value = self[key]
        self.changes[key] = _GONE
        return value

    def setdefault(self, key, default):
        if key not in self:
            self[key] = default
        return self[key]

    def commit(self) -> dict:
        for key, value in self.changes.items():
            if value is _GONE:
                self.base.pop(key, None)
            else:
                self.base[key] = value
        self.changes = {}
        return self.base


def commit(p: Plan) -> Plan:
    """The plan with its overlays written into their bases (after the kernel took it)."""
    flat = [x.commit() if isinstance(x, Overlay) else x for x in (p.result, p.ids, p.owners)]
    return replace(p, result=flat[0], ids=flat[1], owners=flat[2])


def plan_changes(desired: Mapping, previous: Plan,
                 changed: Iterable[tuple[ServicePortName, int]], maglev_m: int = 0,
                 capacity: Capacity | None = None) -> Plan:
    """The same operations as plan(), for the service ports in `changed` only (added,
    modified or removed since `previous`, whose result the kernel holds): the cost of a
    sync follows the change, not the cluster. Frontends keep their owners. The result
    reads through to previous's; commit() it once the kernel holds it. The ports of
    Services previous refused are tried again; capacity as for plan()."""
    changed = set(changed) | previous.refused_keys
    held: dict[tuple[str, str], str] = {}
    while True:
        p, planned = _plan_changes(desired, previous, changed, maglev_m, held)
        if not capacity or _fits(previous.usage, p.usage, capacity):
            return p
        more = _refusals(_costs(p, previous.result, previous.owners.__contains__, maglev_m,
                                {p.ids[k]: _service(k) for k in planned if k in p.ids}),
                         previous.usage, capacity)
        if more.keys() <= held.keys():
            return p
        held.update((k, v) for k, v in more.items() if k not in held)


def _plan_changes(desired: Mapping, previous: Plan, changed: set, maglev_m: int,
                  held: dict[tuple[str, str], str]) -> tuple[Plan, list]:
    """plan_changes() with the Services in `held` left as previous has them (their
    removed ports excepted: a removal only frees room), and the keys it planned."""
    result, ids, owners = Overlay(previous.result), Overlay(previous.ids), \
        Overlay(previous.owners)
    refused_keys = {k for k in changed if k in desired and _service(k) in held}
    changed = sorted(set(changed) - refused_keys, key=_name_order)
    released: set[FrontendKey] = set()
    touched: set[int] = set()
    for key in refused_keys:           # refused growth, but removals still go: no room needed
        svc_id = ids.get(key)
        old = result.get(svc_id) if svc_id is not None else None
        if old is not None and (new := _shrunk(old, desired[key])) != old:
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
            for f in old.frontends - wanted:
                if owners.get(f) == svc_id:
                    del owners[f]
                    released.add(f)
    # A released frontend goes to a port that lost it earlier: re-plan those ports too.
    losers = {f: set(keys) for f, keys in previous.losers.items()}
    again = {k for f in released for k in losers.pop(f, ()) if k in desired}
    refused_keys.update(k for k in again if _service(k) in held)
    changed = sorted((set(changed) | again) - refused_keys, key=_name_order)
    for f in list(losers):
        losers[f].difference_update(changed)
        if not losers[f]:
            del losers[f]
    # never reuse an id within the plan that frees it: a slot write must not land on a
    # table a frontend still points at
    next_id = previous.next_id
    conflicts: list[str] = []
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
        frontends = _claim(key, state, svc_id, owners, losers, conflicts)
        for f in (old.frontends - frontends) if old else ():
            if owners.get(f) == svc_id:
                del owners[f]
        if frontends:
            result[svc_id] = _entry(key, state, svc_id, frontends, old, maglev_m)
        else:
            result.pop(svc_id, None)
    ops, removed = _diff(previous.result, result, owners, touched, maglev_m)
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


# --- capacity: what a plan adds to each map, and which Services do not fit ------------

def _service(key: tuple) -> tuple[str, str]:
    return key[0].namespace, key[0].name


def _maglev_rows(maglev_m: int) -> int:
    return -(-(maglev_m or maglev.M_MAX) // MAGLEV_ROW)


def map_usage(services: Iterable[KernelService], maglev_m: int) -> dict[str, int]:
    """Entries the service ports take in each budgeted map."""
    used: Counter = Counter()
    for s in services:
        used.update(f"bpfp_svc{f.address.version}" for f in s.frontends)
        used[f"bpfp_slot{s.family}"] += len(s.backends) + len(s.stray_slots)
        used["bpfp_srcrange"] += len(s.source_ranges)
        if s.flags & SVC_F_MAGLEV:
            used["bpfp_maglev"] += _maglev_rows(maglev_m)
        used["bpfp_maglev"] += s.stray_maglev_rows
    return dict(used)


def _fits(baseline: Mapping[str, int], usage: Mapping[str, int], capacity: Capacity) -> bool:
    """Cheap and sure: every entry of the result written anew on top of what the kernel
    holds (deletions come last, so a map peaks before them) still fits."""
    return all(baseline.get(m, 0) + usage.get(m, 0) <= n for m, n in capacity.items())


def _costs(p: Plan, applied: Mapping[int, KernelService], in_kernel, maglev_m: int,
           service_of: Mapping[int, tuple[str, str]]) -> dict[tuple[str, str], Counter]:
    """Entries each Service's writes add to each map: keys the kernel does not hold yet
    (an update of a key it holds needs no room). Slots of kept entries add nothing."""
    costs: dict[tuple[str, str], Counter] = {}
    for op in p.ops:
        svc_id = getattr(op, "svc_id", None)
        if svc_id not in service_of:
            continue
        old = applied.get(svc_id)
        if isinstance(op, PutSlot):
            new = old is None or (op.slot >= len(old.backends)
                                  and op.slot not in old.stray_slots)
            entry = f"bpfp_slot{op.family}"
        elif isinstance(op, PutFrontend):
            new, entry = not in_kernel(op.frontend), f"bpfp_svc{op.frontend.address.version}"
        elif isinstance(op, PutRange):
            new, entry = old is None or op.network not in old.source_ranges, "bpfp_srcrange"
        elif isinstance(op, PutMaglev):
            new = old is None or not old.flags & SVC_F_MAGLEV
            entry = "bpfp_maglev"
        else:
            continue
        if new:
            cost = costs.setdefault(service_of[svc_id], Counter())
            cost[entry] += _maglev_rows(maglev_m) if entry == "bpfp_maglev" else 1
    return costs


def _refusals(costs: Mapping[tuple[str, str], Counter], baseline: Mapping[str, int],
              capacity: Capacity) -> dict[tuple[str, str], str]:
    """Services whose new entries do not fit beside the others', and why. By name: the
    same Services stay refused sync after sync, and the first by name goes in when room
    returns. Removals free room only once the kernel has them (they are written last)."""
    room = {m: n - baseline.get(m, 0) for m, n in capacity.items()}
    refused = {}
    for service in sorted(costs):
        cost = costs[service]
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


def _claim(key, state: ServicePortState, svc_id: int, owners, losers: dict,
           conflicts: list[str]) -> frozenset[FrontendKey]:
    """The frontends of `state` that go to svc_id: all but those another port owns."""
    frontends = set()
    for f in state.frontends:
        fkey = frontend_key(f, key)
        if owners.setdefault(fkey, svc_id) != svc_id:
            conflicts.append(f"{fkey} of {state.name} is already served by another "
                             f"service port; frontend skipped")
            losers.setdefault(fkey, set()).add(key)
            continue
        frontends.add(fkey)
    return frozenset(frontends)


def _shrunk(old: KernelService, state: ServicePortState) -> KernelService:
    """A refused service port as the kernel holds it, without the backends it no longer
    has (a terminated pod must not keep getting traffic while the maps are full): slots
    only move and go, so this never needs room."""
    wanted = {BackendAddr(b.address, b.port) for b in state.backends}
    kept = [b for b in old.backends if b in wanted]
    return replace(old, backends=_stable_slots(old.backends, kept), stray_slots=(),
                   stale_frontends=frozenset(), local=old.local.intersection(kept))


def frontend_key(f, key: tuple) -> FrontendKey:
    """A model frontend as the kernel keys it for the by_scope part `key`."""
    outside = len(key) > 2 and key[2] >= OUTSIDE
    return FrontendKey(f.address, f.port, f.protocol, 1 if outside else 0)


def _entry(key, state: ServicePortState, svc_id: int, frontends: frozenset[FrontendKey],
           old: KernelService | None, maglev_m: int = 0) -> KernelService:
    wanted = [BackendAddr(b.address, b.port) for b in state.backends]
    scope = key[2] if len(key) > 2 else INTERNAL
    flags = 0
    if scope == FIREWALLED:
        flags |= SVC_F_SOURCE_RANGES
    # Maglev where a table fits (slot numbers are 16 bits); the TC path picks at random
    # otherwise. ClusterIPs stay random: traffic from outside to them is not balanced
    # across nodes.
    if maglev_m and scope != INTERNAL and len(wanted) < min(maglev_m, 65536):
        flags |= SVC_F_MAGLEV
    local = [BackendAddr(b.address, b.port) for b in state.backends if b.local]
    return KernelService(svc_id, key[1], frontends,
                         _stable_slots(old.backends if old else (), wanted),
                         name_hash=port_hash(key),
                         affinity=state.session_affinity_timeout, flags=flags,
                         source_ranges=state.source_ranges if scope == FIREWALLED else (),
                         local=frozenset(local) if local else _NO_BACKENDS)


def _diff(applied: Mapping[int, KernelService], result: Mapping[int, KernelService],
          owners: Mapping[FrontendKey, int], svc_ids: Iterable[int], maglev_m: int = 0
          ) -> tuple[tuple[MapOp, ...], frozenset[BackendAddr]]:
    """The ordered operations that turn applied into result for the given service ids,
    and the backends UDP service ports lose."""
    put_slots: list[MapOp] = []        # with the ranges and Maglev tables frontends use
    put_frontends: list[MapOp] = []
    delete_frontends: list[MapOp] = []
    delete_slots: list[MapOp] = []
    released: set[FrontendKey] = set()
    removed: set[BackendAddr] = set()
    for svc_id in sorted(svc_ids):
        old, new = applied.get(svc_id), result.get(svc_id)
        old_slots = old.backends if old else ()
        if old is not None and any(f.protocol is Protocol.UDP for f in old.frontends):
            removed.update(set(old_slots) - set(new.backends if new else ()))
        if old is not None:
            released.update(f for f in old.frontends if f not in owners)
        old_ranges = set(old.source_ranges) if old else set()
        old_maglev = old is not None and old.flags & SVC_F_MAGLEV
        if old is not None and old.stray_maglev_rows and \
                not (new is not None and new.flags & SVC_F_MAGLEV):
            delete_slots.append(DeleteMaglev(svc_id, old.stray_maglev_rows * MAGLEV_ROW))
        if new is None:
            if old is not None:
                slots = sorted(set(range(len(old_slots))) | set(old.stray_slots))
                delete_slots.extend(DeleteSlot(old.family, svc_id, i) for i in slots)
                delete_slots.extend(DeleteRange(svc_id, n) for n in sorted(old_ranges, key=str))
                if old_maglev:
                    delete_slots.append(DeleteMaglev(svc_id, maglev_m or maglev.M_MAX))
            continue
        new_local, old_local = new.local, old.local if old else _NO_BACKENDS
        flagged = new_local or old_local    # else no lookups: most ports have no local one
        for i, backend in enumerate(new.backends):
            local = bool(new_local) and backend in new_local
            # a slot whose backend stays but whose BE_LOCAL is wrong (written by an agent
            # that knew no flags, or the node's name or IPs changed) is rewritten too
            if i >= len(old_slots) or old_slots[i] != backend or \
                    (flagged and local != (backend in old_local)):
                put_slots.append(PutSlot(new.family, svc_id, i, backend,
                                         BE_LOCAL if local else 0))
        put_slots.extend(PutRange(svc_id, n) for n in new.source_ranges if n not in old_ranges)
        if new.flags & SVC_F_MAGLEV and (not old_maglev or old_slots != new.backends):
            names = [f"{b.address}:{b.port}" for b in new.backends]
            put_slots.append(PutMaglev(svc_id, tuple(maglev.table(names, maglev_m))))
        rewrite = old is None or len(old_slots) != len(new.backends) \
            or old.name_hash != new.name_hash or old.affinity != new.affinity \
            or old.flags != new.flags
        had = old.frontends if old else frozenset()
        stale = old.stale_frontends if old else frozenset()
        for fkey in sorted(new.frontends, key=_frontend_order):
            if rewrite or fkey not in had or fkey in stale:
                put_frontends.append(PutFrontend(fkey, svc_id, len(new.backends),
                                                 new.name_hash, new.affinity, new.flags))
        delete_slots.extend(DeleteRange(svc_id, n) for n in
                            sorted(old_ranges - set(new.source_ranges), key=str))
        if old_maglev and not new.flags & SVC_F_MAGLEV:
            # after a switch to random the table's size is unknown: the largest one
            delete_slots.append(DeleteMaglev(svc_id, maglev_m or maglev.M_MAX))
        gone = set(range(len(new.backends), len(old_slots)))
        gone |= {i for i in (old.stray_slots if old else ()) if i >= len(new.backends)}
        delete_slots.extend(DeleteSlot(new.family, svc_id, i) for i in sorted(gone))
    delete_frontends.extend(DeleteFrontend(f) for f in sorted(released, key=_frontend_order))
    return (*put_slots, *put_frontends, *delete_frontends, *delete_slots), frozenset(removed)


# frontend, svc_id, count, name_hash[, affinity seconds[, flags]]
FrontendEntry = tuple
SlotEntry = tuple          # (svc_id, slot, family, backend[, BE_* flags])


def kernel_state(frontends: Iterable[FrontendEntry], slots: Iterable[SlotEntry],
                 ranges: Mapping[int, Iterable[IPNetwork]] | None = None,
                 maglev: Mapping[int, int] | None = None) -> AppliedState:
    """The applied state that raw map entries mean: a service port serves slots
    [0, count); anything else an interrupted write left is marked for repair. Shared by
    the real maps' read_back and the test fake, so both adopt the same way."""
    by_svc: dict[int, dict[FrontendKey, tuple[int, int, tuple[int, int]]]] = {}
    for fkey, svc_id, count, name_hash, *extra in frontends:
        affinity, flags = (*extra, 0, 0)[:2]
        by_svc.setdefault(svc_id, {})[fkey] = (count, name_hash, (affinity, flags))
    tables: dict[int, dict[int, BackendAddr]] = {}
    families: dict[int, int] = {}
    local_slots: dict[int, set[int]] = {}
    for svc_id, slot, family, backend, *flags in slots:
        tables.setdefault(svc_id, {})[slot] = backend
        families[svc_id] = family
        if flags and flags[0] & BE_LOCAL:
            local_slots.setdefault(svc_id, set()).add(slot)
    state: AppliedState = {}
    ranges = ranges or {}
    # ids with ranges only: a crash between deleting the frontends and the ranges; read
    # back so the planner deletes them (and never hands the id out with stale ranges)
    for svc_id in by_svc.keys() | tables.keys() | ranges.keys():
        table = tables.get(svc_id, {})
        entries = by_svc.get(svc_id, {})
        contiguous = 0
        while contiguous in table:
            contiguous += 1
        live = min([contiguous, *(c for c, _, _ in entries.values())]) if entries else 0
        name_hash, (affinity, flags) = _most_common([(h, a) for _, h, a in entries.values()])
        family = families.get(svc_id) or (next(iter(entries)).address.version if entries
                                           else next(iter(ranges[svc_id])).version)
        local = [table[i] for i in local_slots.get(svc_id, ()) if i < live]
        state[svc_id] = KernelService(
            svc_id, family, frozenset(entries),
            tuple(table[i] for i in range(live)),
            stray_slots=tuple(sorted(i for i in table if i >= live)),
            stale_frontends=frozenset(f for f, (c, h, a) in entries.items()
                                      if c != live or (h, a) != (name_hash, (affinity, flags))),
            name_hash=name_hash, affinity=affinity, flags=flags,
            source_ranges=tuple(sorted(ranges.get(svc_id, ()),
                                       key=lambda n: (n.version, int(n.network_address),
                                                      n.prefixlen))),
            local=frozenset(local) if local else _NO_BACKENDS)
    # Maglev rows (svc_id -> rows held) no frontend uses, left by a sync that failed after
    # writing them: read back so the planner deletes them, and the budget counts them
    for svc_id, rows in (maglev or {}).items():
        held = state.get(svc_id)
        if held is None:
            state[svc_id] = KernelService(svc_id, 4, frozenset(), (), stray_maglev_rows=rows)
        elif not held.flags & SVC_F_MAGLEV:
            state[svc_id] = replace(held, stray_maglev_rows=rows)
    return state


def _most_common(values: list[tuple]) -> tuple:
    """What most frontends of one id say (they differ only after an interrupted write)."""
    return max(set(values), key=lambda v: (values.count(v), v)) if values else (0, (0, 0))


# by_scope parts. OUTSIDE and FIREWALLED are seen by traffic from outside only (kernel
# scope 1); the TC path falls back to the scope 0 entries, which every path sees.
INTERNAL, EXTERNAL, OUTSIDE, FIREWALLED = 0, 1, 2, 3
SCOPE_NAMES = {INTERNAL: "internal", EXTERNAL: "external", OUTSIDE: "outside",
               FIREWALLED: "firewalled"}


def by_scope(desired: DesiredState) -> dict[tuple[ServicePortName, int, int], ServicePortState]:
    """A service port's frontends split by the backends a connection started on this node
    gets: ClusterIPs -> `backends`, NodePort/ExternalIP/LoadBalancer -> `external_backends`
    (they differ when a traffic policy is Local). Each part gets its own slot table."""
    out: dict[tuple[ServicePortName, int, int], ServicePortState] = {}
    for (name, family), state in desired.items():
        internal = tuple(f for f in state.frontends if not f.kind.external)
        external = tuple(f for f in state.frontends if f.kind.external)
        # LoadBalancer addresses behind loadBalancerSourceRanges (kube-proxy filters those,
        # not NodePorts) are served to traffic from outside only, where the TC path checks
        # the source: the socket LB cannot (no source address at connect()), so a pod's
        # connection to them leaves the node, as to the cloud's load balancer.
        walled = tuple(f for f in external if state.source_ranges
                       and f.kind is FrontendKind.LOAD_BALANCER)
        external = tuple(f for f in external if f not in walled)
        if internal or not (external or walled):
            out[name, family, INTERNAL] = replace(state, frontends=internal)
        if external:
            out[name, family, EXTERNAL] = replace(state, frontends=external,
                                                  backends=state.external_backends)
        if walled:
            out[name, family, FIREWALLED] = replace(state, frontends=walled,
                                                    backends=state.outside_backends)
        # the rest from outside: a part of its own when its backends differ from the
        # node's own view (a Local policy); else the TC path uses the EXTERNAL part
        if external and set(state.outside_backends) != set(state.external_backends):
            out[name, family, OUTSIDE] = replace(state, frontends=external,
                                                 backends=state.outside_backends)
    return out


def port_hash(key: tuple) -> int:
    """A service port's name as 64 bits, stored with its frontends: a restarted agent
    finds each port's id (and so its slot table) by name, whatever else changed."""
    name, family, *scope = key
    text = f"{name.namespace}/{name.name}/{name.port_name}/{name.protocol.value}/{family}"
    if scope and scope[0]:
        text += f"/{SCOPE_NAMES[scope[0]]}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") or 1


def _assign_ids(desired: DesiredState, applied: Mapping[int, KernelService]
                ) -> dict[tuple[ServicePortName, int], int]:
    """A service port keeps the id the kernel holds under its name; new ones get the
    lowest ids free (never one the kernel still uses: its slots may be live)."""
    by_hash = {s.name_hash: s.svc_id for s in applied.values() if s.name_hash}
    ids: dict[tuple[ServicePortName, int], int] = {}
    unplaced = []
    for key in sorted(desired, key=_name_order):
        svc_id = by_hash.get(port_hash(key))
        if svc_id is None:
            unplaced.append(key)
        else:
            ids[key] = svc_id
    used = set(ids.values()) | set(applied)
    next_id = 1
    for key in unplaced:
        while next_id in used:
            next_id += 1
        ids[key] = next_id
        used.add(next_id)
    return ids


def _stable_slots(old: tuple[BackendAddr, ...], wanted: list[BackendAddr]
                  ) -> tuple[BackendAddr, ...]:
    """Surviving backends keep their slot; new ones fill the holes, then the tail moves in.
    Fewer writes on large services, and no slot ever names a backend twice."""
    wanted_set = set(wanted)
    slots: list[BackendAddr | None] = [b if b in wanted_set else None for b in old]
    present = {b for b in slots if b is not None}
    newcomers = iter([b for b in wanted if b not in present])
    for i, b in enumerate(slots):
        if b is None:
            slots[i] = next(newcomers, None)
    slots.extend(newcomers)
    # Holes left (more removed than added): move the last backends into them.
    hole, end = 0, len(slots)
    while True:
        while hole < end and slots[hole] is not None:
            hole += 1
        while end > hole and slots[end - 1] is None:
            end -= 1
        if hole >= end:
            break
        slots[hole], slots[end - 1] = slots[end - 1], None
    return tuple(slots[:end])  # type: ignore[arg-type]


def _name_order(key: tuple) -> tuple:
    name, family, *scope = key
    return (name.namespace, name.name, name.port_name, name.protocol.value, family, *scope)


def _frontend_order(f: FrontendKey) -> tuple:
    return (f.address.version, int(f.address), f.port, f.protocol.value)
