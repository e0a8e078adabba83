"""Test doubles for the one kernel door: FakeServiceMaps stores dicts like the BPF maps do.

It checks after every single operation what the kernel programs rely on: a frontend never
points at a missing backend slot."""
from __future__ import annotations

from collections.abc import Sequence

from agent.planner import (
    AppliedState,
    BackendAddr,
    DeleteFrontend,
    DeleteSlot,
    FrontendKey,
    KernelService,
    MapOp,
    PutFrontend,
    PutSlot,
)


class InvariantBroken(AssertionError):
    pass


class FakeServiceMaps:
    def __init__(self) -> None:
        self.frontends: dict[FrontendKey, tuple[int, int]] = {}   # -> (svc_id, count)
        self.slots: dict[tuple[int, int], tuple[int, BackendAddr]] = {}  # -> (family, b)
        self.ops_applied = 0

    def apply(self, ops: Sequence[MapOp]) -> None:
        for op in ops:
            match op:
                case PutSlot():
                    self.slots[(op.svc_id, op.slot)] = (op.family, op.backend)
                case DeleteSlot():
                    self.slots.pop((op.svc_id, op.slot), None)
                case PutFrontend():
                    self.frontends[op.frontend] = (op.svc_id, op.count)
                case DeleteFrontend():
                    self.frontends.pop(op.frontend, None)
            self.ops_applied += 1
            self.check(after=op)

    def check(self, after: MapOp | None = None) -> None:
        for fkey, (svc_id, count) in self.frontends.items():
            for slot in range(count):
                if (svc_id, slot) not in self.slots:
                    raise InvariantBroken(f"after {after}: {fkey} -> svc {svc_id} count "
                                          f"{count} but slot {slot} is missing")

    def read_back(self) -> AppliedState:
        by_svc: dict[int, set[FrontendKey]] = {}
        counts: dict[int, int] = {}
        for fkey, (svc_id, count) in self.frontends.items():
            by_svc.setdefault(svc_id, set()).add(fkey)
            counts[svc_id] = count
        tables: dict[int, dict[int, tuple[int, BackendAddr]]] = {}
        for (svc_id, slot), value in self.slots.items():
            tables.setdefault(svc_id, {})[slot] = value
        state: AppliedState = {}
        for svc_id in by_svc.keys() | tables.keys():
            table = tables.get(svc_id, {})
            n = counts.get(svc_id, len(table))
            backends = tuple(table[i][1] for i in range(n))
            family = next(iter(table.values()))[0] if table else \
                next(iter(by_svc[svc_id])).address.version
            state[svc_id] = KernelService(svc_id, family, frozenset(by_svc.get(svc_id, ())),
                                          backends)
        return state
