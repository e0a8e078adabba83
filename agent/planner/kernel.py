"""The kernel's vocabulary, shared by the planner, the datapath, the API and the tests:
frontend and backend keys, what one service port holds, the map operations, Plan, and
kernel_state() (what raw map entries mean). Pure."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from agent.model.types import IPAddress, IPNetwork, Protocol
from agent.planner.scopes import ServiceKey, ServiceName


@dataclass(frozen=True, slots=True)
class FrontendKey:
    """A frontend as the kernel keys it. scope 1: only traffic from outside the node (the
    TC programs) sees it; they look there first, then at scope 0, which every path sees."""
    address: IPAddress
    port: int
    protocol: Protocol
    scope: int = 0

    def __hash__(self) -> int:
        # ipaddress hashes through hex() in Python and Enum through its name: a full sync
        # hashes every key several times. Equal keys have equal addresses, so equal _ip
        # (the address as an int); the protocol only splits what the port rarely does.
        return hash((self.address._ip, self.port, self.scope))

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}/{self.protocol.value}" + (" (outside)" if self.scope else "")


@dataclass(frozen=True, slots=True)
class BackendAddr:
    address: IPAddress
    port: int

    def __hash__(self) -> int:
        return hash((self.address._ip, self.port))      # as FrontendKey's


@dataclass(frozen=True, slots=True)
class KernelService:
    """One service port as the kernel holds it: its frontends and its slot table."""
    svc_id: int
    family: int
    # sorted by frontend_order, no repeats: a tuple, not a frozenset, as most ports have
    # one frontend (48 bytes instead of 216; 20k ports at 10k services x 2)
    frontends: tuple[FrontendKey, ...]
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


# Mirrors of bpf/maps.h, the source (tests/unit/test_datapath_config.py checks them):
# svc_value.flags, BPFP_SVC_F_<name>
SVC_F_SOURCE_RANGES, SVC_F_MAGLEV = 1, 2
# backend4/6.flags, BPFP_BE_<name>: on this node, so never SNATed (Backend.local)
BE_LOCAL = 1
NO_BACKENDS: frozenset[BackendAddr] = frozenset()

# What the kernel holds, by service id. read_back() rebuilds it from the maps alone.
AppliedState = dict[int, KernelService]


class PutSlot(NamedTuple):
    """A named tuple, not a frozen dataclass like the other operations: a full sync makes
    one per backend slot (220k at 10k services x 10), and a tuple is made in a third of
    the time. No other operation has five fields, so none compares equal to one."""
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
    ids: dict[ServiceKey, int]                    # which svc_id serves which service port
    conflicts: tuple[str, ...] = field(default=())  # frontends claimed twice
    owners: dict[FrontendKey, int] = field(default_factory=dict)   # frontend -> svc_id
    # service ports that lost a frontend to another: re-planned when it is released
    losers: dict[FrontendKey, frozenset[ServiceKey]] = field(default_factory=dict)
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
    refused: dict[ServiceName, str] = field(default_factory=dict)
    refused_keys: frozenset[ServiceKey] = frozenset()


class MapFullError(RuntimeError):
    """A map had no room for an insert (E2BIG, ENOSPC). The map writer raises it, naming
    the map as Capacity does, so that the agent can budget below what the map took."""

    def __init__(self, map_name: str, message: str) -> None:
        super().__init__(message)
        self.map_name = map_name


MAGLEV_ROW = 32         # Maglev table entries per bpfp_maglev row (BPFP_MAGLEV_ROW)


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
            svc_id, family, frontends_tuple(entries),
            tuple(table[i] for i in range(live)),
            stray_slots=tuple(sorted(i for i in table if i >= live)),
            stale_frontends=frozenset(f for f, (c, h, a) in entries.items()
                                      if c != live or (h, a) != (name_hash, (affinity, flags))),
            name_hash=name_hash, affinity=affinity, flags=flags,
            source_ranges=tuple(sorted(ranges.get(svc_id, ()),
                                       key=lambda n: (n.version, int(n.network_address),
                                                      n.prefixlen))),
            local=frozenset(local) if local else NO_BACKENDS)
    # Maglev rows (svc_id -> rows held) no frontend uses, left by a sync that failed after
    # writing them: read back so the planner deletes them, and the budget counts them
    for svc_id, rows in (maglev or {}).items():
        held = state.get(svc_id)
        if held is None:
            state[svc_id] = KernelService(svc_id, 4, (), (), stray_maglev_rows=rows)
        elif not held.flags & SVC_F_MAGLEV:
            state[svc_id] = replace(held, stray_maglev_rows=rows)
    return state


def frontend_order(f: FrontendKey) -> tuple:
    return (f.address.version, f.address._ip, f.port, f.protocol.value, f.scope)


def frontends_tuple(frontends: Iterable[FrontendKey]) -> tuple[FrontendKey, ...]:
    """KernelService.frontends of a set of keys (its one order)."""
    found = tuple(frontends)
    return found if len(found) < 2 else tuple(sorted(found, key=frontend_order))


def _most_common(values: list[tuple]) -> tuple:
    """What most frontends of one id say (they differ only after an interrupted write)."""
    return max(set(values), key=lambda v: (values.count(v), v)) if values else (0, (0, 0))


