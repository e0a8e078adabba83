"""Border conversion: camelCase Kubernetes dicts (as the API server serializes them) in, frozen
Service / EndpointSlice / Node out; anything unservable raises InvalidObject naming the field."""
from __future__ import annotations

import ipaddress
import re
import sys
from typing import Any, NoReturn

from agent.model.types import (
    HEADLESS_LABEL,
    NO_HINTS,
    SERVICE_PROXY_NAME_LABEL,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    InvalidObject,
    IPAddress,
    IPNetwork,
    LoadBalancerIngress,
    Node,
    NodeAddress,
    ObjectKey,
    Protocol,
    Service,
    ServicePort,
    endpoint_rest,
)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_TYPES = frozenset({"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"})
ADDRESS_TYPES = {"IPv4": 4, "IPv6": 6, "FQDN": None}

# The API server's own limits for an EndpointSlice (apis/discovery/validation); enforcing
# them bounds the work a hostile file can cause through YAML aliases.
MAX_SLICE_PORTS = 100
MAX_SLICE_ENDPOINTS = 1000
MAX_ENDPOINT_ADDRESSES = 100
MAX_HINTS = 8                     # hints.forZones and hints.forNodes each

IP_FAMILIES = {"IPv4": 4, "IPv6": 6}
TRAFFIC_POLICIES = ("Cluster", "Local")
LOAD_BALANCER_IP_MODES = ("VIP", "Proxy")
NODE_IP_ADDRESS_TYPES = ("InternalIP", "ExternalIP")
# sessionAffinityConfig.clientIP.timeoutSeconds: API default and maximum (one day).
DEFAULT_AFFINITY_TIMEOUT = 10800
MAX_AFFINITY_TIMEOUT = 86400

# The API server's name rules (apimachinery/pkg/util/validation): a manifest name with a "/",
# an upper-case letter or a control character would be refused there, and here it would
# misattribute keys, metrics and log lines.
_DNS1123_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_NAME_RULES = {
    "namespace": (re.compile(_DNS1123_LABEL), 63, "a DNS-1123 label (lower-case letters, "
                  "digits and '-', starting and ending with a letter or digit)"),
    "Service": (re.compile(r"[a-z](?:[-a-z0-9]*[a-z0-9])?"), 63, "a DNS-1035 label "
                "(lower-case letters, digits and '-', starting with a letter, ending with a "
                "letter or digit)"),
    "subdomain": (re.compile(rf"{_DNS1123_LABEL}(?:\.{_DNS1123_LABEL})*"), 253, "a DNS-1123 "
                  "subdomain (lower-case labels of letters, digits and '-', joined by '.')"),
    "label value": (re.compile(r"(?:[A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"), 63,
                    "a label value (letters, digits, '-', '_' and '.', starting and ending "
                    "with a letter or digit)"),
}

# (apiVersion, kind) of every object read; anything else is not ours (parse_object: None)
HANDLED_KINDS = (("v1", "Service"), ("discovery.k8s.io/v1", "EndpointSlice"), ("v1", "Node"))


def _handled(d: dict) -> bool:
    return (d.get("apiVersion"), d.get("kind")) in HANDLED_KINDS   # values may be unhashable


def object_key(d: Any) -> ObjectKey | None:
    """The key of a raw object we handle, as far as it can be read; None otherwise.
    Lets a caller keep the previous version of an object that became invalid."""
    if not isinstance(d, dict) or not _handled(d):
        return None
    metadata = d.get("metadata")
    if not isinstance(metadata, dict):
        return None
    name, namespace = metadata.get("name"), metadata.get("namespace") or "default"
    if d["kind"] == "Node":
        namespace = ""            # cluster-scoped
    if not isinstance(name, str) or not name or not isinstance(namespace, str):
        return None
    return ObjectKey(d["kind"], namespace, name)


def parse_object(d: Any) -> Service | EndpointSlice | Node | None:
    """A v1 Service, discovery.k8s.io/v1 EndpointSlice or v1 Node; None for anything else."""
    if not isinstance(d, dict):
        raise InvalidObject("object: not a mapping; object skipped")
    kind = (d.get("apiVersion"), d.get("kind"))
    if kind == ("v1", "Service"):
        return parse_service(d)
    if kind == ("discovery.k8s.io/v1", "EndpointSlice"):
        return parse_endpoint_slice(d)
    if kind == ("v1", "Node"):
        return parse_node(d)
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
        if value.__class__ is str and family != 6:
            ip = fast_ipv4(value)
            if ip is not None:
                return ip
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

    def labels(self, metadata: dict) -> dict:
        return self.mapping(metadata.get("labels"), "metadata.labels")

    def excluded_by(self, labels: dict) -> str:
        """The label that keeps kube-proxy's informers from ever delivering this object
        (cmd/kube-proxy/app/server.go: both must not exist, whatever their value)."""
        for label in (SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL):
            if label in labels:
                self.string(labels[label], f"metadata.labels[{label}]")
                return label
        return ""


def fast_ipv4(text: str) -> ipaddress.IPv4Address | None:
    """The IPv4Address of a plain dotted quad, else None (the caller then asks ipaddress).
    Accepts exactly what ipaddress.IPv4Address(str) accepts for such text: four ASCII
    decimal octets, each 0-255 without leading zeros; it only skips its slower parser."""
    value = _ipv4_int(text)
    return None if value is None else _IPV4(value)


def _ipv4_int(text: str) -> int | None:
    """fast_ipv4's address as an integer: one match of the whole text (no newline at its
    end, as with $), ASCII digits only."""
    found = _DOTTED_QUAD(text)
    if found is None:
        return None
    a, b, c, d = found.groups()
    return int(a) << 24 | int(b) << 16 | int(c) << 8 | int(d)


_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"     # 0-255, no leading zero
_DOTTED_QUAD = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}").fullmatch
_IPV4 = ipaddress.IPv4Address


def _shared(text: str) -> str:
    """One copy of a string that many objects repeat (namespaces, node and zone names, port
    names, a Service's name and its slices' label): the decoder makes a new one each time."""
    return sys.intern(text) if text.__class__ is str else text


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
    return _shared(namespace), _shared(name)


def _cluster_scoped_name(d: dict, kind: str, consequence: str) -> str:
    metadata = _Where(f"{kind} (unnamed)", consequence).mapping(d.get("metadata"), "metadata")
    name = metadata.get("name")
    where = _Where(f"{kind} {name if isinstance(name, str) and name else '(unnamed)'}",
                   consequence)
    if not where.string(name, "metadata.name"):
        where.fail("metadata.name", "required")
    return name


def check_names(obj: Service | EndpointSlice | Node) -> None:
    """Raises InvalidObject unless the object's names pass the API server's rules. For
    objects that never went through an API server (manifest files); kube-proxy's test
    tables, mirrored in ours, use names it would refuse, so parsing alone does not ask."""
    if isinstance(obj, Node):
        where = _Where(f"Node {obj.name}", "node skipped")
        _check_name(where, obj.name, "metadata.name", "subdomain")
        return
    if isinstance(obj, Service):
        where, rule = _Where(f"Service {obj.namespace}/{obj.name}", "service skipped"), "Service"
    else:
        where, rule = _Where(f"EndpointSlice {obj.namespace}/{obj.name}",
                             "endpoint slice skipped"), "subdomain"
    _check_name(where, obj.namespace, "metadata.namespace", "namespace")
    _check_name(where, obj.name, "metadata.name", rule)
    if isinstance(obj, EndpointSlice):
        _check_name(where, obj.service_name, f"metadata.labels[{SERVICE_NAME_LABEL}]",
                    "label value")


def _check_name(where: _Where, value: str, field: str, rule: str) -> None:
    pattern, limit, description = _NAME_RULES[rule]
    if len(value) > limit:
        where.fail(field, f"{_show(value)} is longer than {limit} characters")
    if not pattern.fullmatch(value):
        where.fail(field, f"{_show(value)} is not {description}")


# --- Service ---------------------------------------------------------------------------

def parse_service(d: dict) -> Service:
    """Validates what kube-proxy relies on: type, ports and nodePorts, cluster IPs and their
    families, externalIPs, load balancer ingress, traffic policies, session affinity."""
    if not isinstance(d, dict):
        raise InvalidObject("Service: not a mapping; service skipped")
    namespace, name = _metadata(d, "Service", "service skipped")
    where = _Where(f"Service {namespace}/{name}", "service skipped")
    excluded = where.excluded_by(where.labels(where.mapping(d.get("metadata"), "metadata")))
    spec = where.mapping(d.get("spec"), "spec")
    service_type = _shared(where.string(spec.get("type"), "spec.type", "ClusterIP") or
                           "ClusterIP")
    if service_type not in SERVICE_TYPES:
        where.fail("spec.type",
                   f"{service_type!r} is not one of {', '.join(sorted(SERVICE_TYPES))}")
    ports = _service_ports(where, where.sequence(spec.get("ports"), "spec.ports"), service_type)
    if service_type == "ExternalName":
        # A DNS alias: no cluster IP, nothing for a proxy to program (ShouldSkipService).
        return Service(namespace, name, service_type, (), ports, excluded_by_label=excluded)
    cluster_ips = _cluster_ips(where, spec)
    _check_ip_families(where, spec, cluster_ips)
    where.flag(spec.get("allocateLoadBalancerNodePorts"), "spec.allocateLoadBalancerNodePorts",
               True)   # false only means no nodePort was allocated: nodePort 0 below
    return Service(
        namespace, name, service_type, cluster_ips, ports, headless=not cluster_ips,
        external_ips=_external_ips(where, spec),
        load_balancer_ingress=_load_balancer_ingress(where, d),
        internal_traffic_policy=_traffic_policy(where, spec, "internalTrafficPolicy"),
        external_traffic_policy=_traffic_policy(where, spec, "externalTrafficPolicy"),
        session_affinity_timeout=_session_affinity(where, spec),
        excluded_by_label=excluded,
        load_balancer_source_ranges=_source_ranges(where, spec),
        health_check_node_port=_health_check_node_port(where, spec))


def _service_ports(where: _Where, raw_ports: list, service_type: str
                   ) -> tuple[ServicePort, ...]:
    ports: list[ServicePort] = []
    seen_names: dict[str, int] = {}
    seen_ports: dict[tuple[int, Protocol], int] = {}
    seen_node_ports: dict[tuple[int, Protocol], int] = {}
    for i, raw in enumerate(raw_ports):
        field = f"spec.ports[{i}]"
        entry = where.mapping(raw, field)
        name = _shared(where.string(entry.get("name"), f"{field}.name"))
        # The API server requires names once there are two ports: endpoints are matched to
        # service ports by name, so two unnamed ports could not be told apart.
        if len(raw_ports) > 1 and not name:
            where.fail(f"{field}.name", "required when the service has more than one port")
        protocol = where.protocol(entry.get("protocol"), f"{field}.protocol")
        port = where.port(entry.get("port"), f"{field}.port")
        target = entry.get("targetPort")
        # The API server defaults an absent, 0 or "" targetPort to port (SetDefaults_Service).
        if target is None or target == "" or (target == 0 and not isinstance(target, bool)):
            target_port: int | str = port
        elif isinstance(target, str):
            target_port = _shared(target)
        else:
            target_port = where.port(target, f"{field}.targetPort")
        node_port = _node_port(where, entry.get("nodePort"), f"{field}.nodePort", service_type)
        if name in seen_names:
            where.fail(f"{field}.name", f"duplicate port name {name!r} "
                       f"(also spec.ports[{seen_names[name]}])")
        if (port, protocol) in seen_ports:
            where.fail(field, f"duplicate port {port}/{protocol.value} "
                       f"(also spec.ports[{seen_ports[port, protocol]}])")
        if node_port and (node_port, protocol) in seen_node_ports:
            where.fail(f"{field}.nodePort", f"duplicate nodePort {node_port}/{protocol.value} "
                       f"(also spec.ports[{seen_node_ports[node_port, protocol]}])")
        seen_names[name], seen_ports[port, protocol] = i, i
        if node_port:
            seen_node_ports[node_port, protocol] = i
        ports.append(ServicePort(name, protocol, port, target_port, node_port))
    return tuple(ports)


def _node_port(where: _Where, value: Any, field: str, service_type: str) -> int:
    """0 when absent or 0 (not allocated: allocateLoadBalancerNodePorts false, or a
    manifest with no allocator behind it); kube-proxy then programs no NodePort."""
    if value is None or (value == 0 and not isinstance(value, bool)):
        return 0
    node_port = where.port(value, field)
    if service_type == "ClusterIP":
        where.fail(field, "may not be used when type is ClusterIP")
    return 0 if service_type == "ExternalName" else node_port


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


def _check_ip_families(where: _Where, spec: dict, cluster_ips: tuple[IPAddress, ...]) -> None:
    """spec.ipFamilies[i] names the family of spec.clusterIPs[i]; kube-proxy picks a
    family's cluster IP by that index (proxyutil.GetClusterIPByFamily)."""
    families = where.sequence(spec.get("ipFamilies"), "spec.ipFamilies")
    if len(families) > 2:
        where.fail("spec.ipFamilies", f"{len(families)} entries; at most IPv4 and IPv6")
    versions = []
    for i, family in enumerate(families):
        if not isinstance(family, str) or family not in IP_FAMILIES:
            where.fail(f"spec.ipFamilies[{i}]", f"{_show(family)} is not one of IPv4, IPv6")
        versions.append(IP_FAMILIES[family])
    if len(versions) == 2 and versions[0] == versions[1]:
        where.fail("spec.ipFamilies", "dual-stack ipFamilies must be one IPv4 and one IPv6")
    for i, (version, ip) in enumerate(zip(versions, cluster_ips, strict=False)):
        if version != ip.version:
            where.fail(f"spec.ipFamilies[{i}]",
                       f"{families[i]} does not match spec.clusterIPs[{i}] {ip}")


def _external_ips(where: _Where, spec: dict) -> tuple[IPAddress, ...]:
    ips = []
    for i, value in enumerate(where.sequence(spec.get("externalIPs"), "spec.externalIPs")):
        field = f"spec.externalIPs[{i}]"
        ip = where.address(value, field)
        # The API server's ValidateNonSpecialIP: these would capture the node's own traffic.
        if _special(ip):
            where.fail(field, f"{ip} is an unspecified, loopback or link-local address")
        ips.append(ip)
    return tuple(dict.fromkeys(ips))


_LINK_LOCAL_MULTICAST = {4: ipaddress.ip_network("224.0.0.0/24"),
                         6: ipaddress.ip_network("ff02::/16")}


def _special(ip: IPAddress) -> bool:
    """What the API server's ValidateNonSpecialIP refuses for external IPs and endpoint
    addresses: unspecified, loopback, link-local unicast and multicast (Go compares an
    IPv4-mapped IPv6 address as its IPv4 address)."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 4:
        return _special_v4(int(ip))
    return ip.is_unspecified or ip.is_loopback or ip.is_link_local or \
        ip in _LINK_LOCAL_MULTICAST[6]


def _special_v4(value: int) -> bool:
    """_special of an IPv4 address's integer (an endpoint's hot path: no network tests)."""
    return value == 0 or value >> 24 == 127 or value >> 16 == 0xA9FE or \
        value >> 8 == 0xE00000


def _load_balancer_ingress(where: _Where, d: dict) -> tuple[LoadBalancerIngress, ...]:
    """status.loadBalancer.ingress entries with an ip; hostname-only entries are for DNS."""
    status = where.mapping(d.get("status"), "status")
    balancer = where.mapping(status.get("loadBalancer"), "status.loadBalancer")
    ingress = []
    for i, raw in enumerate(where.sequence(balancer.get("ingress"),
                                           "status.loadBalancer.ingress")):
        field = f"status.loadBalancer.ingress[{i}]"
        entry = where.mapping(raw, field)
        where.string(entry.get("hostname"), f"{field}.hostname")
        ip, mode = entry.get("ip"), entry.get("ipMode")
        if ip is None or ip == "":
            if mode is not None:
                where.fail(f"{field}.ipMode", "may not be set when ip is not")
            continue
        address = where.address(ip, f"{field}.ip")
        if mode is None:
            mode = "VIP"          # the API server's default once ip is set
        elif not isinstance(mode, str) or mode not in LOAD_BALANCER_IP_MODES:
            where.fail(f"{field}.ipMode", f"{_show(mode)} is not one of VIP, Proxy")
        ingress.append(LoadBalancerIngress(address, mode))
    return tuple(ingress)


def _traffic_policy(where: _Where, spec: dict, key: str) -> str:
    policy = where.string(spec.get(key), f"spec.{key}", "Cluster") or "Cluster"
    if policy not in TRAFFIC_POLICIES:
        where.fail(f"spec.{key}", f"{policy!r} is not one of Cluster, Local")
    return _shared(policy)


def _source_ranges(where: _Where, spec: dict) -> tuple[IPNetwork, ...]:
    """spec.loadBalancerSourceRanges, space-trimmed (API validation lets padding through;
    serviceport.go trims), host bits cleared as Go's ParseCIDR does. kube-proxy skips an
    entry it cannot parse, which the API server never lets through; here it fails the
    service, because skipping the only entry would open the service to every source.
    Kept on any service type, as kube-proxy keeps them: only LoadBalancer IPs use them.
    The deprecated annotation service.beta.kubernetes.io/load-balancer-source-ranges is
    read by cloud providers only, never by kube-proxy, so it is not read here either."""
    ranges = []
    for i, value in enumerate(where.sequence(spec.get("loadBalancerSourceRanges"),
                                             "spec.loadBalancerSourceRanges")):
        field = f"spec.loadBalancerSourceRanges[{i}]"
        if not isinstance(value, str):
            where.fail(field, f"must be a CIDR string, got {_show(value)}")
        network = parse_cidr(value.strip())
        if network is None:
            where.fail(field, f"{_show(value)} is not a CIDR such as 10.0.0.0/8")
        ranges.append(network)
    return tuple(dict.fromkeys(ranges))


def parse_cidr(text: str) -> IPNetwork | None:
    """What Go's net.ParseCIDR (k8s.io/utils ParseCIDRSloppy) accepts, else None: ADDR/BITS
    with a decimal prefix length, IPv4 octets with leading zeros read as decimal."""
    address, slash, bits = text.partition("/")
    if not _decimal(bits) or "%" in address:      # no zone index either
        return None
    octets = address.split(".")
    if ":" not in address and len(octets) == 4 and all(map(_decimal, octets)):
        address = ".".join(str(int(o)) for o in octets)   # 010.1.2.3: sloppy, decimal
    try:
        return ipaddress.ip_network(f"{address}/{int(bits)}", strict=False)
    except ValueError:
        return None


def _decimal(text: str) -> bool:
    # Go's dtoi: ASCII digits, leading zeros allowed; bounded so int() stays cheap.
    return text.isascii() and text.isdigit() and len(text.lstrip("0")) <= 3


def _health_check_node_port(where: _Where, spec: dict) -> int:
    """spec.healthCheckNodePort, 0 when absent. Read on any service, as kube-proxy reads it;
    the model uses it only for type LoadBalancer with externalTrafficPolicy Local
    (apiservice.NeedsHealthCheck)."""
    value = spec.get("healthCheckNodePort")
    if value is None or (value == 0 and not isinstance(value, bool)):
        return 0
    return where.port(value, "spec.healthCheckNodePort")


def _session_affinity(where: _Where, spec: dict) -> int:
    """ClientIP affinity timeout in seconds (default 10800, 1-86400); 0 for None."""
    affinity = where.string(spec.get("sessionAffinity"), "spec.sessionAffinity") or "None"
    config = spec.get("sessionAffinityConfig")
    if affinity == "None":
        if config is not None:
            where.fail("spec.sessionAffinityConfig", "must not be set when sessionAffinity "
                       "is None")
        return 0
    if affinity != "ClientIP":
        where.fail("spec.sessionAffinity", f"{affinity!r} is not one of None, ClientIP")
    client_ip = where.mapping(where.mapping(config, "spec.sessionAffinityConfig").get(
        "clientIP"), "spec.sessionAffinityConfig.clientIP")
    field = "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
    timeout = client_ip.get("timeoutSeconds")
    if timeout is None:
        return DEFAULT_AFFINITY_TIMEOUT
    if not isinstance(timeout, int) or isinstance(timeout, bool):
        where.fail(field, f"must be a number of seconds, got {_show(timeout)}")
    if not 0 < timeout <= MAX_AFFINITY_TIMEOUT:
        where.fail(field, f"{_show(timeout)} out of range (1-{MAX_AFFINITY_TIMEOUT})")
    return timeout


# --- EndpointSlice ---------------------------------------------------------------------

def parse_endpoint_slice(d: dict) -> EndpointSlice:
    """Validates the owning service label, address type, ports and every endpoint address.
    FQDN slices keep no endpoints: kube-proxy ignores them (endpointschangetracker.go)."""
    if not isinstance(d, dict):
        raise InvalidObject("EndpointSlice: not a mapping; endpoint slice skipped")
    namespace, name = _metadata(d, "EndpointSlice", "endpoint slice skipped")
    where = _Where(f"EndpointSlice {namespace}/{name}", "endpoint slice skipped")
    labels = where.labels(where.mapping(d.get("metadata"), "metadata"))
    excluded = where.excluded_by(labels)
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
    endpoints = tuple([_endpoint(where, raw, i, family) for i, raw in enumerate(raw_endpoints)])
    if family is None:
        endpoints = ()
    return EndpointSlice(namespace, name, _shared(service_name), _shared(address_type),
                         ports, endpoints,
                         excluded_by_label=excluded)


def _slice_ports(where: _Where, raw_ports: list) -> tuple[EndpointPort, ...]:
    ports: list[EndpointPort] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_ports):
        field = f"ports[{i}]"
        entry = where.mapping(raw, field)
        # kube-proxy drops a port whose name is nil; the EndpointSlice controller always
        # writes one ("" when unnamed), so a missing name here means "".
        name = _shared(where.string(entry.get("name"), f"{field}.name"))
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


def _endpoint(where: _Where, raw: Any, index: int, family: int | None) -> Endpoint:
    # Field names are built only on failure: a large sync parses 100k endpoints.
    entry = raw if raw.__class__ is dict else where.mapping(raw, f"endpoints[{index}]")
    raw_addresses = entry.get("addresses")
    if raw_addresses.__class__ is not list or not 0 < len(raw_addresses) <= \
            MAX_ENDPOINT_ADDRESSES:
        raw_addresses = where.sequence(raw_addresses, f"endpoints[{index}].addresses",
                                       MAX_ENDPOINT_ADDRESSES)
        if not raw_addresses:
            where.fail(f"endpoints[{index}].addresses", "at least one address is required")
    if family is None:   # FQDN: names, not addresses; checked for shape only
        for i, value in enumerate(raw_addresses):
            if not isinstance(value, str) or not value:
                where.fail(f"endpoints[{index}].addresses[{i}]",
                           f"must be a name, got {_show(value)}")
        addresses: tuple[IPAddress, ...] = ()
    # The common case, one plain IPv4 address, kept as its integer (types.Endpoint)
    elif family == 4 and len(raw_addresses) == 1 and raw_addresses[0].__class__ is str and \
            (value := _ipv4_int(raw_addresses[0])) is not None:
        addresses = value
        if _special_v4(value):
            where.fail(f"endpoints[{index}].addresses[0]",
                       f"{raw_addresses[0]} is an unspecified, loopback or link-local address")
    else:
        addresses = tuple(where.address(v, f"endpoints[{index}].addresses[{i}]", family)
                          for i, v in enumerate(raw_addresses))
    # ValidateNonSpecialIP, as the API server applies it to EndpointSlices: a backend at
    # 127.0.0.1, 0.0.0.0 or 169.254.169.254 would send pods to their own or the node's
    # local services. (Found by tests/unit/test_fuzz_objects.py.)
    for i, ip in enumerate(addresses if addresses.__class__ is tuple else ()):
        if _special(ip):
            where.fail(f"endpoints[{index}].addresses[{i}]",
                       f"{ip} is an unspecified, loopback or link-local address")
    # kube-proxy's defaults (endpointslicecache.go addEndpoints): an unset ready or serving
    # condition counts as true, an unset terminating as false.
    conditions = entry.get("conditions")
    if conditions is None:
        ready = serving = True
        terminating = False
    else:
        if conditions.__class__ is not dict:
            conditions = where.mapping(conditions, f"endpoints[{index}].conditions")
        ready = _condition(where, conditions, "ready", True, index)
        serving = _condition(where, conditions, "serving", True, index)
        terminating = _condition(where, conditions, "terminating", False, index)
    node_name = entry.get("nodeName")
    if node_name.__class__ is not str:
        node_name = where.string(node_name, f"endpoints[{index}].nodeName")
    zone = entry.get("zone")
    if zone.__class__ is not str:
        zone = where.string(zone, f"endpoints[{index}].zone")
    zone_hints = node_hints = NO_HINTS
    if entry.get("hints") is not None:
        field = f"endpoints[{index}].hints"
        hints = where.mapping(entry["hints"], field)
        zone_hints = _hint_names(where, hints.get("forZones"), f"{field}.forZones")
        node_hints = _hint_names(where, hints.get("forNodes"), f"{field}.forNodes")
    rest = endpoint_rest(ready, serving, terminating, _shared(node_name), _shared(zone),
                         zone_hints, node_hints)
    if addresses.__class__ is int:
        return Endpoint.packed(addresses, rest)
    return Endpoint(addresses, *rest)


def _condition(where: _Where, conditions: dict, name: str, default: bool, index: int) -> bool:
    value = conditions.get(name)
    if value is None:
        return default
    if value is True or value is False:
        return value
    return where.flag(value, f"endpoints[{index}].conditions.{name}", default)


def _hint_names(where: _Where, raw: Any, field: str) -> frozenset[str]:
    """hints.forZones / hints.forNodes: [{name: ...}] (discovery validation: at most 8)."""
    names = []
    for i, value in enumerate(where.sequence(raw, field, MAX_HINTS)):
        name = where.string(where.mapping(value, f"{field}[{i}]").get("name"),
                            f"{field}[{i}].name")
        if not name:
            where.fail(f"{field}[{i}].name", "required")
        names.append(_shared(name))
    return frozenset(names) if names else NO_HINTS


# --- Node ------------------------------------------------------------------------------

def parse_node(d: dict) -> Node:
    """A v1 Node: its labels (the zone) and status.addresses (the node IPs)."""
    if not isinstance(d, dict):
        raise InvalidObject("Node: not a mapping; node skipped")
    name = _cluster_scoped_name(d, "Node", "node skipped")
    where = _Where(f"Node {name}", "node skipped")
    labels = []
    for key, value in where.labels(where.mapping(d.get("metadata"), "metadata")).items():
        if not isinstance(key, str) or not key:
            where.fail("metadata.labels", f"label key {_show(key)} must be a string")
        labels.append((key, where.string(value, f"metadata.labels[{key}]")))
    addresses = []
    status = where.mapping(d.get("status"), "status")
    for i, raw in enumerate(where.sequence(status.get("addresses"), "status.addresses")):
        field = f"status.addresses[{i}]"
        entry = where.mapping(raw, field)
        address_type = where.string(entry.get("type"), f"{field}.type")
        if not address_type:
            where.fail(f"{field}.type", "required")
        if address_type in NODE_IP_ADDRESS_TYPES:
            addresses.append(NodeAddress(address_type,
                                         where.address(entry.get("address"), f"{field}.address")))
        else:                     # Hostname, InternalDNS, ExternalDNS: names, not kept
            where.string(entry.get("address"), f"{field}.address")
    return Node(name, tuple(sorted(labels)), tuple(addresses))
