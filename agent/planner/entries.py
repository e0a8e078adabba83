"""What one service port becomes in the kernel: the frontends it claims, its entry (slot
table, flags, hash), and the same entry shrunk when its change is refused. Pure."""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import replace

from agent.model.types import ServicePortState
from agent.planner.kernel import (
    NO_BACKENDS,
    SVC_F_MAGLEV,
    SVC_F_SOURCE_RANGES,
    BackendAddr,
    FrontendKey,
    KernelService,
    frontends_tuple,
)
from agent.planner.scopes import FIREWALLED, INTERNAL, ServiceKey, is_outside, port_hash


def claim(key: ServiceKey, state: ServicePortState, svc_id: int, owners, losers: dict,
          conflicts: list[str]) -> tuple[FrontendKey, ...]:
    """The frontends of `state` that go to svc_id: all but those another port owns."""
    frontends = []
    for f in state.frontends:
        fkey = frontend_key(f, key)
        if owners.setdefault(fkey, svc_id) != svc_id:
            conflicts.append(f"{fkey} of {state.name} is already served by another "
                             f"service port; frontend skipped")
            losers.setdefault(fkey, set()).add(key)
            continue
        frontends.append(fkey)
    return frontends_tuple(frontends)


def shrunk(old: KernelService, state: ServicePortState) -> KernelService:
    """A refused service port as the kernel holds it, without the backends it no longer
    has (a terminated pod must not keep getting traffic while the maps are full): slots
    only move and go, so this never needs room."""
    wanted = {BackendAddr(b.address, b.port) for b in state.backends}
    kept = [b for b in old.backends if b in wanted]
    return replace(old, backends=stable_slots(old.backends, kept), stray_slots=(),
                   stale_frontends=frozenset(), local=old.local.intersection(kept))


def frontend_key(f, key: ServiceKey) -> FrontendKey:
    """A model frontend as the kernel keys it for the by_scope part `key`."""
    return FrontendKey(f.address, f.port, f.protocol, 1 if is_outside(key) else 0)


def entry(key: ServiceKey, state: ServicePortState, svc_id: int,
          frontends: tuple[FrontendKey, ...], old: KernelService | None,
          maglev_m: int = 0, last: list | None = None) -> KernelService:
    """The service port part as the kernel will hold it: surviving backends keep their
    slots; flags from its scope (source ranges when firewalled, Maglev from outside).
    last: [backends, slot values] of the previous call in this plan, updated here. The
    parts of one port and the same-number ports of one slice come one after the other in
    name order with the very same Backend objects (the model shares them): those share
    the slot values, and a new port's slot tuple too (one per endpoint, not per slot)."""
    backends = state.backends
    if last and len(last[0]) == len(backends) and all(map(operator.is_, last[0], backends)):
        wanted = last[1]
    else:
        wanted = tuple([BackendAddr(b.address, b.port) for b in backends])
        if last is not None:
            last[:] = (backends, wanted)
    scope = key.scope
    flags = 0
    if scope == FIREWALLED:
        flags |= SVC_F_SOURCE_RANGES
    # Maglev where a table fits (slot numbers are 16 bits); the TC path picks at random
    # otherwise. ClusterIPs stay random: traffic from outside to them is not balanced
    # across nodes.
    if maglev_m and scope != INTERNAL and len(wanted) < min(maglev_m, 65536):
        flags |= SVC_F_MAGLEV
    local = [addr for b, addr in zip(backends, wanted, strict=True) if b.local]
    return KernelService(svc_id, key.family, frontends,
                         stable_slots(old.backends if old else (), wanted),
                         name_hash=port_hash(key),
                         affinity=state.session_affinity_timeout, flags=flags,
                         source_ranges=state.source_ranges if scope == FIREWALLED else (),
                         local=frozenset(local) if local else NO_BACKENDS)


def stable_slots(old: tuple[BackendAddr, ...], wanted: Sequence[BackendAddr]
                 ) -> tuple[BackendAddr, ...]:
    """Surviving backends keep their slot; new ones fill the holes, then the tail moves in.
    Fewer writes on large services, and no slot ever names a backend twice."""
    # what the loop below gives in the two common cases, without hashing each backend:
    # a new service port, and one whose backends did not change (then the same tuple)
    if not old:
        return tuple(wanted)
    if len(old) == len(wanted) and all(map(operator.eq, old, wanted)):
        return old
    return placed_slots(old, wanted)


def placed_slots(old: tuple[BackendAddr, ...], wanted: Sequence[BackendAddr]
                 ) -> tuple[BackendAddr, ...]:
    """stable_slots' rule without its shortcuts (the tests hold the shortcuts to it)."""
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

