"""Test doubles for the one kernel door: FakeServiceMaps stores dicts like the BPF maps do.

It checks after every single operation what the kernel programs rely on: a frontend never
points at a missing backend slot."""
from __future__ import annotations

from collections.abc import Sequence

from agent.model.types import Protocol
from agent.planner import (
    SVC_F_MAGLEV,
    SVC_F_SOURCE_RANGES,
    AppliedState,
    BackendAddr,
    DeleteFrontend,
    DeleteMaglev,
    DeleteRange,
    DeleteSlot,
    FrontendKey,
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
    def __init__(self, families: frozenset[int] = frozenset({4, 6})) -> None:
        self.families = families
        # frontend -> (svc_id, count, name hash, affinity seconds, flags)
        self.frontends: dict[FrontendKey, tuple[int, int, int, int, int]] = {}
        self.ranges: set[tuple[int, object]] = set()        # (svc_id, network)
        self.maglev: dict[int, tuple[int, ...]] = {}        # svc_id -> table
        self.slots: dict[tuple[int, int], tuple[int, BackendAddr]] = {}  # -> (family, b)
        self.ops_applied = 0

    def supports(self, family: int, protocol: Protocol) -> bool:
        return family in self.families

    def apply(self, ops: Sequence[MapOp]) -> None:
        for op in ops:
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
