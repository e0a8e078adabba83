"""Service health checks: the healthCheckNodePort each eTP Local LoadBalancer service is probed
on, and how many ready endpoints it has on this node. Pure; mirrors pkg/proxy/healthcheck."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.model.endpoints import endpoints_by_service_port
from agent.model.service import cluster_ips_by_family
from agent.model.types import EndpointSlice, NodeContext, Service

ServiceName = tuple[str, str]              # (namespace, name)


@dataclass(frozen=True, slots=True)
class ServiceHealth:
    """What the health check server answers for one service on this node.

    local_endpoints: kube-proxy's LocalReadyEndpoints: this node's ready endpoints of the
    service, counted once per address whatever its ports (10.0.0.1:80 and :443 are one),
    never the terminating ones ("the health check signal should fail if there are only
    terminating endpoints on a node"). It is the count of the service's primary family.
    by_family: the same count per IP family of the service; kube-proxy runs one proxier,
    hence one health server, per family, and since 1.36 (#137370) each answers on its own
    family's sockets with its own family's count."""
    namespace: str
    name: str
    local_endpoints: int
    by_family: tuple[tuple[int, int], ...] = ()     # ((family, count), ...)

    def local_endpoints_for(self, family: int) -> int:
        """The count for a probe that arrived over `family`; a family the service lacks
        gets the primary family's count (a socket of both families answers it)."""
        for have, count in self.by_family:
            if have == family:
                return count
        return self.local_endpoints


def health_check_node_port(service: Service) -> int:
    """The port to serve, 0 for none: proxied services only, and only when the API says a
    health check is needed (apiservice.NeedsHealthCheck: type LoadBalancer, eTP Local).
    A needed port left at 0 is kube-proxy's "Service has no healthcheck nodeport"."""
    if service.type != "LoadBalancer" or service.external_traffic_policy != "Local":
        return 0
    return service.health_check_node_port if cluster_ips_by_family(service) else 0


def service_health_parts(services: Iterable[Service], slices: Iterable[EndpointSlice],
                         node: NodeContext | None = None
                         ) -> dict[ServiceName, tuple[int, ServiceHealth]]:
    """(port, health) of each service that needs a health check, by service. The slices may
    be all of them or only the services'; others are ignored (an incremental sync passes
    one service and its slices)."""
    checked = {(s.namespace, s.name): s for s in services if health_check_node_port(s)}
    if not checked:
        return {}
    node_name = (node or NodeContext()).node_name
    own = [s for s in slices if (s.namespace, s.service_name) in checked]
    local: dict[tuple[str, str, int], set] = {}
    # The endpoints as kube-proxy's EndpointsMap holds them: per slice port, de-duplicated
    # the way endpointslicecache.go does (a slice without ports contributes nothing).
    for (port_name, family), group in endpoints_by_service_port(own).items():
        addresses = local.setdefault((port_name.namespace, port_name.name, family), set())
        for info in group.endpoints:
            if info.ready and node_name and info.backend.node_name == node_name:   # isLocal
                addresses.add(info.backend.address)
    parts = {}
    for key, service in checked.items():
        counts = tuple((family, len(local.get((*key, family), ())))
                       for family in cluster_ips_by_family(service))    # primary first
        parts[key] = (health_check_node_port(service),
                      ServiceHealth(*key, counts[0][1], counts))
    return parts


def by_port(parts: Mapping[ServiceName, tuple[int, ServiceHealth]]) -> dict[int, ServiceHealth]:
    """One service per port. The API server's allocator never hands one port to two
    services; manifests can, and then the first by namespace/name wins, on every node."""
    ports: dict[int, ServiceHealth] = {}
    for name in sorted(parts):
        port, health = parts[name]
        ports.setdefault(port, health)
    return ports


def service_health(services: Iterable[Service], slices: Iterable[EndpointSlice],
                   node: NodeContext | None = None) -> dict[int, ServiceHealth]:
    """healthCheckNodePort -> the service it reports on, with this node's ready endpoints:
    kube-proxy's HealthCheckNodePorts() joined with LocalReadyEndpoints(). Without a node
    name nothing is local, and every service reports 0."""
    return by_port(service_health_parts(services, slices, node))
