"""Which endpoints serve Cluster and Local traffic policy on this node, topology hints applied.
Pure; a line-by-line port of kube-proxy's pkg/proxy/topology.go (CategorizeEndpoints)."""
from __future__ import annotations

from collections.abc import Sequence

from agent.model.endpoints import EndpointInfo
from agent.model.types import Backend

# topologyModeFromHints' results (v1.ServiceTrafficDistributionPreferSame*).
NO_TOPOLOGY = ""
PREFER_SAME_ZONE = "PreferSameZone"
PREFER_SAME_NODE = "PreferSameNode"

# Why the Service is not consulted here: since Kubernetes 1.33 kube-proxy reads only the
# EndpointSlice hints. spec.trafficDistribution (PreferClose = PreferSameZone, and
# PreferSameNode) and the service.kubernetes.io/topology-mode / topology-aware-hints
# annotations tell the EndpointSlice controller to write hints.forZones / hints.forNodes;
# kube-proxy honours hints whoever wrote them, and ignores the annotations.


def topology_mode(endpoints: Sequence[EndpointInfo], node_name: str, zone: str) -> str:
    """topology.go topologyModeFromHints: PreferSameNode when every ready endpoint has a
    node hint and one names this node; else PreferSameZone when every ready endpoint has a
    zone hint and one names this node's zone; else no topology (one unhinted ready
    endpoint, or nothing hinted for us, turns it off: the hints are all-or-nothing)."""
    has_ready = False
    all_node_hints = all_zone_hints = True
    for_node = for_zone = False
    for endpoint in endpoints:
        if not endpoint.ready:
            continue
        has_ready = True
        if not endpoint.node_hints:
            all_node_hints = False
        elif node_name in endpoint.node_hints:
            for_node = True
        if not endpoint.zone_hints:
            all_zone_hints = False
        elif zone in endpoint.zone_hints:
            for_zone = True
    if not has_ready:
        return NO_TOPOLOGY
    # The PreferSameTrafficDistribution gate that guards node hints is GA (locked on) in 1.35.
    if all_node_hints and for_node:
        return PREFER_SAME_NODE
    if all_zone_hints and for_zone:
        return PREFER_SAME_ZONE
    return NO_TOPOLOGY


def available_for_topology(endpoint: EndpointInfo, mode: str, node_name: str, zone: str
                           ) -> bool:
    """topology.go availableForTopology: no fallback here; it happened choosing the mode."""
    if mode == NO_TOPOLOGY:
        return True
    if mode == PREFER_SAME_NODE:
        return node_name in endpoint.node_hints
    return zone in endpoint.zone_hints


def categorize_endpoints(endpoints: Sequence[EndpointInfo], uses_cluster: bool,
                         uses_local: bool, node_name: str, zone: str, hinted: bool = True
                         ) -> tuple[tuple[Backend, ...] | None, tuple[Backend, ...] | None,
                                    bool]:
    """(cluster, local, has_any_endpoints), as topology.go CategorizeEndpoints returns them.

    cluster: ready endpoints available for the topology mode; when there are none, the
    serving-and-terminating ones anywhere. None when the port never uses Cluster policy.
    local: this node's ready endpoints, else its serving-and-terminating ones, never
    topology-filtered. None when the port never uses Local policy.
    has_any_endpoints: some endpoint anywhere is ready, or serving and terminating.
    hinted=False is a promise that no endpoint has hints (skips the topology scan)."""
    cluster = local = None
    has_any = False
    if uses_cluster:
        mode = topology_mode(endpoints, node_name, zone) if hinted else NO_TOPOLOGY
        if mode == NO_TOPOLOGY:
            cluster = tuple([e.backend for e in endpoints if e.ready])
        else:
            cluster = tuple([e.backend for e in endpoints
                             if e.ready and available_for_topology(e, mode, node_name, zone)])
        if not cluster:
            # No ready endpoint in the topology means none anywhere: the mode is only
            # chosen when one is hinted for us. Fall back to the draining ones.
            cluster = tuple([e.backend for e in endpoints if e.serving and e.terminating])
        has_any = bool(cluster)
    if not uses_local:
        return cluster, local, has_any
    has_local_ready = has_local_serving_terminating = False
    for e in endpoints:
        is_local = bool(node_name) and e.backend.node_name == node_name   # isLocal
        if e.ready:
            has_any = True
            has_local_ready = has_local_ready or is_local
        elif e.serving and e.terminating:
            has_any = True
            has_local_serving_terminating = has_local_serving_terminating or is_local
    if has_local_ready:
        local = tuple([e.backend for e in endpoints
                       if e.ready and e.backend.node_name == node_name])
    elif has_local_serving_terminating:
        local = tuple([e.backend for e in endpoints
                       if e.serving and e.terminating and e.backend.node_name == node_name])
    else:
        local = ()
    return cluster, local, has_any
