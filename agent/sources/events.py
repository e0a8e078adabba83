"""What every source yields: ObjectChange, one object's new version or its deletion.
A source's first batch is the complete initial listing; later batches carry only changes."""
from __future__ import annotations

from dataclasses import dataclass

from agent.model.types import EndpointSlice, ObjectKey, Service


@dataclass(frozen=True, slots=True)
class ObjectChange:
    key: ObjectKey
    obj: Service | EndpointSlice | None   # None: the object was deleted
