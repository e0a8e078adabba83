"""Which part of a service port a frontend belongs to (scopes), its name as 64 bits (the
hash a restarted agent finds its id by), and the ids new service ports get. Pure."""
from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import replace
from typing import NamedTuple

from agent.model.types import DesiredState, FrontendKind, ServicePortName, ServicePortState

# by_scope parts. OUTSIDE and FIREWALLED are seen by traffic from outside only (kernel
# scope 1); the TC path falls back to the scope 0 entries, which every path sees.
INTERNAL, EXTERNAL, OUTSIDE, FIREWALLED = 0, 1, 2, 3
SCOPE_NAMES = {INTERNAL: "internal", EXTERNAL: "external", OUTSIDE: "outside",
               FIREWALLED: "firewalled"}


class PortKey(NamedTuple):
    """A whole service port in one family, as the model keys its desired state. Equal to
    the model's plain (name, family) tuple; the planner reads it as an INTERNAL part."""
    name: ServicePortName
    family: int
    scope = INTERNAL            # a class attribute, not a field: the key stays a 2-tuple


class PartKey(NamedTuple):
    """The part of a service port whose frontends reach the same backends (by_scope)."""
    name: ServicePortName
    family: int
    scope: int = INTERNAL


ServiceKey = PortKey | PartKey
ServiceName = tuple[str, str]           # (namespace, name): what refusals are by


def service_key(key: tuple) -> ServiceKey:
    """A desired-state key as its named type: plain tuples (the model's, or a test's) are
    named once, where they enter the planner."""
    if isinstance(key, (PartKey, PortKey)):
        return key
    return PartKey(*key) if len(key) == 3 else PortKey(*key)


def service_of(key: ServiceKey) -> ServiceName:
    return key.name.namespace, key.name.name


def is_outside(key: ServiceKey) -> bool:
    """Whether the part is seen by traffic from outside the node only (kernel scope 1)."""
    return key.scope >= OUTSIDE


def by_scope(desired: DesiredState) -> dict[PartKey, ServicePortState]:
    """A service port's frontends split by the backends a connection started on this node
    gets: ClusterIPs -> `backends`, NodePort/ExternalIP/LoadBalancer -> `external_backends`
    (they differ when a traffic policy is Local). Each part gets its own slot table."""
    out: dict[PartKey, ServicePortState] = {}
    for (name, family), state in desired.items():
        internal = tuple(f for f in state.frontends if not f.kind.external)
        external = tuple(f for f in state.frontends if f.kind.external)
        # LoadBalancer addresses behind loadBalancerSourceRanges (kube-proxy filters those,
        # not NodePorts) are served to traffic from outside only, where the TC path checks
        # the source: the socket LB cannot (no source address at connect()), so a pod's
        # connection to them leaves the node, as to the cloud's load balancer.
        walled = tuple(f for f in external if state.source_ranges
                       and f.kind is FrontendKind.LOAD_BALANCER)
        external = tuple(f for f in external if f not in walled)
        if internal or not (external or walled):
            # most ports have ClusterIPs only: then the part is the state as it is
            out[PartKey(name, family, INTERNAL)] = state if len(internal) == len(
                state.frontends) else replace(state, frontends=internal)
        if external:
            out[PartKey(name, family, EXTERNAL)] = replace(
                state, frontends=external, backends=state.external_backends)
        if walled:
            out[PartKey(name, family, FIREWALLED)] = replace(
                state, frontends=walled, backends=state.outside_backends)
        # the rest from outside: a part of its own when its backends differ from the
        # node's own view (a Local policy); else the TC path uses the EXTERNAL part
        if external and set(state.outside_backends) != set(state.external_backends):
            out[PartKey(name, family, OUTSIDE)] = replace(
                state, frontends=external, backends=state.outside_backends)
    return out


def port_hash(key: tuple) -> int:
    """A service port's name as 64 bits, stored with its frontends: a restarted agent
    finds each port's id (and so its slot table) by name, whatever else changed."""
    key = service_key(key)
    name = key.name
    text = f"{name.namespace}/{name.name}/{name.port_name}/{name.protocol.value}/{key.family}"
    if key.scope:
        text += f"/{SCOPE_NAMES[key.scope]}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") or 1


def assign_ids(keys: Iterable[ServiceKey], ids_by_hash: Mapping[int, int],
               in_use: Collection[int]) -> dict[ServiceKey, int]:
    """A service port keeps the id the kernel holds under its name (ids_by_hash: port_hash
    -> svc_id); new ones get the lowest ids free (never one in_use: its slots may be live)."""
    ids: dict[ServiceKey, int] = {}
    unplaced = []
    for key in sorted(keys, key=name_order):
        svc_id = ids_by_hash.get(port_hash(key))
        if svc_id is None:
            unplaced.append(key)
        else:
            ids[key] = svc_id
    used = set(ids.values()) | set(in_use)
    next_id = 1
    for key in unplaced:
        while next_id in used:
            next_id += 1
        ids[key] = next_id
        used.add(next_id)
    return ids


def name_order(key: ServiceKey) -> tuple:
    """By name, so that the same keys win (frontends, room) sync after sync."""
    name = key.name
    return (name.namespace, name.name, name.port_name, name.protocol.value, key.family,
            key.scope)
