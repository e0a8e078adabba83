"""What the API, metrics and health read, in one place: the agent's status, its source,
the kernel inventory and the event hub. Readers only; nothing here writes applied state."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib import metadata

from agent.api.events import EventHub
from agent.datapath import layout
from agent.datapath.inventory import Inventory
from agent.planner.capacity import BUDGETED_MAPS
from agent.status import AgentStatus

# error counters a source may keep (manifests: parse_errors, refused_files,
# malformed_documents; kube: api_errors, malformed_events)
SOURCE_COUNTERS = ("invalid_objects", "parse_errors", "refused_files", "malformed_documents",
                   "api_errors", "malformed_events")


def agent_version() -> str:
    try:
        return metadata.version("bpfproxy")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class Observed:
    status: AgentStatus
    inventory: Inventory | None = None      # None: no kernel to read (unit tests)
    hub: EventHub = field(default_factory=EventHub)
    source: object | None = None    # .complete, .held_back and the SOURCE_COUNTERS it has
    source_kind: str = ""
    source_location: str = ""
    sync_period: float = 30.0               # health: a sync older than 2x this is stale
    version: str = field(default_factory=agent_version)
    started_unix: float = field(default_factory=time.time)
    invalid_requests: int = 0               # API requests refused as malformed
    watches_stalled: int = 0                # WatchEvents streams ended: client not reading

    @property
    def map_entries(self) -> dict[str, int] | None:
        """Entries of the maps only the agent writes (frontends, backend slots, source
        ranges, Maglev rows), by pin name, from the last plan the kernel took: what status
        and metrics show without walking them (300k entries at 50k services, every second
        while polled). None before the first sync: the kernel then holds what an earlier
        agent left, known only by reading it. Exact while the agent is the maps' only
        writer; a write that failed makes the next sync re-read the kernel."""
        view = self.status.view
        if not self.status.synced or view.usage is None:
            return None
        return {layout.MAPS[name].pin: view.usage.get(name, 0) for name in BUDGETED_MAPS}

    @property
    def source_complete(self) -> bool:
        return bool(getattr(self.source, "complete", True))

    @property
    def source_held_back(self) -> tuple:
        """What the source holds back (sources.events.HeldBack), read at request time."""
        return tuple(getattr(self.source, "held_back", ()) or ())

    @property
    def allocations(self) -> dict:
        """What the manifest source allocated, by (namespace, name); {} for other sources."""
        return getattr(getattr(self.source, "control_plane", None), "allocations", {}) or {}

    @property
    def admission_problems(self) -> tuple:
        """(namespace, name, why, served) of Services the manifest source could not store
        as a cluster would (agent/sources/apiserver)."""
        return tuple(getattr(getattr(self.source, "control_plane", None), "problems", ()))

    @property
    def source_stalled(self) -> str:
        """Why the source is stuck (the manifest source's `stalled`); "" when it is not."""
        return str(getattr(self.source, "stalled", "") or "")

    def errors(self) -> dict[str, int]:
        """Errors since start, by kind (GetStatus.errors, bpfproxy_errors_total)."""
        out = {"sync": self.status.sync_errors,
               "source": self.hub.errors.get("source_failed", 0),
               "invalid_request": self.invalid_requests,
               "events_dropped": self.hub.dropped,
               "watch_stalled": self.watches_stalled,
               "kernel_read": self.inventory.read_errors if self.inventory else 0,
               "frontend_conflict": self.hub.errors.get("conflict", 0),
               "capacity": self.status.services_refused}
        control_plane = getattr(self.source, "control_plane", None)
        if isinstance(getattr(control_plane, "failures", None), int):
            out["source_admission"] = control_plane.failures
        for name in SOURCE_COUNTERS:
            value = getattr(self.source, name, None)
            if isinstance(value, int):
                out[f"source_{name}"] = value
        return out
