"""The model's vocabulary: Kubernetes objects after border conversion, this node, and desired state.

Frozen dataclasses only; no I/O. Sources build the object types, the model builds the rest."""
from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass


class InvalidObject(ValueError):
    """A Kubernetes object that cannot be served; the message names the object and field."""


class Protocol(enum.Enum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"

    @property
    def number(self) -> int:
        """IP protocol number, as the kernel programs see it."""
        return {"TCP": 6, "UDP": 17, "SCTP": 132}[self.value]


class FrontendKind(enum.Enum):
    """How a connection reaches a service port. ClusterIP is "internal" traffic; the other
    three are kube-proxy's "external destinations" (serviceport.go ExternallyAccessible)."""
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    EXTERNAL_IP = "ExternalIP"
    LOAD_BALANCER = "LoadBalancer"

    @property
    def external(self) -> bool:
        return self is not FrontendKind.CLUSTER_IP


class BackendState(enum.Enum):
    READY = "ready"
    TERMINATING = "terminating"   # serving and terminating: used only when none is ready


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The labels kube-proxy's informers select against (cmd/kube-proxy/app/server.go): an object
# carrying either, with any value, never reaches kube-proxy at all.
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
ZONE_LABEL = "topology.kubernetes.io/zone"


@dataclass(frozen=True, slots=True)
class ObjectKey:
    kind: str                     # "Service" | "EndpointSlice" | "Node"
    namespace: str                # "" for a Node (cluster-scoped)
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else \
            f"{self.kind} {self.name}"


# --- Kubernetes objects, converted at the border -------------------------------------

@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str                     # "" for an unnamed single port
    protocol: Protocol
    port: int                     # 1..65535
    target_port: int | str        # number, or a name resolved against endpoint ports
    node_port: int = 0            # 1..65535; 0 = none (ClusterIP, or not allocated)


@dataclass(frozen=True, slots=True)
class LoadBalancerIngress:
    """status.loadBalancer.ingress[] entry that has an ip (hostname-only entries are dropped)."""
    ip: IPAddress
    ip_mode: str = "VIP"          # "VIP" | "Proxy"; kube-proxy programs VIP only


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    type: str                     # ClusterIP | NodePort | LoadBalancer | ExternalName
    cluster_ips: tuple[IPAddress, ...]   # empty for headless ("None") and ExternalName
    ports: tuple[ServicePort, ...]
    headless: bool = False
    external_ips: tuple[IPAddress, ...] = ()                  # spec.externalIPs
    load_balancer_ingress: tuple[LoadBalancerIngress, ...] = ()
    internal_traffic_policy: str = "Cluster"                  # "Cluster" | "Local"
    external_traffic_policy: str = "Cluster"                  # "Cluster" | "Local"
    session_affinity_timeout: int = 0     # seconds, 1..86400 with ClientIP; 0 = None
    excluded_by_label: str = ""   # SERVICE_PROXY_NAME_LABEL or HEADLESS_LABEL when present
    # spec.loadBalancerSourceRanges, trimmed and parsed, both families, as written
    load_balancer_source_ranges: tuple[IPNetwork, ...] = ()
    health_check_node_port: int = 0       # spec.healthCheckNodePort; 0 = none

    @property
    def key(self) -> ObjectKey:
        return ObjectKey("Service", self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str                     # "" when unnamed
    protocol: Protocol
    port: int


NO_HINTS: frozenset[str] = frozenset()


class Endpoint:
    """An EndpointSlice endpoint, immutable, compared and hashed by value like the frozen
    dataclasses here; the fields:

      addresses    tuple[IPAddress, ...]
      ready        conditions.ready; an absent condition counts as ready
      serving      conditions.serving; absent -> true (kube-proxy)
      terminating  conditions.terminating; absent -> False
      node_name, zone
      zone_hints   hints.forZones[].name      node_hints   hints.forNodes[].name

    Stored compactly (100k of them at 10k services x 10; issue 16): one IPv4 address as its
    integer (`addresses` makes the tuple on demand; the model reads `first_ipv4`), any
    other address list as the tuple; the other fields as one tuple shared by every
    endpoint that has the same values (most of a cluster's: ready, on one of few nodes).
    48 bytes instead of 96 + a 48-byte tuple + a 48-byte IPv4Address."""
    __slots__ = ("_address", "_rest")

    def __init__(self, addresses: tuple[IPAddress, ...], ready: bool, serving: bool,
                 terminating: bool, node_name: str = "", zone: str = "",
                 zone_hints: frozenset[str] = NO_HINTS,
                 node_hints: frozenset[str] = NO_HINTS) -> None:
        addresses = tuple(addresses)
        set_slot = object.__setattr__
        set_slot(self, "_address", addresses[0]._ip if len(addresses) == 1 and
                 addresses[0].__class__ is ipaddress.IPv4Address else addresses)
        set_slot(self, "_rest", endpoint_rest(ready, serving, terminating, node_name, zone,
                                              zone_hints, node_hints))

    @classmethod
    def packed(cls, address: int | tuple[IPAddress, ...], rest: tuple) -> Endpoint:
        """From the stored form: one IPv4 address's integer or the address tuple, and
        endpoint_rest()'s tuple (the parser's hot path)."""
        endpoint = object.__new__(cls)
        object.__setattr__(endpoint, "_address", address)
        object.__setattr__(endpoint, "_rest", rest)
        return endpoint

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        address = self._address
        return (ipaddress.IPv4Address(address),) if address.__class__ is int else address

    @property
    def first_ipv4(self) -> int | None:
        """The integer of the only address when that is IPv4; None otherwise."""
        address = self._address
        return address if address.__class__ is int else None

    ready = property(lambda self: self._rest[0])
    serving = property(lambda self: self._rest[1])
    terminating = property(lambda self: self._rest[2])
    node_name = property(lambda self: self._rest[3])
    zone = property(lambda self: self._rest[4])
    zone_hints = property(lambda self: self._rest[5])
    node_hints = property(lambda self: self._rest[6])

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: Endpoint is immutable")

    __delattr__ = __setattr__

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Endpoint:
            return NotImplemented
        return self._address == other._address and self._rest == other._rest

    def __hash__(self) -> int:
        return hash((self._address, self._rest))

    def __repr__(self) -> str:
        ready, serving, terminating, node_name, zone, zone_hints, node_hints = self._rest
        return (f"Endpoint(addresses={self.addresses!r}, ready={ready!r}, "
                f"serving={serving!r}, terminating={terminating!r}, "
                f"node_name={node_name!r}, zone={zone!r}, zone_hints={zone_hints!r}, "
                f"node_hints={node_hints!r})")

    def __reduce__(self) -> tuple:
        return (Endpoint, (self.addresses, *self._rest))


_ENDPOINT_RESTS: dict[tuple, tuple] = {}


def endpoint_rest(ready: bool, serving: bool, terminating: bool, node_name: str = "",
                  zone: str = "", zone_hints: frozenset[str] = NO_HINTS,
                  node_hints: frozenset[str] = NO_HINTS) -> tuple:
    """An Endpoint's fields after its addresses, as one tuple shared by equal values."""
    rest = (ready, serving, terminating, node_name, zone, zone_hints, node_hints)
    shared = _ENDPOINT_RESTS.get(rest)
    if shared is None:
        if len(_ENDPOINT_RESTS) >= 65536:    # bounded: node names come and go
            _ENDPOINT_RESTS.clear()
        shared = _ENDPOINT_RESTS[rest] = rest
    return shared


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str             # label kubernetes.io/service-name
    address_type: str             # IPv4 | IPv6 | FQDN
    ports: tuple[EndpointPort, ...]
    endpoints: tuple[Endpoint, ...]
    excluded_by_label: str = ""   # SERVICE_PROXY_NAME_LABEL or HEADLESS_LABEL when present

    @property
    def key(self) -> ObjectKey:
        return ObjectKey("EndpointSlice", self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class NodeAddress:
    type: str                     # "InternalIP" | "ExternalIP" (name types are not kept)
    address: IPAddress


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    labels: tuple[tuple[str, str], ...] = ()     # sorted (key, value) pairs
    addresses: tuple[NodeAddress, ...] = ()      # status.addresses, in order

    @property
    def key(self) -> ObjectKey:
        return ObjectKey("Node", "", self.name)

    @property
    def zone(self) -> str:
        return dict(self.labels).get(ZONE_LABEL, "")

    def host_ips(self) -> tuple[IPAddress, ...]:
        """The node's primary IP and, if it has one, the first of the other family:
        InternalIP before ExternalIP (component-helpers nodeutil.GetNodeHostIPs)."""
        ordered = [a.address for a in self.addresses if a.type == "InternalIP"] + \
                  [a.address for a in self.addresses if a.type == "ExternalIP"]
        if not ordered:
            return ()
        other = next((ip for ip in ordered if ip.version != ordered[0].version), None)
        return (ordered[0],) if other is None else (ordered[0], other)


@dataclass(frozen=True, slots=True)
class NodeContext:
    """What the model needs to know about the node it runs on.

    node_ips: the addresses NodePorts are served on (both families; --node-ip, or the Node
    object's host IPs). node_port_cidrs: kube-proxy's --nodeport-addresses: when it has a
    CIDR of a family, only that family's node IPs inside one of them take NodePorts; a family
    without CIDRs takes all its node IPs (util/nodeport_addresses.go NewNodePortAddresses)."""
    node_name: str = ""
    node_ips: tuple[IPAddress, ...] = ()
    node_port_cidrs: tuple[IPNetwork, ...] = ()
    zone: str = ""                # label topology.kubernetes.io/zone of this node

    @classmethod
    def from_node(cls, node: Node | None, node_name: str = "",
                  node_ips: tuple[IPAddress, ...] = (),
                  node_port_cidrs: tuple[IPNetwork, ...] = ()) -> NodeContext:
        """Explicit arguments win; the Node object fills in name, IPs and zone."""
        if node is None:
            return cls(node_name, tuple(node_ips), tuple(node_port_cidrs))
        return cls(node_name or node.name, tuple(node_ips) or node.host_ips(),
                   tuple(node_port_cidrs), node.zone)

    def node_port_ips(self, family: int) -> tuple[IPAddress, ...]:
        ips = [ip for ip in self.node_ips if ip.version == family]
        cidrs = [c for c in self.node_port_cidrs if c.version == family]
        if cidrs:
            ips = [ip for ip in ips if any(ip in c for c in cidrs)]
        return tuple(dict.fromkeys(ips))


# --- Desired state --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ServicePortName:
    """kube-proxy's ServicePortName: one load-balanced unit."""
    namespace: str
    name: str
    port_name: str
    protocol: Protocol

    def __str__(self) -> str:
        port = f":{self.port_name}" if self.port_name else ""
        return f"{self.namespace}/{self.name}{port}/{self.protocol.value}"


@dataclass(frozen=True, slots=True)
class Frontend:
    address: IPAddress
    port: int
    protocol: Protocol
    kind: FrontendKind = FrontendKind.CLUSTER_IP

    def sort_key(self) -> tuple:
        return (self.address.version, int(self.address), self.port, self.protocol.value)


@dataclass(frozen=True, slots=True)
class Backend:
    """local: on this node (its endpoint's nodeName is this node's name, or its address
    is one of the node's IPs: a hostNetwork endpoint). Traffic from outside reaches a local
    backend with the client's address and a remote one from the node (SNAT), whatever
    interface the route to it leaves through."""
    address: IPAddress
    port: int
    state: BackendState = BackendState.READY
    node_name: str = ""
    zone: str = ""
    local: bool = False

    def sort_key(self) -> tuple:
        return (self.address.version, int(self.address), self.port)


@dataclass(frozen=True, slots=True)
class ServicePortState:
    """Everything the datapath needs for one service port of one address family.

    Which backends a connection gets depends on the frontend kind and on where the
    connection started (backends_for). Three sets, each sorted by sort_key, de-duplicated:

      backends           started on this node (its pods or the host) to a ClusterIP
                         frontend: the node's endpoints when internalTrafficPolicy is Local
                         (none local -> empty), otherwise the cluster-wide ones. kube-proxy
                         applies the same set to ClusterIP traffic arriving from outside.
      external_backends  started on this node to a NodePort, ExternalIP or LoadBalancer
                         frontend: always the cluster-wide set, whatever either policy says.
                         kube-proxy short-circuits pod and host traffic to external
                         destinations to its Cluster-policy chain, "which simulates going
                         up-and-out to an external load-balancer and coming back in"
                         (nftables/proxier.go syncProxyRules, "short-circuit pod traffic" /
                         "short-circuit local traffic").
      outside_backends   arriving from outside the node at a NodePort, ExternalIP or
                         LoadBalancer frontend (the TC NodePort program): the node's
                         endpoints when externalTrafficPolicy is Local, otherwise the
                         cluster-wide set.
    Both external sets are empty when the port has no external frontend.

    "Cluster-wide" is kube-proxy's clusterEndpoints: ready endpoints (topology hints
    applied), or serving-and-terminating ones when none is ready anywhere. "The node's" is
    its localEndpoints: ready local ones, else serving-and-terminating local ones, never
    topology-filtered (topology.go CategorizeEndpoints).

    An empty set means no backend for that traffic. has_any_endpoints tells which of
    kube-proxy's verdicts that is: False -> nothing usable anywhere, REJECT (connection
    refused); True -> usable endpoints exist on other nodes but a Local policy excludes
    them, which kube-proxy DROPs ("has no local endpoints").

    source_ranges: the sources allowed to reach this port's LoadBalancer frontends, sorted
    and de-duplicated, of this state's family; empty = no restriction. Any other source is
    DROPped, whether it comes from outside, from a pod or from the node (kube-proxy's
    firewall chain sits before DNAT for all of them). They apply to LoadBalancer frontends
    only: "for loadbalancers which direct traffic to service NodePort, the firewall rules
    will not apply", nor to ClusterIPs and ExternalIPs. When a range contains this node's
    IP, the LoadBalancer IPs themselves are added as /32 (/128) ranges: a node reaching a
    VIP that is also a local address arrives with the VIP as its source (iptables and
    nftables proxier.go, allowFromNode). A /0 range means no restriction at all
    (serviceport.go, IsZeroCIDR)."""
    name: ServicePortName
    family: int                         # 4 or 6
    frontends: tuple[Frontend, ...]     # every address of this port, sorted by sort_key
    backends: tuple[Backend, ...]       # started on this node, to a ClusterIP frontend
    external_backends: tuple[Backend, ...] = ()   # started on this node, to an external one
    outside_backends: tuple[Backend, ...] = ()    # from outside the node, to an external one
    session_affinity_timeout: int = 0   # ClientIP affinity in seconds; 0 = no affinity
    has_any_endpoints: bool = False     # usable endpoints exist on some node
    source_ranges: tuple[IPNetwork, ...] = ()     # allowed to LoadBalancer frontends; () = all

    def backends_for(self, kind: FrontendKind, from_outside: bool = False
                     ) -> tuple[Backend, ...]:
        if not kind.external:
            return self.backends
        return self.outside_backends if from_outside else self.external_backends


# Desired and applied state: one entry per (service port, IP family).
DesiredState = dict[tuple[ServicePortName, int], ServicePortState]
