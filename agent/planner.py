"""Pure diff of desired state against what the kernel holds, into ordered map operations.

Backend slots are written before the frontend that points at them; a frontend is removed
before its slots; unchanged service ports produce no operations."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agent.model.types import DesiredState, IPAddress, Protocol, ServicePortName


@dataclass(frozen=True, slots=True)
class FrontendKey:
    """A frontend as the kernel keys it."""
    address: IPAddress
    port: int
    protocol: Protocol

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}/{self.protocol.value}"


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
    stale_frontends: frozenset[FrontendKey] = frozenset()   # count differs: to rewrite


# What the kernel holds, by service id. read_back() rebuilds it from the maps alone.
AppliedState = dict[int, KernelService]


@dataclass(frozen=True, slots=True)
class PutSlot:
    family: int
    svc_id: int
    slot: int
    backend: BackendAddr


@dataclass(frozen=True, slots=True)
class PutFrontend:
    frontend: FrontendKey
    svc_id: int
    count: int


@dataclass(frozen=True, slots=True)
class DeleteFrontend:
    frontend: FrontendKey


@dataclass(frozen=True, slots=True)
class DeleteSlot:
    family: int
    svc_id: int
    slot: int


MapOp = PutSlot | PutFrontend | DeleteFrontend | DeleteSlot


@dataclass(frozen=True, slots=True)
class Plan:
    ops: tuple[MapOp, ...]
    result: AppliedState                          # the kernel's state once ops are applied
    ids: dict[tuple[ServicePortName, int], int]   # which svc_id serves which service port
    conflicts: tuple[str, ...] = field(default=())  # frontends claimed twice; first one wins


def plan(desired: DesiredState, applied: Mapping[int, KernelService],
         keep_unclaimed: bool = False) -> Plan:
    """Backends first, then the frontend that points at them; on removal the frontend
    goes first. The phases are global, so the order also holds when a frontend moves
    from one service port to another within one sync.

    keep_unclaimed: service ports in the kernel that nothing desired claims are kept, not
    deleted (the source's listing is incomplete, e.g. a manifest failed to parse)."""
    ids = _assign_ids(desired, applied)
    frontend_owner: dict[FrontendKey, int] = {}
    conflicts: list[str] = []
    result: AppliedState = {}
    for key in sorted(desired, key=_name_order):
        state = desired[key]
        svc_id = ids[key]
        frontends = set()
        for f in state.frontends:
            fkey = FrontendKey(f.address, f.port, f.protocol)
            if fkey in frontend_owner:
                conflicts.append(f"{fkey} of {state.name} is already served by another "
                                 f"service port; frontend skipped")
                continue
            frontend_owner[fkey] = svc_id
            frontends.add(fkey)
        if not frontends:
            continue      # nothing can reach it: write no slots for it
        old = applied.get(svc_id)
        wanted = [BackendAddr(b.address, b.port) for b in state.backends]
        slots = _stable_slots(old.backends if old else (), wanted)
        result[svc_id] = KernelService(svc_id, key[1], frozenset(frontends), slots)
    if keep_unclaimed:
        for svc_id, old in applied.items():
            kept = frozenset(f for f in old.frontends if f not in frontend_owner)
            if svc_id not in result and kept:
                result[svc_id] = KernelService(svc_id, old.family, kept, old.backends)
                frontend_owner.update(dict.fromkeys(kept, svc_id))

    put_slots: list[MapOp] = []
    put_frontends: list[MapOp] = []
    delete_frontends: list[MapOp] = []
    delete_slots: list[MapOp] = []

    old_owner = {f: s.svc_id for s in applied.values() for f in s.frontends}
    for svc_id, svc in sorted(result.items()):
        old = applied.get(svc_id)
        old_slots = old.backends if old else ()
        for i, backend in enumerate(svc.backends):
            if i >= len(old_slots) or old_slots[i] != backend:
                put_slots.append(PutSlot(svc.family, svc_id, i, backend))
        count_changed = old is None or len(old_slots) != len(svc.backends)
        stale = old.stale_frontends if old else frozenset()
        for fkey in sorted(svc.frontends, key=_frontend_order):
            if count_changed or old_owner.get(fkey) != svc_id or fkey in stale:
                put_frontends.append(PutFrontend(fkey, svc_id, len(svc.backends)))
        gone = set(range(len(svc.backends), len(old_slots)))
        gone |= {i for i in (old.stray_slots if old else ()) if i >= len(svc.backends)}
        delete_slots.extend(DeleteSlot(svc.family, svc_id, i) for i in sorted(gone))

    for fkey in sorted(old_owner.keys() - frontend_owner.keys(), key=_frontend_order):
        delete_frontends.append(DeleteFrontend(fkey))
    for svc_id, old in sorted(applied.items()):
        if svc_id not in result:
            slots = sorted(set(range(len(old.backends))) | set(old.stray_slots))
            delete_slots.extend(DeleteSlot(old.family, svc_id, i) for i in slots)

    ops = (*put_slots, *put_frontends, *delete_frontends, *delete_slots)
    return Plan(ops, result, ids, tuple(conflicts))


FrontendEntry = tuple[FrontendKey, int, int]         # frontend -> (svc_id, count)
SlotEntry = tuple[int, int, int, BackendAddr]        # (svc_id, slot, family, backend)


def kernel_state(frontends: Iterable[FrontendEntry], slots: Iterable[SlotEntry]
                 ) -> AppliedState:
    """The applied state that raw map entries mean: a service port serves slots
    [0, count); anything else an interrupted write left is marked for repair. Shared by
    the real maps' read_back and the test fake, so both adopt the same way."""
    by_svc: dict[int, dict[FrontendKey, int]] = {}
    for fkey, svc_id, count in frontends:
        by_svc.setdefault(svc_id, {})[fkey] = count
    tables: dict[int, dict[int, BackendAddr]] = {}
    families: dict[int, int] = {}
    for svc_id, slot, family, backend in slots:
        tables.setdefault(svc_id, {})[slot] = backend
        families[svc_id] = family
    state: AppliedState = {}
    for svc_id in by_svc.keys() | tables.keys():
        table = tables.get(svc_id, {})
        counts = by_svc.get(svc_id, {})
        contiguous = 0
        while contiguous in table:
            contiguous += 1
        live = min([contiguous, *counts.values()]) if counts else 0
        family = families.get(svc_id) or next(iter(counts)).address.version
        state[svc_id] = KernelService(
            svc_id, family, frozenset(counts),
            tuple(table[i] for i in range(live)),
            stray_slots=tuple(sorted(i for i in table if i >= live)),
            stale_frontends=frozenset(f for f, c in counts.items() if c != live))
    return state


def apply_ops(applied: Mapping[int, KernelService], ops: Iterable[MapOp]) -> AppliedState:
    """What the kernel holds after ops, computed from the ops alone (for fakes and tests)."""
    frontends: dict[FrontendKey, tuple[int, int]] = {
        f: (s.svc_id, len(s.backends)) for s in applied.values() for f in s.frontends}
    slots: dict[tuple[int, int], tuple[int, BackendAddr]] = {
        (s.svc_id, i): (s.family, b) for s in applied.values() for i, b in enumerate(s.backends)}
    for op in ops:
        match op:
            case PutSlot():
                slots[op.svc_id, op.slot] = (op.family, op.backend)
            case DeleteSlot():
                slots.pop((op.svc_id, op.slot), None)
            case PutFrontend():
                frontends[op.frontend] = (op.svc_id, op.count)
            case DeleteFrontend():
                frontends.pop(op.frontend, None)
    return kernel_state(((f, svc_id, count) for f, (svc_id, count) in frontends.items()),
                        ((svc_id, slot, family, b)
                         for (svc_id, slot), (family, b) in slots.items()))


def _assign_ids(desired: DesiredState, applied: Mapping[int, KernelService]
                ) -> dict[tuple[ServicePortName, int], int]:
    """A service port keeps the id the kernel already uses for one of its frontends, so
    a restarted agent adopts the maps instead of rewriting them."""
    owner = {f: s.svc_id for s in applied.values() for f in s.frontends}
    ids: dict[tuple[ServicePortName, int], int] = {}
    claimed: set[int] = set()
    unplaced = []
    for key in sorted(desired, key=_name_order):
        candidates = sorted({owner[fk] for f in desired[key].frontends
                             if (fk := FrontendKey(f.address, f.port, f.protocol)) in owner}
                            - claimed)
        if candidates:
            ids[key] = candidates[0]
            claimed.add(candidates[0])
        else:
            unplaced.append(key)
    used = claimed | set(applied)
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


def _name_order(key: tuple[ServicePortName, int]) -> tuple:
    name, family = key
    return (name.namespace, name.name, name.port_name, name.protocol.value, family)


def _frontend_order(f: FrontendKey) -> tuple:
    return (f.address.version, int(f.address), f.port, f.protocol.value)
