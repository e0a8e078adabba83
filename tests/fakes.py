"""Test doubles for the one kernel door: FakeServiceMaps stores dicts like the BPF maps do.

It checks after every single operation what the kernel programs rely on: a frontend never
points at a missing backend slot."""
from __future__ import annotations

from collections.abc import Sequence

from agent.model.types import Protocol
from agent.planner import (
    AppliedState,
    BackendAddr,
    DeleteFrontend,
    DeleteSlot,
    FrontendKey,
    MapOp,
    PutFrontend,
    PutSlot,
    kernel_state,
)


class InvariantBroken(AssertionError):
    pass


class FakeServiceMaps:
    def __init__(self, families: frozenset[int] = frozenset({4, 6})) -> None:
        self.families = families
        # frontend -> (svc_id, count, name hash, affinity seconds)
        self.frontends: dict[FrontendKey, tuple[int, int, int, int]] = {}
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
                    self.frontends[op.frontend] = (op.svc_id, op.count, op.name_hash, op.affinity)
                case DeleteFrontend():
                    self.frontends.pop(op.frontend, None)
            self.ops_applied += 1
            self.check(after=op)

    def check(self, after: MapOp | None = None) -> None:
        for fkey, (svc_id, count, *_) in self.frontends.items():
            for slot in range(count):
                if (svc_id, slot) not in self.slots:
                    raise InvariantBroken(f"after {after}: {fkey} -> svc {svc_id} count "
                                          f"{count} but slot {slot} is missing")

    def read_back(self) -> AppliedState:
        return kernel_state(((f, *entry) for f, entry in self.frontends.items()),
                            ((svc_id, slot, family, b)
                             for (svc_id, slot), (family, b) in self.slots.items()))
