"""The model's vocabulary: Kubernetes objects after border conversion, and desired state.

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
    CLUSTER_IP = "ClusterIP"


class BackendState(enum.Enum):
    READY = "ready"
    TERMINATING = "terminating"   # serving and terminating: used only when none is ready


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class ObjectKey:
    kind: str                     # "Service" | "EndpointSlice" | "Node"
    namespace: str
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


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    type: str                     # ClusterIP | NodePort | LoadBalancer | ExternalName
    cluster_ips: tuple[IPAddress, ...]   # empty for headless ("None") and ExternalName
    ports: tuple[ServicePort, ...]
    headless: bool = False

    @property
    def key(self) -> ObjectKey:
        return ObjectKey("Service", self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str                     # "" when unnamed
    protocol: Protocol
    port: int


@dataclass(frozen=True, slots=True)
class Endpoint:
    addresses: tuple[IPAddress, ...]
    ready: bool                   # conditions.ready; an absent condition counts as ready
    serving: bool                 # conditions.serving; absent -> same as ready
    terminating: bool             # conditions.terminating; absent -> False
    node_name: str = ""
    zone: str = ""


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str             # label kubernetes.io/service-name
    address_type: str             # IPv4 | IPv6 | FQDN
    ports: tuple[EndpointPort, ...]
    endpoints: tuple[Endpoint, ...]

    @property
    def key(self) -> ObjectKey:
        return ObjectKey("EndpointSlice", self.namespace, self.name)


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
    address: IPAddress
    port: int
    state: BackendState = BackendState.READY
    node_name: str = ""
    zone: str = ""

    def sort_key(self) -> tuple:
        return (self.address.version, int(self.address), self.port)


@dataclass(frozen=True, slots=True)
class ServicePortState:
    """Everything the datapath needs for one service port of one address family."""
    name: ServicePortName
    family: int                         # 4 or 6
    frontends: tuple[Frontend, ...]     # sorted by sort_key
    backends: tuple[Backend, ...]       # usable ones only, sorted by sort_key, de-duplicated


# Desired and applied state: one entry per (service port, IP family).
DesiredState = dict[tuple[ServicePortName, int], ServicePortState]
