"""The map budget: how many entries the planner may put in each map. The maps' own sizes,
lowered to what a map held when it refused an insert, raised again as probes find room."""
from __future__ import annotations

import logging

from agent.planner import AppliedState, map_usage
from agent.service_maps import ServiceMaps

log = logging.getLogger(__name__)

BUDGET_STEP = 64           # entries a lowered map budget grows by, at least, per period


class MapBudget:
    def __init__(self, maps: ServiceMaps, maglev_m: int) -> None:
        self._maps = maps          # its capacity() and room_for(map, n)
        self._maglev_m = maglev_m
        self._capacity: dict[str, int] | None = None   # the maps' sizes; None: unbounded
        self._full_maps: set[str] = set()  # refused an insert: budget what they took
        self._clamps: dict[str, int] = {}  # map -> entries it took before refusing more

    def read(self) -> None:
        """Learn the maps' sizes (at start, and again with each kernel re-read)."""
        self._capacity = self._read_capacity()

    def limits(self) -> dict[str, int] | None:
        """Entries the planner may use in each map; None: unbounded."""
        if self._capacity is None:
            return None
        return {m: min(n, self._clamps.get(m, n)) for m, n in self._capacity.items()}

    def refused_insert(self, map_name: str) -> None:
        """A write failed because the map was full: its budget goes down at the re-read."""
        self._full_maps.add(map_name)

    def after_reread(self, applied: AppliedState, periodic: bool) -> None:
        """After a kernel re-read: a map that refused an insert the planner counted room
        for (memcg ENOMEM; someone else wrote to it) is budgeted at what it holds now, and
        stays so until the map takes more: a periodic re-read asks it (_raise_clamps)."""
        self.read()
        if periodic and self._clamps:
            self._raise_clamps()
        if not self._full_maps:
            return
        held = map_usage(applied.values(), self._maglev_m)
        for name in sorted(self._full_maps):
            self._clamps[name] = held.get(name, 0)
            log.warning("event=map_budget_lowered map=%s entries=%d max_entries=%s "
                        "reason=%r", name, self._clamps[name],
                        (self._capacity or {}).get(name, "unknown"),
                        "the map refused an insert; services that do not fit are refused")
        self._full_maps.clear()

    def _read_capacity(self) -> dict[str, int] | None:
        """The maps' sizes, which the planner budgets against."""
        try:
            return dict(self._maps.capacity())
        except Exception as exc:  # noqa: BLE001 -- keep the last sizes known
            log.error("event=capacity_read_failed error=%r", str(exc))
            return self._capacity

    def _raise_clamps(self) -> None:
        """A lowered budget doubles (at least BUDGET_STEP entries) each period the map takes
        that many more entries (probe entries no program reads, written and removed by
        maps.room_for), and goes once it reaches the map's size: never a failed sync to
        find out."""
        for name, clamp in sorted(self._clamps.items()):
            size = (self._capacity or {}).get(name, clamp)
            step = min(size - clamp, max(clamp, BUDGET_STEP))
            try:
                taken = self._maps.room_for(name, step)
            except Exception as exc:  # noqa: BLE001 -- keep the budget, ask next period
                log.error("event=map_probe_failed map=%s error=%r", name, str(exc))
                taken = False
            if not taken:
                continue
            if clamp + step >= size:
                del self._clamps[name]
            else:
                self._clamps[name] = clamp + step
            log.info("event=map_budget_raised map=%s entries=%d max_entries=%d", name,
                     min(clamp + step, size), size)
