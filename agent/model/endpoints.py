"""Endpoint side of the model: EndpointSlices grouped by (service port name, IP family) and
de-duplicated, each endpoint once as a Backend. Pure; mirrors kube-proxy's endpointslicecache.go."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from agent.model.types import (
    NO_HINTS,
    Backend,
    BackendState,
    EndpointSlice,
    NodeContext,
    ServicePortName,
)

_FAMILIES = {"IPv4": 4, "IPv6": 6}   # FQDN slices are ignored (endpointschangetracker.go)
_ADDRESS_CLASSES = {4: IPv4Address, 6: IPv6Address}
_IPV4 = IPv4Address
_READY, _TERMINATING = BackendState.READY, BackendState.TERMINATING


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """kube-proxy's BaseEndpointInfo: one address and port with its conditions and hints.
    backend.state is READY when ready, else TERMINATING (only ever used when serving and
    terminating, as the fallback of topology.categorize_endpoints)."""
    backend: Backend
    ready: bool
    serving: bool
    terminating: bool
    zone_hints: frozenset[str] = NO_HINTS
    node_hints: frozenset[str] = NO_HINTS

    def preference(self) -> tuple[bool, bool, bool]:
        # Same endpoint in two slices: kube-proxy keeps the non-terminating copy (a pod IP
        # reused before the old pod is gone; endpointslicecache.go addEndpoints); ready and
        # serving break the remaining ties so every node picks the same copy.
        return (not self.terminating, self.ready, self.serving)


@dataclass(frozen=True, slots=True)
class EndpointGroup:
    """The endpoints of one service port and family, sorted by Backend.sort_key."""
    endpoints: tuple[EndpointInfo, ...]
    hinted: bool                  # some endpoint carries a zone or node hint


EndpointsMap = dict[tuple[ServicePortName, int], EndpointGroup]


def endpoints_by_service_port(slices: Iterable[EndpointSlice],
                              node: NodeContext | None = None) -> EndpointsMap:
    """Endpoints of every slice, keyed by the ServicePortName their port name and protocol
    select, and by family; de-duplicated by (address, port) across the service's slices.
    Slices kube-proxy's informers never see (excluded_by_label) are left out.
    node: marks Backend.local (its nodeName, or an address of the node); none without it."""
    node_name, own = (node.node_name, node.node_ips) if node else ("", ())
    # int(address) within a family: the same test, without hashing address objects
    node_ips = {f: frozenset(int(ip) for ip in own if ip.version == f) for f in (4, 6)}
    # (int(address), port) is both the de-duplication key and, within one family, the
    # Backend.sort_key order; it hashes far faster than an ipaddress object.
    chosen: dict[tuple[ServicePortName, int], dict[tuple[int, int], EndpointInfo]] = \
        defaultdict(dict)
    hinted: set[tuple[ServicePortName, int]] = set()
    # Sorted so that equal-preference duplicates resolve the same way on every node.
    for endpoint_slice in sorted(slices, key=lambda s: (s.namespace, s.service_name, s.name)):
        family = _FAMILIES.get(endpoint_slice.address_type)
        if family is None or endpoint_slice.excluded_by_label:
            continue
        address_class = _ADDRESS_CLASSES[family]
        # ports of one slice with the same number (TCP and UDP 53) get the same endpoint
        # as one EndpointInfo and Backend: equal values, kept once in the desired state
        shared: dict[tuple[int, int], EndpointInfo] | None = \
            {} if len(endpoint_slice.ports) > 1 else None
        for port in endpoint_slice.ports:
            key = (ServicePortName(endpoint_slice.namespace, endpoint_slice.service_name,
                                   port.name, port.protocol), family)
            found = chosen[key]
            number = port.port
            own_ips = node_ips[family]
            for index, endpoint in enumerate(endpoint_slice.endpoints):
                # Kubernetes uses only the first address (endpointslicecache.go addEndpoints).
                # Read in the Endpoint's stored form (types.Endpoint): one IPv4 address is
                # its integer, made an address object here, once per Backend.
                stored = endpoint._address
                if stored.__class__ is int:
                    if family != 4:
                        continue
                    as_int, address = stored, None
                else:
                    if not stored:
                        continue
                    address = stored[0]
                    if address.__class__ is not address_class:
                        continue
                    as_int = address._ip
                info = shared.get((index, number)) if shared is not None else None
                if info is None:
                    ready, serving, terminating, endpoint_node, zone, zone_hints, \
                        node_hints = endpoint._rest
                    # kube-proxy's isLocal is the nodeName alone; a hostNetwork endpoint is
                    # the node itself whatever its slice says (the kernel delivers it locally)
                    local = (bool(node_name) and endpoint_node == node_name) \
                        or as_int in own_ips
                    info = EndpointInfo(
                        Backend(address or _IPV4(as_int), number,
                                _READY if ready else _TERMINATING, endpoint_node, zone, local),
                        ready, serving, terminating, zone_hints, node_hints)
                    if shared is not None:
                        shared[index, number] = info
                if info.zone_hints or info.node_hints:
                    hinted.add(key)
                dedup = (as_int, number)
                previous = found.get(dedup)
                if previous is None or info.preference() > previous.preference():
                    found[dedup] = info
    return {key: EndpointGroup(tuple([info for _, info in sorted(found.items())]),
                               key in hinted)
            for key, found in chosen.items()}
