"""ServiceMaps: the one kernel door the agent writes through, and everything it asks of it.

BpfServiceMaps (agent/datapath/maps.py) is the real door, FakeServiceMaps (tests/fakes.py)
the unit tests'; tests/unit/test_service_maps.py checks that both have every method here
and that the agent calls nothing else on its maps."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol as TypingProtocol

from agent.model.types import Protocol
from agent.planner import AppliedState, MapOp


class ServiceMaps(TypingProtocol):
    def apply(self, ops: Sequence[MapOp]) -> None:
        """Write ops in their order; MapFullError when a map refuses an insert."""

    def read_back(self) -> AppliedState:
        """What the maps hold, rebuilt from the maps alone (how a restarted agent adopts)."""

    def supports(self, family: int, protocol: Protocol) -> bool:
        """Whether this datapath serves service ports of that family and protocol."""

    def capacity(self) -> dict[str, int]:
        """max_entries of each map the planner budgets (planner.Capacity), as held now."""

    def room_for(self, map_name: str, entries: int) -> bool:
        """Whether that map takes `entries` more entries now (a map may refuse below its
        size); probes with entries no program reads, and removes them again."""

    def forget_counters(self, svc_ids: set[int]) -> int:
        """Delete the counters of these service ports (gone, so their ids are reused);
        returns how many entries went."""
