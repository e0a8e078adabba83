"""Border conversion: camelCase Kubernetes dicts (as the API server serializes them) in,
frozen Service / EndpointSlice out; anything unservable raises InvalidObject naming the field."""
from __future__ import annotations

import ipaddress
from typing import Any, NoReturn

from agent.model.types import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    InvalidObject,
    IPAddress,
    ObjectKey,
    Protocol,
    Service,
    ServicePort,
)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_TYPES = frozenset({"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"})
ADDRESS_TYPES = {"IPv4": 4, "IPv6": 6, "FQDN": None}

# The API server's own limits for an EndpointSlice (apis/discovery/validation); enforcing
# them bounds the work a hostile file can cause through YAML aliases.
MAX_SLICE_PORTS = 100
MAX_SLICE_ENDPOINTS = 1000
MAX_ENDPOINT_ADDRESSES = 100

_HANDLED = (("v1", "Service"), ("discovery.k8s.io/v1", "EndpointSlice"))


def _handled(d: dict) -> bool:
    return (d.get("apiVersion"), d.get("kind")) in _HANDLED   # tuple: values may be unhashable


def object_key(d: Any) -> ObjectKey | None:
    """The key of a raw object we handle, as far as it can be read; None otherwise.
    Lets a caller keep the previous version of an object that became invalid."""
    if not isinstance(d, dict) or not _handled(d):
        return None
    metadata = d.get("metadata")
    if not isinstance(metadata, dict):
        return None
    name, namespace = metadata.get("name"), metadata.get("namespace") or "default"
    if not isinstance(name, str) or not name or not isinstance(namespace, str):
        return None
    return ObjectKey(d["kind"], namespace, name)


def parse_object(d: Any) -> Service | EndpointSlice | None:
    """A v1 Service or discovery.k8s.io/v1 EndpointSlice; None for anything else."""
    if not isinstance(d, dict):
        raise InvalidObject("object: not a mapping; object skipped")
    kind = (d.get("apiVersion"), d.get("kind"))
    if kind == ("v1", "Service"):
        return parse_service(d)
    if kind == ("discovery.k8s.io/v1", "EndpointSlice"):
        return parse_endpoint_slice(d)
    return None


class _Where:
    """Names the object in every error, and says what happens to it."""

    def __init__(self, kind: str, consequence: str) -> None:
        self.label, self.consequence = kind, consequence

    def fail(self, field: str, problem: str) -> NoReturn:
        raise InvalidObject(f"{self.label}: {field}: {problem}; {self.consequence}")

    def mapping(self, value: Any, field: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(field, f"must be a mapping, got {_show(value)}")
        return value

    def sequence(self, value: Any, field: str, limit: int | None = None) -> list:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(field, f"must be a list, got {_show(value)}")
        if limit is not None and len(value) > limit:
            self.fail(field, f"{len(value)} entries, more than the limit of {limit}")
        return value

    def string(self, value: Any, field: str, default: str = "") -> str:
        if value is None:
            return default
        if not isinstance(value, str):
            self.fail(field, f"must be a string, got {_show(value)}")
        return value

    def flag(self, value: Any, field: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(field, f"must be true or false, got {_show(value)}")
        return value

    def port(self, value: Any, field: str) -> int:
        # bool is an int in Python; YAML's `port: yes` must not become port 1.
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(field, f"must be a port number, got {_show(value)}")
        if not 1 <= value <= 65535:
            self.fail(field, f"{value} out of range (1-65535)")
        return value

    def protocol(self, value: Any, field: str) -> Protocol:
        if value is None:
            return Protocol.TCP
        if not isinstance(value, str) or value not in Protocol.__members__:
            self.fail(field, f"{_show(value)} is not one of TCP, UDP, SCTP")
        return Protocol[value]

    def address(self, value: Any, field: str, family: int | None = None) -> IPAddress:
        if not isinstance(value, str):
            self.fail(field, f"must be an IP address string, got {_show(value)}")
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            ip = None
        if ip is None:
            self.fail(field, f"{_show(value)} is not a valid IP address")
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            self.fail(field, f"{_show(value)}: a zone index is not allowed")
        if family is not None and ip.version != family:
            self.fail(field, f"{_show(value)} is not an IPv{family} address")
        return ip


def _show(value: Any) -> str:
    # Never repr a container: it may be huge or nested past the recursion limit.
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple, set, frozenset)):
        return "a list"
    if isinstance(value, str) and len(value) > 40:
        return repr(value[:40]) + "..."
    if isinstance(value, int) and not -10**18 < value < 10**18:
        return "a very large number"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _metadata(d: dict, kind: str, consequence: str) -> tuple[str, str]:
    metadata = _Where(f"{kind} (unnamed)", consequence).mapping(d.get("metadata"), "metadata")
    shown = [value if isinstance(value, str) and value else default for value, default in
             ((metadata.get("namespace"), "default"), (metadata.get("name"), "(unnamed)"))]
    where = _Where(f"{kind} {shown[0]}/{shown[1]}", consequence)
    name = where.string(metadata.get("name"), "metadata.name")
    if not name:
        where.fail("metadata.name", "required")
    namespace = where.string(metadata.get("namespace"), "metadata.namespace") or "default"
    return namespace, name


# --- Service ---------------------------------------------------------------------------

def parse_service(d: dict) -> Service:
    """Validates what kube-proxy relies on: ports, protocols, cluster IPs, type."""
    if not isinstance(d, dict):
        raise InvalidObject("Service: not a mapping; service skipped")
    namespace, name = _metadata(d, "Service", "service skipped")
    where = _Where(f"Service {namespace}/{name}", "service skipped")
    spec = where.mapping(d.get("spec"), "spec")
    service_type = where.string(spec.get("type"), "spec.type", "ClusterIP") or "ClusterIP"
    if service_type not in SERVICE_TYPES:
        where.fail("spec.type",
                   f"{service_type!r} is not one of {', '.join(sorted(SERVICE_TYPES))}")
    ports = _service_ports(where, where.sequence(spec.get("ports"), "spec.ports"))
    if service_type == "ExternalName":
        # A DNS alias: no cluster IP, nothing for a proxy to program (ShouldSkipService).
        return Service(namespace, name, service_type, (), ports)
    cluster_ips = _cluster_ips(where, spec)
    return Service(namespace, name, service_type, cluster_ips, ports, headless=not cluster_ips)


def _service_ports(where: _Where, raw_ports: list) -> tuple[ServicePort, ...]:
    ports: list[ServicePort] = []
    seen_names: dict[str, int] = {}
    seen_ports: dict[tuple[int, Protocol], int] = {}
    for i, raw in enumerate(raw_ports):
        field = f"spec.ports[{i}]"
        entry = where.mapping(raw, field)
        name = where.string(entry.get("name"), f"{field}.name")
        # The API server requires names once there are two ports: endpoints are matched to
        # service ports by name, so two unnamed ports could not be told apart.
        if len(raw_ports) > 1 and not name:
            where.fail(f"{field}.name", "required when the service has more than one port")
        protocol = where.protocol(entry.get("protocol"), f"{field}.protocol")
        port = where.port(entry.get("port"), f"{field}.port")
        target = entry.get("targetPort")
        if target is None:
            target_port: int | str = port
        elif isinstance(target, str):
            if not target:
                where.fail(f"{field}.targetPort", "must be a port number or a port name")
            target_port = target
        else:
            target_port = where.port(target, f"{field}.targetPort")
        if name in seen_names:
            where.fail(f"{field}.name", f"duplicate port name {name!r} "
                       f"(also spec.ports[{seen_names[name]}])")
        if (port, protocol) in seen_ports:
            where.fail(field, f"duplicate port {port}/{protocol.value} "
                       f"(also spec.ports[{seen_ports[port, protocol]}])")
        seen_names[name], seen_ports[port, protocol] = i, i
        ports.append(ServicePort(name, protocol, port, target_port))
    return tuple(ports)


def _cluster_ips(where: _Where, spec: dict) -> tuple[IPAddress, ...]:
    """Empty for headless: clusterIP "None" or "" (kube-proxy's IsServiceIPSet)."""
    single = where.string(spec.get("clusterIP"), "spec.clusterIP")
    listed = where.sequence(spec.get("clusterIPs"), "spec.clusterIPs")
    if listed:
        for i, value in enumerate(listed):
            where.string(value, f"spec.clusterIPs[{i}]")
        if single and single != listed[0]:
            where.fail("spec.clusterIP", f"{single!r} differs from spec.clusterIPs[0] "
                       f"{listed[0]!r}")
        field, values = "spec.clusterIPs", listed
    else:
        field, values = "spec.clusterIP", [single] if single else []
    if not values or values[0] in ("None", ""):
        if len(values) > 1:
            where.fail(field, "a headless service (None) cannot list other cluster IPs")
        return ()
    if len(values) > 2:
        where.fail(field, f"{len(values)} addresses; at most one IPv4 and one IPv6")
    ips = tuple(where.address(v, f"{field}[{i}]" if listed else field)
                for i, v in enumerate(values))
    if len(ips) == 2 and ips[0].version == ips[1].version:
        where.fail(field, "dual-stack cluster IPs must be one IPv4 and one IPv6 address")
    return ips


# --- EndpointSlice ---------------------------------------------------------------------

def parse_endpoint_slice(d: dict) -> EndpointSlice:
    """Validates the owning service label, address type, ports and every endpoint address.
    FQDN slices keep no endpoints: kube-proxy ignores them (endpointschangetracker.go)."""
    if not isinstance(d, dict):
        raise InvalidObject("EndpointSlice: not a mapping; endpoint slice skipped")
    namespace, name = _metadata(d, "EndpointSlice", "endpoint slice skipped")
    where = _Where(f"EndpointSlice {namespace}/{name}", "endpoint slice skipped")
    labels = where.mapping(where.mapping(d.get("metadata"), "metadata").get("labels"),
                           "metadata.labels")
    label_field = f"metadata.labels[{SERVICE_NAME_LABEL}]"
    service_name = where.string(labels.get(SERVICE_NAME_LABEL), label_field)
    if not service_name:
        where.fail(label_field, "required: it names the service this slice belongs to")
    address_type = d.get("addressType")
    if not isinstance(address_type, str) or address_type not in ADDRESS_TYPES:
        where.fail("addressType", f"{_show(address_type)} is not one of IPv4, IPv6, FQDN")
    ports = _slice_ports(where, where.sequence(d.get("ports"), "ports", MAX_SLICE_PORTS))
    raw_endpoints = where.sequence(d.get("endpoints"), "endpoints", MAX_SLICE_ENDPOINTS)
    family = ADDRESS_TYPES[address_type]
    endpoints = tuple(_endpoint(where, raw, f"endpoints[{i}]", family)
                      for i, raw in enumerate(raw_endpoints))
    if family is None:
        endpoints = ()
    return EndpointSlice(namespace, name, service_name, address_type, ports, endpoints)


def _slice_ports(where: _Where, raw_ports: list) -> tuple[EndpointPort, ...]:
    ports: list[EndpointPort] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_ports):
        field = f"ports[{i}]"
        entry = where.mapping(raw, field)
        # kube-proxy drops a port whose name is nil; the EndpointSlice controller always
        # writes one ("" when unnamed), so a missing name here means "".
        name = where.string(entry.get("name"), f"{field}.name")
        protocol = where.protocol(entry.get("protocol"), f"{field}.protocol")
        if name in seen:
            where.fail(f"{field}.name", f"duplicate port name {name!r} (also ports[{seen[name]}])")
        seen[name] = i
        # A nil port means "all ports" in the API, which kube-proxy does not implement
        # (endpointslicecache.go: "TODO: handle nil ports"); the entry is skipped.
        if entry.get("port") is None:
            continue
        ports.append(EndpointPort(name, protocol, where.port(entry["port"], f"{field}.port")))
    return tuple(ports)


def _endpoint(where: _Where, raw: Any, field: str, family: int | None) -> Endpoint:
    entry = where.mapping(raw, field)
    raw_addresses = where.sequence(entry.get("addresses"), f"{field}.addresses",
                                   MAX_ENDPOINT_ADDRESSES)
    if not raw_addresses:
        where.fail(f"{field}.addresses", "at least one address is required")
    if family is None:   # FQDN: names, not addresses; checked for shape only
        for i, value in enumerate(raw_addresses):
            if not isinstance(value, str) or not value:
                where.fail(f"{field}.addresses[{i}]", f"must be a name, got {_show(value)}")
        addresses: tuple[IPAddress, ...] = ()
    else:
        addresses = tuple(where.address(v, f"{field}.addresses[{i}]", family)
                          for i, v in enumerate(raw_addresses))
    conditions = where.mapping(entry.get("conditions"), f"{field}.conditions")
    # kube-proxy's defaults (endpointslicecache.go addEndpoints): an unset ready or serving
    # condition counts as true, an unset terminating as false.
    ready = where.flag(conditions.get("ready"), f"{field}.conditions.ready", True)
    serving = where.flag(conditions.get("serving"), f"{field}.conditions.serving", True)
    terminating = where.flag(conditions.get("terminating"), f"{field}.conditions.terminating",
                             False)
    return Endpoint(
        addresses=addresses, ready=ready, serving=serving, terminating=terminating,
        node_name=where.string(entry.get("nodeName"), f"{field}.nodeName"),
        zone=where.string(entry.get("zone"), f"{field}.zone"),
    )
