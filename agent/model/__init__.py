"""The pure model: Services, EndpointSlices and this node in, desired state (one
ServicePortState per service port and IP family) out. No I/O; kube-proxy's pkg/proxy semantics."""
from __future__ import annotations

from collections.abc import Iterable

from agent.model.endpoints import EndpointGroup, endpoints_by_service_port
from agent.model.service import service_port_infos
from agent.model.topology import categorize_endpoints
from agent.model.types import (
    DesiredState,
    EndpointSlice,
    NodeContext,
    Service,
    ServicePortState,
)

__all__ = ["NodeContext", "desired_state"]

_NO_NODE = NodeContext()
_NO_ENDPOINTS = EndpointGroup((), False)


def desired_state(services: Iterable[Service], slices: Iterable[EndpointSlice],
                  node: NodeContext | None = None) -> DesiredState:
    """Every frontend of every proxied service port with the backends each kind of traffic
    gets (ServicePortState documents the three sets). A port without usable backends is
    kept with none, so the datapath refuses (or, has_any_endpoints, drops) its traffic.

    node: this node's name, IPs, NodePort CIDRs and zone. Without it there are no NodePort
    frontends, no endpoint counts as local (Local traffic policies find none, as kube-proxy
    with an empty node name, and no Backend is marked local) and zone/node hints never
    match."""
    node = node or _NO_NODE
    node_name, zone = node.node_name, node.zone
    node_port_ips = {4: node.node_port_ips(4), 6: node.node_port_ips(6)}
    # kube-proxy's nodeIP of each family: the first one (source ranges' allowFromNode)
    primary_ips = {ip.version: ip for ip in reversed(node.node_ips)}
    endpoints = endpoints_by_service_port(slices, node)
    state: DesiredState = {}
    for service in services:
        for info in service_port_infos(service, node_port_ips, primary_ips):
            key = (info.name, info.family)
            group = endpoints.get(key, _NO_ENDPOINTS)
            internal_local, external_local = info.internal_policy_local, info.external_policy_local
            cluster, local, has_any = categorize_endpoints(
                group.endpoints, info.uses_cluster_endpoints, info.uses_local_endpoints,
                node_name, zone, group.hinted)
            backends = local if internal_local else cluster
            # External sets only where an external frontend uses them: a nodePort on a node
            # without NodePort addresses is "externally accessible" to kube-proxy all the same.
            if info.externally_accessible and len(info.frontends) > 1:
                # Started on this node: short-circuited to the Cluster-policy endpoints
                # (nftables/proxier.go "short-circuit pod traffic" / "... local traffic").
                external = cluster
                outside = local if external_local else cluster
            else:
                external = outside = ()
            state[key] = ServicePortState(
                info.name, info.family, info.frontends, backends or (), external or (),
                outside or (), info.session_affinity_timeout, has_any, info.source_ranges)
    return state
