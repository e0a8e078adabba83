"""The pure model: Services and EndpointSlices in, desired state (one ServicePortState per
service port and IP family) out. No I/O; kube-proxy's pkg/proxy semantics."""
from __future__ import annotations

from collections.abc import Iterable

from agent.model.endpoints import endpoints_by_service_port, usable_backends
from agent.model.service import cluster_ip_frontends
from agent.model.types import DesiredState, EndpointSlice, Service, ServicePortState

__all__ = ["desired_state"]


def desired_state(services: Iterable[Service], slices: Iterable[EndpointSlice]) -> DesiredState:
    """ClusterIP frontends of every proxied service with the usable backends of each port.
    A port without usable backends is kept with none, so the datapath rejects its traffic."""
    endpoints = endpoints_by_service_port(slices)
    state: DesiredState = {}
    for service in services:
        for name, family, frontend in cluster_ip_frontends(service):
            backends = usable_backends(endpoints.get((name, family), ()))
            state[name, family] = ServicePortState(name, family, (frontend,), backends)
    return state
