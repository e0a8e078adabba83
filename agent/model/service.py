"""Service side of the model: the (service port, IP family) units a Service yields and the
ClusterIP frontend of each. Pure; mirrors kube-proxy's serviceport.go, servicechangetracker.go."""
from __future__ import annotations

from collections.abc import Iterator

from agent.model.types import Frontend, FrontendKind, IPAddress, Service, ServicePortName

# Every one of these types has a ClusterIP frontend; NodePort and LoadBalancer add more
# frontends later. ExternalName is a DNS alias with nothing to proxy.
CLUSTER_IP_TYPES = frozenset({"ClusterIP", "NodePort", "LoadBalancer"})


def cluster_ips_by_family(service: Service) -> dict[int, IPAddress]:
    """The service's cluster IP of each family, first one winning, as kube-proxy's
    GetClusterIPByFamily does. Empty for headless and ExternalName (ShouldSkipService)."""
    if service.type not in CLUSTER_IP_TYPES or service.headless:
        return {}
    by_family: dict[int, IPAddress] = {}
    for ip in service.cluster_ips:
        by_family.setdefault(ip.version, ip)
    return by_family


def cluster_ip_frontends(service: Service) -> Iterator[tuple[ServicePortName, int, Frontend]]:
    """One (service port name, family, frontend) per service port and cluster IP family.
    A service port is identified by name and protocol, never by number (ServicePortName)."""
    for family, ip in sorted(cluster_ips_by_family(service).items()):
        for port in service.ports:
            name = ServicePortName(service.namespace, service.name, port.name, port.protocol)
            yield name, family, Frontend(ip, port.port, port.protocol, FrontendKind.CLUSTER_IP)
