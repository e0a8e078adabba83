"""Names kube-proxy derives from a service port: its ServicePortName string, the ordering the
bench renders in, and usable IPv4 backends as kube-proxy lists them; port_views gives both
renderers (iptables.py, nftables.py) each port as they walk it. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass

from agent.model.types import (
    Backend,
    DesiredState,
    Frontend,
    FrontendKind,
    ServicePortName,
    ServicePortState,
)


def port_name_string(name: ServicePortName) -> str:
    """proxy.ServicePortName.String(): "ns/name:port", or "ns/name" for an unnamed port."""
    port = f":{name.port_name}" if name.port_name else ""
    return f"{name.namespace}/{name.name}{port}"


def protocol_lower(name: ServicePortName) -> str:
    # Both proxiers build names and matches from strings.ToLower(protocol).
    return name.protocol.value.lower()


def endpoint_string(backend: Backend) -> str:
    """BaseEndpointInfo.String(): net.JoinHostPort(ip, port) (IPv4 only here)."""
    return f"{backend.address}:{backend.port}"


def service_order(desired: DesiredState) -> list[ServicePortName]:
    """The IPv4 service ports in the order the bench renders them (KUBE-SERVICES order).

    kube-proxy walks a Go map, so its order is random per sync; we fix it by the
    ServicePortName string then protocol (the order kube-proxy's tests normalise to with
    sortIPTablesRules), so the bench knows the first and last service a packet walks past."""
    names = {name for (name, family) in desired if family == 4}
    return sorted(names, key=lambda n: (port_name_string(n), n.protocol.value))


def ordered_states(desired: DesiredState) -> list[ServicePortState]:
    return [desired[name, 4] for name in service_order(desired)]


def cluster_ips(state: ServicePortState) -> list:
    return [f for f in state.frontends if f.kind is FrontendKind.CLUSTER_IP]


def external_frontends(state: ServicePortState, kind: FrontendKind) -> list:
    """The port's frontends of one external kind (NodePort, ExternalIP, LoadBalancer)."""
    return [f for f in state.frontends if f.kind is kind]


def node_ports(state: ServicePortState) -> list[int]:
    """The port's NodePort numbers (the model has one frontend per node IP; kube-proxy's
    rules match the port on every local address, or on the NodePort addresses)."""
    return sorted({f.port for f in external_frontends(state, FrontendKind.NODE_PORT)})


def check_cluster_policy(state: ServicePortState) -> None:
    """The bench mirrors the external layout of externalTrafficPolicy Cluster without
    loadBalancerSourceRanges only: say so rather than render something kube-proxy would not."""
    if state.outside_backends != state.external_backends or state.source_ranges:
        raise ValueError(f"{port_name_string(state.name)}: externalTrafficPolicy Local and "
                         "loadBalancerSourceRanges are not mirrored by the bench's layouts")


def sorted_backends(state: ServicePortState) -> list[Backend]:
    """Endpoints in kube-proxy's order: EndpointsMap sorts them by their "ip:port" string
    (byEndpoint), not numerically, and that order decides the probability ladder."""
    return sorted(state.backends, key=endpoint_string)


@dataclass(frozen=True)
class PortView:
    """One IPv4 service port as both proxiers walk it in syncProxyRules."""

    name: ServicePortName
    proto: str                              # protocol_lower
    port_name: str                          # port_name_string
    backends: list[Backend]                 # sorted_backends
    cluster_ips: list[Frontend]
    externals: list[Frontend]               # external IPs, then load balancer IPs
    node_ports: list[int]
    has_external: bool                      # any NodePort, ExternalIP or LoadBalancer


def port_views(desired: DesiredState) -> list[PortView]:
    """The IPv4 service ports in service_order; one with external destinations is checked
    first (check_cluster_policy), as the bench renders externalTrafficPolicy Cluster only."""
    views = []
    for state in ordered_states(desired):
        has_external = any(f.kind.external for f in state.frontends)
        if has_external:
            check_cluster_policy(state)
        views.append(PortView(
            name=state.name, proto=protocol_lower(state.name),
            port_name=port_name_string(state.name), backends=sorted_backends(state),
            cluster_ips=cluster_ips(state),
            externals=[*external_frontends(state, FrontendKind.EXTERNAL_IP),
                       *external_frontends(state, FrontendKind.LOAD_BALANCER)],
            node_ports=node_ports(state), has_external=has_external))
    return views
