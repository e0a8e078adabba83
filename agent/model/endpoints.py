"""Endpoint side of the model: EndpointSlices grouped by (service port name, IP family), and
the usable backends of each. Pure; mirrors kube-proxy's endpointslicecache.go and topology.go."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from agent.model.types import (
    Backend,
    BackendState,
    EndpointSlice,
    IPAddress,
    ServicePortName,
)

_FAMILIES = {"IPv4": 4, "IPv6": 6}   # FQDN slices are ignored (endpointschangetracker.go)


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """kube-proxy's BaseEndpointInfo: one address and port with its conditions."""
    address: IPAddress
    port: int
    ready: bool
    serving: bool
    terminating: bool
    node_name: str = ""
    zone: str = ""

    def preference(self) -> tuple[bool, bool, bool]:
        # Same endpoint in two slices: kube-proxy prefers the non-terminating copy (a pod IP
        # reused before the old pod is gone); ready and serving break the remaining ties.
        return (not self.terminating, self.ready, self.serving)


EndpointsMap = dict[tuple[ServicePortName, int], list[EndpointInfo]]


def endpoints_by_service_port(slices: Iterable[EndpointSlice]) -> EndpointsMap:
    """Endpoints of every slice, keyed by the ServicePortName their port name and protocol
    select, and by family; de-duplicated by (address, port) across the service's slices."""
    chosen: dict[tuple[ServicePortName, int], dict[tuple[IPAddress, int], EndpointInfo]] = \
        defaultdict(dict)
    # Sorted so that equal-preference duplicates resolve the same way on every node.
    for endpoint_slice in sorted(slices, key=lambda s: (s.namespace, s.service_name, s.name)):
        family = _FAMILIES.get(endpoint_slice.address_type)
        if family is None:
            continue
        for port in endpoint_slice.ports:
            name = ServicePortName(endpoint_slice.namespace, endpoint_slice.service_name,
                                   port.name, port.protocol)
            found = chosen[name, family]
            for endpoint in endpoint_slice.endpoints:
                # Kubernetes uses only the first address (endpointslicecache.go addEndpoints).
                if not endpoint.addresses or endpoint.addresses[0].version != family:
                    continue
                info = EndpointInfo(endpoint.addresses[0], port.port, endpoint.ready,
                                    endpoint.serving, endpoint.terminating,
                                    endpoint.node_name, endpoint.zone)
                key = (info.address, info.port)
                if key not in found or info.preference() > found[key].preference():
                    found[key] = info
    return {key: list(found.values()) for key, found in chosen.items()}


def usable_backends(endpoints: Iterable[EndpointInfo]) -> tuple[Backend, ...]:
    """Ready endpoints; when none is ready anywhere, the serving-and-terminating ones, so
    connections drain to pods that still accept them (topology.go CategorizeEndpoints)."""
    endpoints = list(endpoints)
    usable = [_backend(e, BackendState.READY) for e in endpoints if e.ready]
    if not usable:
        usable = [_backend(e, BackendState.TERMINATING)
                  for e in endpoints if e.serving and e.terminating]
    return tuple(sorted(usable, key=Backend.sort_key))


def _backend(info: EndpointInfo, state: BackendState) -> Backend:
    return Backend(info.address, info.port, state, info.node_name, info.zone)
