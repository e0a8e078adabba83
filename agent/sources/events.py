"""What every source yields: ObjectChange, one object's new version or its deletion, and
what it tells of input it could not read (HeldBack). A source's first batch is the
complete initial listing; later batches carry only changes."""
from __future__ import annotations

from dataclasses import dataclass

from agent.model.types import EndpointSlice, Node, ObjectKey, Service


@dataclass(frozen=True, slots=True)
class ObjectChange:
    key: ObjectKey
    obj: Service | EndpointSlice | Node | None   # None: the object was deleted


@dataclass(frozen=True, slots=True)
class HeldBack:
    """Input a source cannot take as it is now: its objects stay at their last good
    version (listed as such) until it reads again. Only they wait; every other change,
    deletions included, goes on (kube-proxy never holds back all deletions for one bad
    object)."""
    origin: str                          # the file, or the watched resource
    reason: str                          # why, as logged
    objects: tuple[ObjectKey, ...] = ()  # kept at their last good version meanwhile
    # never read in this run (unreadable since the start): what it held is unknown, so
    # kernel state adopted at start that no listed object claims may be its own
    unknown: bool = False

    def __str__(self) -> str:
        return f"{self.origin}: {self.reason}"
