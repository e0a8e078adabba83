"""The change tracker: source events filed under the Service they belong to, and which
Services changed since the last sync took them (kube-proxy's Service and Endpoints change
trackers: record, then checkout). It lives on the loop; a sync reads a snapshot of it."""
from __future__ import annotations

import time
from dataclasses import dataclass

from agent.model.types import EndpointSlice, Node, NodeContext, ObjectKey, Service
from agent.sources.events import ObjectChange

ServiceName = tuple[str, str]          # (namespace, name)


@dataclass(frozen=True, slots=True)
class Checkout:
    """What changed since the last checkout."""
    services: set[ServiceName]         # Services whose object or EndpointSlices changed
    since: float | None                # monotonic time the oldest change arrived; None: none
    node_changed: bool                 # topology and NodePorts depend on it: replan all


class ChangeTracker:
    def __init__(self, node_name: str) -> None:
        self._node_name = node_name    # picks this node's Node object (zone, addresses)
        self._services: dict[ServiceName, Service] = {}
        self._slices: dict[ServiceName, dict[ObjectKey, EndpointSlice]] = {}
        self._slice_owner: dict[ObjectKey, ServiceName] = {}
        self._changed: set[ServiceName] = set()
        self._node_object: Node | None = None
        self._node_changed = False
        self._pending_since: float | None = None   # oldest change not yet in the kernel

    @property
    def service_count(self) -> int:
        return len(self._services)

    def record_batch(self, batch: list[ObjectChange]) -> None:
        """A batch from the source: stamped when it is the first change not yet taken."""
        if batch and self._pending_since is None:
            self._pending_since = time.monotonic()
        for change in batch:
            self.record(change)

    def record(self, change: ObjectChange) -> None:
        """File the change under its service and mark that service changed."""
        key, obj = change.key, change.obj
        if key.kind == "Service":
            name = (key.namespace, key.name)
            if obj is None:
                self._services.pop(name, None)
            else:
                self._services[name] = obj
            self._changed.add(name)
        elif key.kind == "Node":
            if key.name == self._node_name:
                self._node_object = obj
                self._node_changed = True
        elif key.kind == "EndpointSlice":
            old_owner = self._slice_owner.pop(key, None)
            if old_owner is not None:
                self._slices[old_owner].pop(key, None)
                if not self._slices[old_owner]:
                    del self._slices[old_owner]
                self._changed.add(old_owner)
            if obj is not None:
                owner = (key.namespace, obj.service_name)
                self._slices.setdefault(owner, {})[key] = obj
                self._slice_owner[key] = owner
                self._changed.add(owner)

    def checkout(self) -> Checkout:
        """What changed since the last checkout; the tracker starts afresh."""
        taken = Checkout(self._changed, self._pending_since, self._node_changed)
        self._changed, self._pending_since, self._node_changed = set(), None, False
        return taken

    def not_applied(self, since: float | None) -> None:
        """A sync that took changes arriving at `since` failed: they are still not in the
        kernel, so the oldest stamp stays."""
        if since is not None:
            self._pending_since = min(since, self._pending_since or since)

    def snapshot(self, full: bool, services: set[ServiceName], node: NodeContext):
        """What the sync step reads, copied on the loop (the source keeps changing the
        dicts): this node, and every object, or each of `services` with its slices."""
        node = NodeContext.from_node(self._node_object, node.node_name, node.node_ips,
                                     node.node_port_cidrs)
        if full:
            return node, list(self._services.values()), \
                [s for by_key in self._slices.values() for s in by_key.values()]
        return node, {name: (self._services.get(name),
                             list(self._slices.get(name, {}).values())) for name in services}
