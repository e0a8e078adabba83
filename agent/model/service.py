"""Service side of the model: the (service port, IP family) units a Service yields, each with its
frontends of every kind and its policies. Pure; mirrors serviceport.go, servicechangetracker.go."""
from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from agent.model.types import (
    Frontend,
    FrontendKind,
    IPAddress,
    IPNetwork,
    Service,
    ServicePortName,
)

# Every one of these types has a ClusterIP frontend; NodePort and LoadBalancer add more
# frontends. ExternalName is a DNS alias with nothing to proxy.
CLUSTER_IP_TYPES = frozenset({"ClusterIP", "NodePort", "LoadBalancer"})

_CLUSTER_IP, _EXTERNAL_IP = FrontendKind.CLUSTER_IP, FrontendKind.EXTERNAL_IP
_LOAD_BALANCER, _NODE_PORT = FrontendKind.LOAD_BALANCER, FrontendKind.NODE_PORT


@dataclass(frozen=True, slots=True)
class ServicePortInfo:
    """kube-proxy's BaseServicePortInfo for one family: what the endpoint choice depends on."""
    name: ServicePortName
    family: int
    frontends: tuple[Frontend, ...]     # sorted by sort_key, one per address/port/protocol
    externally_accessible: bool         # nodePort set, or an ExternalIP / LB VIP of family
    internal_policy_local: bool
    external_policy_local: bool
    session_affinity_timeout: int
    source_ranges: tuple[IPNetwork, ...] = ()     # ServicePortState.source_ranges

    @property
    def uses_cluster_endpoints(self) -> bool:
        # "Even if the external traffic policy is Local, we need Cluster endpoints to
        # implement short circuiting" (serviceport.go UsesClusterEndpoints).
        return not self.internal_policy_local or self.externally_accessible

    @property
    def uses_local_endpoints(self) -> bool:
        return self.internal_policy_local or \
            (self.external_policy_local and self.externally_accessible)


def proxied(service: Service) -> bool:
    """False for what kube-proxy never programs: objects its informers' label selector
    filters out (server.go), and ShouldSkipService's headless and ExternalName."""
    return (not service.excluded_by_label and not service.headless
            and service.type in CLUSTER_IP_TYPES and bool(service.cluster_ips))


def cluster_ips_by_family(service: Service) -> dict[int, IPAddress]:
    """The service's cluster IP of each family, first one winning, as kube-proxy's
    GetClusterIPByFamily does. Empty for what is not proxied."""
    if not proxied(service):
        return {}
    by_family: dict[int, IPAddress] = {}
    for ip in service.cluster_ips:
        by_family.setdefault(ip.version, ip)
    return by_family


def external_policy_local(service: Service) -> bool:
    """pkg/api/v1/service/util.go ExternalPolicyLocal: the policy counts only on services
    that are externally accessible (NodePort, LoadBalancer, ClusterIP with externalIPs)."""
    if service.external_traffic_policy != "Local":
        return False
    return service.type in ("NodePort", "LoadBalancer") or \
        (service.type == "ClusterIP" and bool(service.external_ips))


def service_port_infos(service: Service, node_port_ips: Mapping[int, tuple[IPAddress, ...]],
                       primary_node_ips: Mapping[int, IPAddress] | None = None
                       ) -> Iterator[ServicePortInfo]:
    """One ServicePortInfo per service port and cluster IP family (servicechangetracker.go
    serviceToServiceMap, run once per family). A service port is identified by name and
    protocol, never by number (ServicePortName). node_port_ips: NodePort addresses by family;
    primary_node_ips: this node's IP by family (kube-proxy's nodeIP, for source ranges)."""
    internal_local = service.internal_traffic_policy == "Local"
    external_local = external_policy_local(service)
    affinity = service.session_affinity_timeout
    for family, cluster_ip in sorted(cluster_ips_by_family(service).items()):
        # Filtered to the family, as newBaseServiceInfo does; ipMode Proxy ingress points
        # are left to the load balancer (proxyutil.IsVIPMode).
        external_ips = [ip for ip in service.external_ips if ip.version == family]
        lb_vips = [i.ip for i in service.load_balancer_ingress
                   if i.ip_mode == "VIP" and i.ip.version == family]
        ranges = source_ranges(service, family, lb_vips,
                               (primary_node_ips or {}).get(family))
        node_ips = node_port_ips.get(family, ())
        for port in service.ports:
            name = ServicePortName(service.namespace, service.name, port.name, port.protocol)
            protocol, number = port.protocol, port.port
            frontends = [Frontend(cluster_ip, number, protocol, _CLUSTER_IP)]
            if external_ips or lb_vips or (port.node_port and node_ips):
                # Precedence when one address and port is claimed twice follows the order
                # of iptables/proxier.go's KUBE-SERVICES rules (clusterIP, externalIPs,
                # LB ingress, then KUBE-NODEPORTS last): the first one listed wins.
                frontends += [Frontend(ip, number, protocol, _EXTERNAL_IP) for ip in external_ips]
                frontends += [Frontend(ip, number, protocol, _LOAD_BALANCER) for ip in lb_vips]
                if port.node_port:
                    frontends += [Frontend(ip, port.node_port, protocol, _NODE_PORT)
                                  for ip in node_ips]
                frontends = _first_claim_wins(frontends)
            yield ServicePortInfo(
                name, family, tuple(frontends),
                externally_accessible=bool(port.node_port or external_ips or lb_vips),
                internal_policy_local=internal_local, external_policy_local=external_local,
                session_affinity_timeout=affinity, source_ranges=ranges)


_LOOPBACK = {4: ipaddress.ip_address("127.0.0.1"), 6: ipaddress.ip_address("::1")}


def source_ranges(service: Service, family: int, lb_vips: list[IPAddress],
                  node_ip: IPAddress | None) -> tuple[IPNetwork, ...]:
    """The family's loadBalancerSourceRanges (serviceport.go newBaseServiceInfo), sorted and
    de-duplicated; () when one of them is a /0 (IsZeroCIDR: "allow any"). When one contains
    this node's IP, the VIPs join them (proxier.go allowFromNode); kube-proxy without a node
    IP of the family assumes loopback."""
    ranges = {r for r in service.load_balancer_source_ranges if r.version == family}
    if not ranges or any(r.prefixlen == 0 for r in ranges):
        return ()
    node_ip = node_ip or _LOOPBACK[family]
    if any(node_ip in r for r in ranges):
        ranges.update(ipaddress.ip_network(vip) for vip in lb_vips)
    return tuple(sorted(ranges, key=lambda r: (int(r.network_address), r.prefixlen)))


def _first_claim_wins(frontends: list[Frontend]) -> list[Frontend]:
    seen: dict[tuple, Frontend] = {}
    for frontend in frontends:
        seen.setdefault((frontend.address, frontend.port, frontend.protocol), frontend)
    return sorted(seen.values(), key=Frontend.sort_key)
