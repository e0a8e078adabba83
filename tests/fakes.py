"""Test doubles for the one kernel door: FakeServiceMaps stores dicts like the BPF maps do.

It checks after every single operation what the kernel programs rely on: a frontend never
points at a missing backend slot. A broken invariant is also recorded, so a caller that
catches every error (the agent's sync does) cannot hide it: tests/unit/conftest.py fails
any test whose fake recorded one. tests/integration/test_maps_conformance.py checks that
it answers the same operations as the real pinned maps do."""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from agent import planner
from agent.model.types import Protocol
from agent.planner.capacity import MAGLEV_MAP, RANGE_MAP, frontend_map, slot_map


class InvariantBroken(AssertionError):
    pass


class FakeServiceMaps:
    # every invariant any fake saw broken, caught or not (a fixture empties and checks it)
    broken_anywhere: list[InvariantBroken] = []

    def __init__(self, families: frozenset[int] = frozenset({4, 6}),
                 sizes: Mapping[str, int] | None = None) -> None:
        self.families = families
        # max entries by map name (planner.Capacity): an insert past it raises
        # MapFullError, as the kernel's E2BIG (hash) or ENOSPC (LPM trie) does; updates
        # of a held key always fit
        self.sizes = dict(sizes or {})
        self.peak: dict[str, int] = {}              # the most entries each map held
        # frontend -> (svc_id, count, name hash, affinity seconds, flags)
        self.frontends: dict[planner.FrontendKey, tuple[int, int, int, int, int]] = {}
        self.ranges: set[tuple[int, object]] = set()        # (svc_id, network)
        # (svc_id, row) -> MAGLEV_ROW slot numbers, the last row zero-padded (bpfp_maglev)
        self.maglev_rows: dict[tuple[int, int], tuple[int, ...]] = {}
        # (svc_id, slot) -> (family, backend, BE_* flags)
        self.slots: dict[tuple[int, int], tuple[int, planner.BackendAddr, int]] = {}
        self.ops_applied = 0
        self.broken: list[InvariantBroken] = []     # raised by check(), caught or not
        self.counters_forgotten: set[int] = set()   # svc_ids given to forget_counters

    @property
    def maglev(self) -> dict[int, tuple[int, ...]]:
        """svc_id -> its table as the rows hold it (padded to whole rows)."""
        tables: dict[int, list[int]] = {}
        for (svc_id, _), row in sorted(self.maglev_rows.items()):
            tables.setdefault(svc_id, []).extend(row)
        return {svc_id: tuple(t) for svc_id, t in tables.items()}

    def supports(self, family: int, protocol: Protocol) -> bool:
        return family in self.families

    def capacity(self) -> dict[str, int]:
        return dict(self.sizes)

    def room_for(self, map_name: str, entries: int) -> bool:
        """As the real door's probe: whether the map takes `entries` more now."""
        size = self.sizes.get(map_name)
        return size is None or self.entries().get(map_name, 0) + entries <= size

    def forget_counters(self, svc_ids: set[int]) -> int:
        """The fake keeps no counters: it remembers whose it was asked to forget."""
        self.counters_forgotten |= svc_ids
        return 0

    def entries(self) -> dict[str, int]:
        """Entries in each map, named as planner.Capacity names them."""
        used: dict[str, int] = {}
        for f in self.frontends:
            used[frontend_map(f.address.version)] = \
                used.get(frontend_map(f.address.version), 0) + 1
        for family, *_ in self.slots.values():
            used[slot_map(family)] = used.get(slot_map(family), 0) + 1
        used[RANGE_MAP] = len(self.ranges)
        used[MAGLEV_MAP] = len(self.maglev_rows)
        return used

    def _room_for(self, op) -> None:
        """MapFullError when op would add a key to a map already at its size."""
        match op:
            case planner.PutSlot():
                name, new = f"bpfp_slot{op.family}", (op.svc_id, op.slot) not in self.slots
            case planner.PutFrontend():
                name = f"bpfp_svc{op.frontend.address.version}"
                new = op.frontend not in self.frontends
            case planner.PutRange():
                name, new = "bpfp_srcrange", (op.svc_id, op.network) not in self.ranges
            case _MaglevRow():
                name, new = "bpfp_maglev", (op.svc_id, op.row) not in self.maglev_rows
            case _:
                return
        if new and name in self.sizes and self.entries().get(name, 0) >= self.sizes[name]:
            raise planner.MapFullError(name, f"map {name} is full ({self.sizes[name]} entries)")

    def apply(self, ops: Sequence[planner.MapOp]) -> None:
        """In the order the real door (agent/datapath/maps.py) writes them: consecutive ops
        of one kind form a batch, split by family, each family's batch in turn; a Maglev
        table goes row by row. The kernel's batch update stops at the first entry it
        refuses and keeps those before it: so does this, whatever the map."""
        for kind, group in itertools.groupby(ops, key=type):
            group = list(group)
            if kind in (planner.PutSlot, planner.DeleteSlot):
                batches = _by_family(group, lambda o: o.family)
            elif kind in (planner.PutFrontend, planner.DeleteFrontend):
                batches = _by_family(group, lambda o: o.frontend.address.version)
            else:
                batches = [group]
            for batch in batches:
                for op in batch:
                    for step in _steps(op):
                        self._apply_one(step)
                    self.ops_applied += 1
                    self.check(after=op)

    def _apply_one(self, op) -> None:
        if self.sizes:
            self._room_for(op)
        match op:
            case planner.PutSlot():
                self.slots[(op.svc_id, op.slot)] = (op.family, op.backend, op.flags)
            case planner.DeleteSlot():
                self.slots.pop((op.svc_id, op.slot), None)
            case planner.PutFrontend():
                self.frontends[op.frontend] = (op.svc_id, op.count, op.name_hash,
                                               op.affinity, op.flags)
            case planner.PutRange():
                self.ranges.add((op.svc_id, op.network))
            case planner.DeleteRange():
                self.ranges.discard((op.svc_id, op.network))
            case _MaglevRow():
                if op.slots is None:
                    self.maglev_rows.pop((op.svc_id, op.row), None)
                else:
                    self.maglev_rows[(op.svc_id, op.row)] = op.slots
            case planner.DeleteFrontend():
                self.frontends.pop(op.frontend, None)
        if self.sizes:
            for name, n in self.entries().items():
                self.peak[name] = max(self.peak.get(name, 0), n)

    def check(self, after: planner.MapOp | None = None) -> None:
        try:
            self._check(after)
        except InvariantBroken as broken:
            self.broken.append(broken)
            FakeServiceMaps.broken_anywhere.append(broken)
            raise

    def _check(self, after: planner.MapOp | None = None) -> None:
        tables = self.maglev if self.maglev_rows else {}
        for fkey, (svc_id, count, _, _, flags) in self.frontends.items():
            for slot in range(count):
                if (svc_id, slot) not in self.slots:
                    raise InvariantBroken(f"after {after}: {fkey} -> svc {svc_id} count "
                                          f"{count} but slot {slot} is missing")
            # a firewalled frontend without its ranges would drop every client
            if flags & planner.SVC_F_SOURCE_RANGES and not any(i == svc_id for i, _ in self.ranges):
                raise InvariantBroken(f"after {after}: {fkey} filters sources, none written")
            # a Maglev table names only slots that exist (the TC program also ignores
            # entries at or past the frontend's count: a table and a count written in
            # either order are safe)
            table = tables.get(svc_id)
            if flags & planner.SVC_F_MAGLEV and table and any((svc_id, slot) not in self.slots
                                                      for slot in set(table)):
                raise InvariantBroken(f"after {after}: {fkey} Maglev table names a slot "
                                      f"that is not there")

    def read_back(self) -> planner.AppliedState:
        ranges: dict[int, list] = {}
        for svc_id, network in self.ranges:
            ranges.setdefault(svc_id, []).append(network)
        return planner.kernel_state(((f, *entry) for f, entry in self.frontends.items()),
                                    ((svc_id, slot, *entry)
                                     for (svc_id, slot), entry in self.slots.items()), ranges,
                                    {svc_id: len(table) // planner.MAGLEV_ROW
                                     for svc_id, table in self.maglev.items()})


class _MaglevRow:
    """One bpfp_maglev row written (slots) or deleted (None): the unit the kernel takes."""
    __slots__ = ("svc_id", "row", "slots")
    __match_args__ = ("svc_id", "row", "slots")

    def __init__(self, svc_id: int, row: int, slots: tuple[int, ...] | None) -> None:
        self.svc_id, self.row, self.slots = svc_id, row, slots


def _steps(op: planner.MapOp) -> list:
    """The kernel entries one op writes: a Maglev table is several rows, the rest one."""
    if isinstance(op, planner.PutMaglev):
        return [_MaglevRow(op.svc_id, r // planner.MAGLEV_ROW,
                           tuple(op.table[r:r + planner.MAGLEV_ROW]) + (0,) * max(
                               0, r + planner.MAGLEV_ROW - len(op.table)))
                for r in range(0, len(op.table), planner.MAGLEV_ROW)]
    if isinstance(op, planner.DeleteMaglev):
        return [_MaglevRow(op.svc_id, r, None) for r in range(-(-op.size // planner.MAGLEV_ROW))]
    return [op]


def _by_family(ops: list, family_of) -> list[list]:
    """ops split by family, the families in the order they first appear (as maps._split)."""
    by_family: dict[int, list] = {}
    for op in ops:
        by_family.setdefault(family_of(op), []).append(op)
    return list(by_family.values())
