"""Test doubles for the one kernel door: FakeServiceMaps stores dicts like the BPF maps do.

It checks after every single operation what the kernel programs rely on: a frontend never
points at a missing backend slot."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from agent.model.types import Protocol
from agent.planner import (
    MAGLEV_ROW,
    SVC_F_MAGLEV,
    SVC_F_SOURCE_RANGES,
    AppliedState,
    BackendAddr,
    DeleteFrontend,
    DeleteMaglev,
    DeleteRange,
    DeleteSlot,
    FrontendKey,
    MapFullError,
    MapOp,
    PutFrontend,
    PutMaglev,
    PutRange,
    PutSlot,
    kernel_state,
)


class InvariantBroken(AssertionError):
    pass


class FakeServiceMaps:
    def __init__(self, families: frozenset[int] = frozenset({4, 6}),
                 sizes: Mapping[str, int] | None = None) -> None:
        self.families = families
        # max entries by map name (planner.Capacity): an insert past it raises
        # MapFullError, as the kernel's E2BIG does; updates of a held key always fit
        self.sizes = dict(sizes or {})
        self.peak: dict[str, int] = {}              # the most entries each map held
        # frontend -> (svc_id, count, name hash, affinity seconds, flags)
        self.frontends: dict[FrontendKey, tuple[int, int, int, int, int]] = {}
        self.ranges: set[tuple[int, object]] = set()        # (svc_id, network)
        self.maglev: dict[int, tuple[int, ...]] = {}        # svc_id -> table
        self.slots: dict[tuple[int, int], tuple[int, BackendAddr]] = {}  # -> (family, b)
        self.ops_applied = 0

    def supports(self, family: int, protocol: Protocol) -> bool:
        return family in self.families

    def capacity(self) -> dict[str, int]:
        return dict(self.sizes)

    def entries(self) -> dict[str, int]:
        """Entries in each map, named as planner.Capacity names them."""
        used: dict[str, int] = {}
        for f in self.frontends:
            used[f"bpfp_svc{f.address.version}"] = used.get(f"bpfp_svc{f.address.version}",
                                                            0) + 1
        for family, _ in self.slots.values():
            used[f"bpfp_slot{family}"] = used.get(f"bpfp_slot{family}", 0) + 1
        used["bpfp_srcrange"] = len(self.ranges)
        used["bpfp_maglev"] = sum(-(-len(t) // MAGLEV_ROW) for t in self.maglev.values())
        return used

    def _room_for(self, op: MapOp) -> None:
        """MapFullError when op would add a key to a map already at its size."""
        match op:
            case PutSlot():
                name, new = f"bpfp_slot{op.family}", (op.svc_id, op.slot) not in self.slots
            case PutFrontend():
                name = f"bpfp_svc{op.frontend.address.version}"
                new = op.frontend not in self.frontends
            case PutRange():
                name, new = "bpfp_srcrange", (op.svc_id, op.network) not in self.ranges
            case PutMaglev():
                name, new = "bpfp_maglev", op.svc_id not in self.maglev
            case _:
                return
        if not new or name not in self.sizes:
            return
        grows = -(-len(op.table) // MAGLEV_ROW) if isinstance(op, PutMaglev) else 1
        if self.entries().get(name, 0) + grows > self.sizes[name]:
            raise MapFullError(name, f"map {name} is full ({self.sizes[name]} entries)")

    def apply(self, ops: Sequence[MapOp]) -> None:
        for op in ops:
            if self.sizes:
                self._room_for(op)
            match op:
                case PutSlot():
                    self.slots[(op.svc_id, op.slot)] = (op.family, op.backend)
                case DeleteSlot():
                    self.slots.pop((op.svc_id, op.slot), None)
                case PutFrontend():
                    self.frontends[op.frontend] = (op.svc_id, op.count, op.name_hash,
                                                   op.affinity, op.flags)
                case PutRange():
                    self.ranges.add((op.svc_id, op.network))
                case DeleteRange():
                    self.ranges.discard((op.svc_id, op.network))
                case PutMaglev():
                    self.maglev[op.svc_id] = op.table
                case DeleteMaglev():
                    self.maglev.pop(op.svc_id, None)
                case DeleteFrontend():
                    self.frontends.pop(op.frontend, None)
            self.ops_applied += 1
            self.check(after=op)
            if self.sizes:
                for name, n in self.entries().items():
                    self.peak[name] = max(self.peak.get(name, 0), n)

    def check(self, after: MapOp | None = None) -> None:
        for fkey, (svc_id, count, _, _, flags) in self.frontends.items():
            for slot in range(count):
                if (svc_id, slot) not in self.slots:
                    raise InvariantBroken(f"after {after}: {fkey} -> svc {svc_id} count "
                                          f"{count} but slot {slot} is missing")
            # a firewalled frontend without its ranges would drop every client
            if flags & SVC_F_SOURCE_RANGES and not any(i == svc_id for i, _ in self.ranges):
                raise InvariantBroken(f"after {after}: {fkey} filters sources, none written")
            # a Maglev table names only slots that exist (the TC program also ignores
            # entries at or past the frontend's count: a table and a count written in
            # either order are safe)
            table = self.maglev.get(svc_id)
            if flags & SVC_F_MAGLEV and table and any((svc_id, slot) not in self.slots
                                                      for slot in set(table)):
                raise InvariantBroken(f"after {after}: {fkey} Maglev table names a slot "
                                      f"that is not there")

    def read_back(self) -> AppliedState:
        ranges: dict[int, list] = {}
        for svc_id, network in self.ranges:
            ranges.setdefault(svc_id, []).append(network)
        return kernel_state(((f, *entry) for f, entry in self.frontends.items()),
                            ((svc_id, slot, family, b)
                             for (svc_id, slot), (family, b) in self.slots.items()), ranges)
