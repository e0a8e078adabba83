"""Border conversion: valid Kubernetes dicts become frozen objects with API defaults applied;
each invalid field raises InvalidObject naming the object, the field and the consequence."""
from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent.model.objects import object_key, parse_endpoint_slice, parse_object, parse_service
from agent.model.types import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    InvalidObject,
    ObjectKey,
    Protocol,
    Service,
    ServicePort,
)

TCP, UDP = Protocol.TCP, Protocol.UDP


def ip(text: str):
    return ipaddress.ip_address(text)


def service_dict(**spec: Any) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}], **spec}}


def slice_dict(**fields: Any) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.1.0.1"]}], **fields}


def edit(d: dict, path: str, value: Any) -> dict:
    """A deep copy of d with path ("a.b.0.c") set to value, or deleted when value is DELETE."""
    d = copy.deepcopy(d)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    target = d
    for part in parents:
        target = target[part]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return d


DELETE = object()


# --- Services ---------------------------------------------------------------------------

@dataclass
class Valid:
    name: str
    given: dict
    want: Any


SERVICE_CASES = [
    Valid("defaults: namespace, type, protocol, targetPort = port",
          {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}},
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80),))),
    Valid("named targetPort kept as a name",
          service_dict(ports=[{"port": 80, "targetPort": "http"}]),
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, "http"),))),
    Valid("TCP and UDP on the same port number",
          service_dict(ports=[{"name": "dns", "port": 53, "protocol": "UDP"},
                              {"name": "dns-tcp", "port": 53, "protocol": "TCP",
                               "targetPort": 5353}]),
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"),),
                  (ServicePort("dns", UDP, 53, 53), ServicePort("dns-tcp", TCP, 53, 5353)))),
    Valid("headless: clusterIP None",
          service_dict(clusterIP="None", clusterIPs=["None"]),
          Service("default", "web", "ClusterIP", (), (ServicePort("", TCP, 80, 80),),
                  headless=True)),
    Valid("headless: clusterIP empty",
          service_dict(clusterIP=""),
          Service("default", "web", "ClusterIP", (), (ServicePort("", TCP, 80, 80),),
                  headless=True)),
    Valid("headless: no cluster IP at all",
          edit(service_dict(), "spec.clusterIP", DELETE),
          Service("default", "web", "ClusterIP", (), (ServicePort("", TCP, 80, 80),),
                  headless=True)),
    Valid("dual-stack clusterIPs",
          service_dict(clusterIP="10.96.0.10", clusterIPs=["10.96.0.10", "fd00::10"],
                       ipFamilyPolicy="PreferDualStack"),
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"), ip("fd00::10")),
                  (ServicePort("", TCP, 80, 80),))),
    Valid("clusterIPs alone",
          edit(service_dict(clusterIPs=["fd00::10"]), "spec.clusterIP", DELETE),
          Service("default", "web", "ClusterIP", (ip("fd00::10"),),
                  (ServicePort("", TCP, 80, 80),))),
    Valid("ExternalName records the type and no cluster IP",
          service_dict(type="ExternalName", externalName="db.example.com", clusterIP=""),
          Service("default", "web", "ExternalName", (), (ServicePort("", TCP, 80, 80),))),
    Valid("NodePort keeps its cluster IP",
          service_dict(type="NodePort", ports=[{"port": 80, "nodePort": 30080}]),
          Service("default", "web", "NodePort", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80),))),
    Valid("no ports",
          service_dict(ports=None),
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"),), ())),
]


@pytest.mark.parametrize("case", SERVICE_CASES, ids=lambda c: c.name)
def test_parse_service(case):
    assert parse_service(case.given) == case.want
    assert parse_object(case.given) == case.want


@dataclass
class Invalid:
    name: str
    given: dict
    field: str                    # the message must name this field
    detail: str = ""              # and contain this
    extra: dict = field(default_factory=dict)


TWO_PORTS = [{"name": "http", "port": 80}, {"name": "https", "port": 443}]

SERVICE_INVALID = [
    Invalid("no metadata.name", edit(service_dict(), "metadata.name", DELETE),
            "metadata.name", "required"),
    Invalid("metadata.namespace not a string", edit(service_dict(), "metadata.namespace", 7),
            "metadata.namespace"),
    Invalid("spec not a mapping", edit(service_dict(), "spec", ["x"]), "spec"),
    Invalid("unknown type", service_dict(type="Ingress"), "spec.type", "'Ingress'"),
    Invalid("ports not a list", service_dict(ports={"port": 80}), "spec.ports"),
    Invalid("port entry not a mapping", service_dict(ports=[80]), "spec.ports[0]"),
    Invalid("port missing", service_dict(ports=[{"name": "http"}]), "spec.ports[0].port"),
    Invalid("port zero", service_dict(ports=[{"port": 0}]), "spec.ports[0].port",
            "0 out of range (1-65535)"),
    Invalid("port as a string", service_dict(ports=[{"port": "80"}]), "spec.ports[0].port"),
    Invalid("port as a boolean", service_dict(ports=[{"port": True}]), "spec.ports[0].port"),
    Invalid("port as a float", service_dict(ports=[{"port": 80.0}]), "spec.ports[0].port"),
    Invalid("unknown protocol", service_dict(ports=[{"port": 80, "protocol": "HTTP"}]),
            "spec.ports[0].protocol", "'HTTP'"),
    Invalid("lower-case protocol", service_dict(ports=[{"port": 80, "protocol": "tcp"}]),
            "spec.ports[0].protocol"),
    Invalid("targetPort out of range",
            service_dict(ports=[{"port": 80, "targetPort": 70000}]),
            "spec.ports[0].targetPort", "70000 out of range"),
    Invalid("targetPort empty name", service_dict(ports=[{"port": 80, "targetPort": ""}]),
            "spec.ports[0].targetPort"),
    Invalid("targetPort zero", service_dict(ports=[{"port": 80, "targetPort": 0}]),
            "spec.ports[0].targetPort"),
    Invalid("second port unnamed", service_dict(ports=[{"name": "http", "port": 80},
                                                       {"port": 443}]),
            "spec.ports[1].name", "required"),
    Invalid("duplicate port names", service_dict(ports=[{"name": "http", "port": 80},
                                                        {"name": "http", "port": 81}]),
            "spec.ports[1].name", "duplicate"),
    Invalid("duplicate port and protocol",
            service_dict(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 80}]),
            "spec.ports[1]", "duplicate port 80/TCP"),
    Invalid("clusterIP not an address", service_dict(clusterIP="10.96.0.300"),
            "spec.clusterIP", "not a valid IP address"),
    Invalid("clusterIP not a string", service_dict(clusterIP=167772160), "spec.clusterIP"),
    Invalid("clusterIP with a zone index", service_dict(clusterIP="fe80::1%eth0"),
            "spec.clusterIP", "zone"),
    Invalid("clusterIP differs from clusterIPs[0]",
            service_dict(clusterIP="10.96.0.10", clusterIPs=["10.96.0.11"]), "spec.clusterIP"),
    Invalid("two IPv4 clusterIPs",
            service_dict(clusterIP="10.96.0.10", clusterIPs=["10.96.0.10", "10.96.0.11"]),
            "spec.clusterIPs", "one IPv4 and one IPv6"),
    Invalid("three clusterIPs",
            service_dict(clusterIP="10.96.0.10",
                         clusterIPs=["10.96.0.10", "fd00::1", "10.96.0.12"]),
            "spec.clusterIPs"),
    Invalid("headless with another cluster IP",
            service_dict(clusterIP="None", clusterIPs=["None", "10.96.0.10"]),
            "spec.clusterIPs", "headless"),
    Invalid("bad second clusterIP",
            service_dict(clusterIPs=["10.96.0.10", "fd00::zz"]), "spec.clusterIPs[1]"),
]


@pytest.mark.parametrize("case", SERVICE_INVALID, ids=lambda c: c.name)
def test_parse_service_invalid(case):
    with pytest.raises(InvalidObject) as raised:
        parse_object(case.given)
    message = str(raised.value)
    assert message.startswith("Service "), message
    assert f"{case.field}: " in message, message
    assert case.detail in message, message
    assert message.endswith("; service skipped"), message


def test_invalid_message_names_object_field_and_consequence():
    bad = service_dict(ports=[{"name": "http", "port": 80}, {"name": "x", "port": 70000}])
    with pytest.raises(InvalidObject, match="^Service default/web: spec.ports\\[1\\].port: "
                       "70000 out of range \\(1-65535\\); service skipped$"):
        parse_service(bad)


def test_huge_or_deep_values_do_not_break_the_message():
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(InvalidObject, match="spec.ports\\[0\\].port: must be a port number"):
        parse_service(service_dict(ports=[{"port": deep}]))
    with pytest.raises(InvalidObject, match="spec.ports\\[0\\].port: must be a port number"):
        parse_service(service_dict(ports=[{"port": "x" * 10**6}]))


# --- EndpointSlices ---------------------------------------------------------------------

def endpoint(address: str, ready=True, serving=True, terminating=False, node="", zone=""):
    return Endpoint((ip(address),), ready, serving, terminating, node, zone)


SLICE_CASES = [
    Valid("one endpoint, defaults",
          slice_dict(),
          EndpointSlice("default", "web-abc", "web", "IPv4", (EndpointPort("", TCP, 8080),),
                        (endpoint("10.1.0.1"),))),
    Valid("namespace defaults to default; port name and protocol default",
          edit(edit(slice_dict(ports=[{"port": 8080}]), "metadata.namespace", DELETE),
               "metadata.name", "web-1"),
          EndpointSlice("default", "web-1", "web", "IPv4", (EndpointPort("", TCP, 8080),),
                        (endpoint("10.1.0.1"),))),
    Valid("a port without a number means all ports: skipped",
          slice_dict(ports=[{"name": "all", "port": None}, {"name": "absent"},
                            {"name": "http", "port": 8080, "protocol": "UDP"}]),
          EndpointSlice("default", "web-abc", "web", "IPv4", (EndpointPort("http", UDP, 8080),),
                        (endpoint("10.1.0.1"),))),
    Valid("node, zone and several addresses",
          slice_dict(endpoints=[{"addresses": ["10.1.0.1", "10.1.0.2"], "nodeName": "n1",
                                 "zone": "z1"}]),
          EndpointSlice("default", "web-abc", "web", "IPv4", (EndpointPort("", TCP, 8080),),
                        (Endpoint((ip("10.1.0.1"), ip("10.1.0.2")), True, True, False,
                                  "n1", "z1"),))),
    Valid("IPv6 slice",
          slice_dict(addressType="IPv6", endpoints=[{"addresses": ["fd00::1"]}]),
          EndpointSlice("default", "web-abc", "web", "IPv6", (EndpointPort("", TCP, 8080),),
                        (endpoint("fd00::1"),))),
    Valid("FQDN slice keeps no endpoints: kube-proxy ignores them",
          slice_dict(addressType="FQDN", endpoints=[{"addresses": ["db.example.com"]}]),
          EndpointSlice("default", "web-abc", "web", "FQDN", (EndpointPort("", TCP, 8080),),
                        ())),
    Valid("no endpoints, no ports",
          slice_dict(endpoints=None, ports=None),
          EndpointSlice("default", "web-abc", "web", "IPv4", (), ())),
]


@pytest.mark.parametrize("case", SLICE_CASES, ids=lambda c: c.name)
def test_parse_endpoint_slice(case):
    assert parse_endpoint_slice(case.given) == case.want
    assert parse_object(case.given) == case.want


CONDITION_CASES = [
    # (conditions, want (ready, serving, terminating))  -- EndpointConditions API defaults
    ("all absent: unknown counts as ready", None, (True, True, False)),
    ("empty mapping", {}, (True, True, False)),
    ("not ready, serving unset counts as serving (kube-proxy)", {"ready": False},
     (False, True, False)),
    ("terminating and still serving", {"ready": False, "serving": True, "terminating": True},
     (False, True, True)),
    ("terminating, not serving", {"ready": False, "serving": False, "terminating": True},
     (False, False, True)),
    ("explicit nulls", {"ready": None, "serving": None, "terminating": None},
     (True, True, False)),
]


@pytest.mark.parametrize("name,conditions,want", CONDITION_CASES,
                         ids=[c[0] for c in CONDITION_CASES])
def test_endpoint_conditions(name, conditions, want):
    raw = {"addresses": ["10.1.0.1"]} | ({} if conditions is None else {"conditions": conditions})
    (parsed,) = parse_endpoint_slice(slice_dict(endpoints=[raw])).endpoints
    assert (parsed.ready, parsed.serving, parsed.terminating) == want


SLICE_INVALID = [
    Invalid("no service-name label", edit(slice_dict(), "metadata.labels", {}),
            "metadata.labels[kubernetes.io/service-name]", "required"),
    Invalid("no labels at all", edit(slice_dict(), "metadata.labels", DELETE),
            "metadata.labels[kubernetes.io/service-name]"),
    Invalid("no metadata.name", edit(slice_dict(), "metadata.name", DELETE), "metadata.name"),
    Invalid("no addressType", edit(slice_dict(), "addressType", DELETE), "addressType"),
    Invalid("unknown addressType", slice_dict(addressType="IPv5"), "addressType"),
    Invalid("addressType not a string", slice_dict(addressType=["IPv4"]), "addressType"),
    Invalid("bad endpoint address",
            slice_dict(endpoints=[{"addresses": ["10.1.0.1"]}, {"addresses": ["10.1.0.x"]}]),
            "endpoints[1].addresses[0]", "not a valid IP address"),
    Invalid("IPv6 address in an IPv4 slice",
            slice_dict(endpoints=[{"addresses": ["fd00::1"]}]),
            "endpoints[0].addresses[0]", "not an IPv4 address"),
    Invalid("IPv4 address in an IPv6 slice",
            slice_dict(addressType="IPv6", endpoints=[{"addresses": ["10.1.0.1"]}]),
            "endpoints[0].addresses[0]", "not an IPv6 address"),
    Invalid("endpoint without addresses", slice_dict(endpoints=[{"addresses": []}]),
            "endpoints[0].addresses", "at least one"),
    Invalid("endpoint not a mapping", slice_dict(endpoints=["10.1.0.1"]), "endpoints[0]"),
    Invalid("port out of range", slice_dict(ports=[{"name": "", "port": 70000}]),
            "ports[0].port", "70000 out of range"),
    Invalid("port as a string", slice_dict(ports=[{"name": "", "port": "8080"}]),
            "ports[0].port"),
    Invalid("unknown protocol", slice_dict(ports=[{"port": 8080, "protocol": "QUIC"}]),
            "ports[0].protocol"),
    Invalid("duplicate port names",
            slice_dict(ports=[{"name": "http", "port": 80}, {"name": "http", "port": 81}]),
            "ports[1].name", "duplicate"),
    Invalid("ready not a boolean",
            slice_dict(endpoints=[{"addresses": ["10.1.0.1"], "conditions": {"ready": "yes"}}]),
            "endpoints[0].conditions.ready"),
    Invalid("nodeName not a string",
            slice_dict(endpoints=[{"addresses": ["10.1.0.1"], "nodeName": 3}]),
            "endpoints[0].nodeName"),
    Invalid("more endpoints than the API allows",
            slice_dict(endpoints=[{"addresses": ["10.1.0.1"]}] * 1001), "endpoints", "1001"),
]


@pytest.mark.parametrize("case", SLICE_INVALID, ids=lambda c: c.name)
def test_parse_endpoint_slice_invalid(case):
    with pytest.raises(InvalidObject) as raised:
        parse_object(case.given)
    message = str(raised.value)
    assert message.startswith("EndpointSlice "), message
    assert f"{case.field}: " in message, message
    assert case.detail in message, message
    assert message.endswith("; endpoint slice skipped"), message


# --- dispatch and keys ------------------------------------------------------------------

NOT_HANDLED = [
    ("Deployment", {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}}),
    ("Node, for now", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}),
    ("old EndpointSlice API", edit(slice_dict(), "apiVersion", "discovery.k8s.io/v1beta1")),
    ("Service without apiVersion", edit(service_dict(), "apiVersion", DELETE)),
    ("v1 Endpoints", {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "web"}}),
    ("unhashable kind", {"apiVersion": "v1", "kind": ["Service"]}),
]


@pytest.mark.parametrize("name,given", NOT_HANDLED, ids=[c[0] for c in NOT_HANDLED])
def test_parse_object_ignores_other_kinds(name, given):
    assert parse_object(given) is None
    assert object_key(given) is None


@pytest.mark.parametrize("given", [None, [], "Service", 3])
def test_parse_object_rejects_non_mappings(given):
    with pytest.raises(InvalidObject, match="not a mapping"):
        parse_object(given)


KEY_CASES = [
    ("service", service_dict(ports="broken"), ObjectKey("Service", "default", "web")),
    ("slice in another namespace", edit(slice_dict(addressType="bad"), "metadata.namespace",
                                        "shop"), ObjectKey("EndpointSlice", "shop", "web-abc")),
    ("namespace defaults", edit(service_dict(), "metadata.namespace", DELETE),
     ObjectKey("Service", "default", "web")),
    ("no name: no key", edit(service_dict(), "metadata.name", DELETE), None),
    ("metadata not a mapping", edit(service_dict(), "metadata", "web"), None),
]


@pytest.mark.parametrize("name,given,want", KEY_CASES, ids=[c[0] for c in KEY_CASES])
def test_object_key_of_a_possibly_invalid_object(name, given, want):
    assert object_key(given) == want
