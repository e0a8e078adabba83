"""Pure diff of desired state against what the kernel holds, into ordered map operations.

Backend slots are written before the frontend that points at them; a frontend is removed
before its slots; unchanged service ports produce no operations. One concern per file:

  kernel.py       the kernel's vocabulary: keys, what a service port holds, map ops, Plan,
                  kernel_state(); what the datapath, the API and the tests share
  scopes.py       named keys (PortKey, PartKey), by_scope parts, port_hash, new ids
  full.py         plan(): everything desired against everything the kernel holds
  incremental.py  plan_changes(): only what changed, as an overlay on the last plan
  overlay.py      Overlay (read through, written locally) and commit()
  entries.py      one service port's entry: claimed frontends, stable slots, flags
  diff.py         the ordered map operations between two states
  capacity.py     entries per map, refusals, the fit-to-capacity loop both plans share

desired state -> by_scope -> plan / plan_changes (entries, diff, capacity) -> Plan."""
from agent.planner.capacity import Capacity, map_usage
from agent.planner.full import plan
from agent.planner.incremental import plan_changes
from agent.planner.kernel import (
    BE_LOCAL,
    MAGLEV_ROW,
    SVC_F_MAGLEV,
    SVC_F_SOURCE_RANGES,
    AppliedState,
    BackendAddr,
    DeleteFrontend,
    DeleteMaglev,
    DeleteRange,
    DeleteSlot,
    FrontendEntry,
    FrontendKey,
    KernelService,
    MapFullError,
    MapOp,
    Plan,
    PutFrontend,
    PutMaglev,
    PutRange,
    PutSlot,
    SlotEntry,
    kernel_state,
)
from agent.planner.overlay import Overlay, commit
from agent.planner.scopes import (
    EXTERNAL,
    FIREWALLED,
    INTERNAL,
    OUTSIDE,
    SCOPE_NAMES,
    PartKey,
    PortKey,
    ServiceKey,
    by_scope,
    port_hash,
)

__all__ = [
    "BE_LOCAL", "EXTERNAL", "FIREWALLED", "INTERNAL", "MAGLEV_ROW", "OUTSIDE", "SCOPE_NAMES",
    "SVC_F_MAGLEV", "SVC_F_SOURCE_RANGES", "AppliedState", "BackendAddr", "Capacity",
    "DeleteFrontend", "DeleteMaglev", "DeleteRange", "DeleteSlot", "FrontendEntry",
    "FrontendKey", "KernelService", "MapFullError", "MapOp", "Overlay", "PartKey", "Plan",
    "PortKey", "PutFrontend", "PutMaglev", "PutRange", "PutSlot", "ServiceKey", "SlotEntry",
    "by_scope", "commit", "kernel_state", "map_usage", "plan", "plan_changes", "port_hash",
]
