"""Hostile and broken objects at the model's border, under hypothesis (issue 9, point 6).

Valid Services, EndpointSlices and Nodes are mutated (wrong types, huge and negative numbers,
deep nesting, huge lists, YAML's dates, bytes and sets, special addresses) and fed to the
border and the model: a bad object raises InvalidObject and nothing else; whatever is
accepted yields frontends and backends inside the ranges the datapath and the API allow."""
from __future__ import annotations

import copy
import datetime
import ipaddress
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model import desired_state
from agent.model.objects import object_key, parse_object
from agent.model.types import (
    BackendState,
    EndpointSlice,
    FrontendKind,
    InvalidObject,
    Node,
    NodeContext,
    Protocol,
    Service,
)
from agent.planner import by_scope, plan

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def service(name: str = "web", **spec: Any) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "ns", "labels": {"app": "web"}},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10",
                     "clusterIPs": ["10.96.0.10"], "ipFamilies": ["IPv4"],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                "protocol": "TCP"},
                               {"name": "dns", "port": 53, "targetPort": "dns",
                                "protocol": "UDP"}], **spec}}


def endpoint_slice(address_type: str = "IPv4", addresses: tuple[str, ...] = ("10.244.1.5",
                                                                            "10.244.1.6"),
                   service_name: str = "web") -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service_name}-{address_type.lower()}", "namespace": "ns",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": address_type,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [{"addresses": [a], "nodeName": "node-a", "zone": "z1",
                           "conditions": {"ready": i % 2 == 0, "serving": True,
                                          "terminating": i % 2 == 1},
                           "hints": {"forZones": [{"name": "z1"}],
                                     "forNodes": [{"name": "node-a"}]}}
                          for i, a in enumerate(addresses)]}


NODE = {"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"},
                                 {"type": "InternalIP", "address": "fd00::1"},
                                 {"type": "Hostname", "address": "node-a"}]}}

SERVICES = [
    service(),
    service("np", type="NodePort", ports=[{"name": "http", "port": 80, "targetPort": 8080,
                                     "nodePort": 30080}], externalTrafficPolicy="Local"),
    service("lb", type="LoadBalancer", externalIPs=["192.0.2.10"], sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 300}},
            ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30081}]),
    service("dual", clusterIP="10.96.0.11", clusterIPs=["10.96.0.11", "fd00:10:96::11"],
            ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack",
            internalTrafficPolicy="Local"),
    service("headless", clusterIP="None", clusterIPs=["None"]),
    service("alias", type="ExternalName", externalName="example.com", clusterIP="", clusterIPs=[]),
]
SERVICES[2]["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.7", "ipMode": "VIP"},
                                                      {"hostname": "lb.example.com"}]}}
SLICES = [endpoint_slice(), endpoint_slice(service_name="np"), endpoint_slice(service_name="lb"),
          endpoint_slice(service_name="dual"),
          endpoint_slice("IPv6", ("fd00:10:244:1::5", "fd00:10:244:1::6"), "dual"),
          endpoint_slice("FQDN", ("a.example.com",))]

# Values a YAML file or a hostile writer can put anywhere (the C SafeLoader yields dates,
# datetimes, bytes for !!binary and sets for !!set besides the JSON types).
SPECIAL_TEXT = ["", "None", "0.0.0.0", "::", "127.0.0.1", "::1", "169.254.169.254", "fe80::1",
                "fe80::1%eth0", "224.0.0.1", "ff02::1", "::ffff:127.0.0.1", "10.0.0.256",
                "010.0.0.1", "1.2.3", "10.96.0.10/32", "TCP", "tcp", "SCTP", "ICMP", "IPv4",
                "IPv6", "FQDN", "ClusterIP", "NodePort", "LoadBalancer", "ExternalName",
                "Local", "Cluster", "ClientIP", "VIP", "Proxy", "http", "dns", "true",
                "65536", "-1", "x" * 300, "１０.０.０.１", "\x00", "\udcff"]
SPECIAL_INT = [0, -1, 1, 65535, 65536, 30000, 86400, 86401, 2**31, 2**63, -(2**63), 10**40]


def deep_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def deep_dict(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(SPECIAL_INT),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(SPECIAL_TEXT), st.binary(max_size=6), st.dates(), st.datetimes(),
    st.frozensets(st.integers(), max_size=3))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.text(max_size=6), st.integers(),
                                                      st.none(), st.booleans()),
                                            inner, max_size=4)),
    max_leaves=12)
huge = st.sampled_from(["deep list", "deep dict", "huge list", "huge dict", "huge string",
                        "huge list of mappings"])


def build_huge(kind: str) -> Any:
    return {"deep list": lambda: deep_list(20_000), "deep dict": lambda: deep_dict(20_000),
            "huge list": lambda: ["10.244.1.5"] * 200_000,
            "huge dict": lambda: {f"k{i}": i for i in range(100_000)},
            "huge string": lambda: "1" * 1_000_000,
            "huge list of mappings": lambda: [{"addresses": ["10.244.1.7"], "port": 80,
                                               "name": "n"}] * 50_000}[kind]()


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Places in a JSON-like value (mapping keys and list indexes, the root excluded), as
    deep as an object's own fields go: not into the huge values put there earlier."""
    found: list[tuple] = []
    if len(prefix) > 8:
        return found
    if isinstance(value, dict):
        for key, child in list(value.items())[:20]:
            found.append((*prefix, key))
            found += paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value[:4]):
            found.append((*prefix, i))
            found += paths(child, (*prefix, i))
    return found


def mutate(obj: Any, path: tuple, action: str, value: Any) -> None:
    parent = obj
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif action == "duplicate" and isinstance(parent, list):
        parent.append(parent[last])     # the same object twice, as a YAML alias gives
    elif action == "add key" and isinstance(parent[last], dict):
        parent[last][value if isinstance(value, (str, int, bool, type(None))) else "x"] = value
    else:
        parent[last] = value


@st.composite
def mutated(draw, templates: list[dict], huge_values: bool = True) -> dict:
    """A template with one to three mutations; huge_values: some are huge or deep."""
    obj = copy.deepcopy(draw(st.sampled_from(templates)))
    for _ in range(draw(st.integers(1, 3))):
        places = paths(obj)
        if not places:
            break
        path = draw(st.sampled_from(places))
        action = draw(st.sampled_from(["replace", "replace", "delete", "duplicate", "add key",
                                       *(["huge"] if huge_values else [])]))
        value = build_huge(draw(huge)) if action == "huge" else draw(values)
        try:
            mutate(obj, path, "replace" if action == "huge" else action, value)
        except (KeyError, IndexError, TypeError):
            pass    # the path went away with an earlier mutation
    return obj


def parse_or_invalid(raw: Any):
    """parse_object's only allowed failure is InvalidObject; None when it raised that."""
    try:
        return parse_object(raw)
    except InvalidObject as error:
        assert str(error), "an InvalidObject names the object and the field"
        return None


# Special addresses the API server refuses for endpoints and external IPs
# (validation.go ValidateNonSpecialIP): the socket LB must never send a pod's connection
# to its own loopback, to 0.0.0.0 or to a link-local (metadata) address.
def special(address) -> bool:
    address = getattr(address, "ipv4_mapped", None) or address
    return (address.is_unspecified or address.is_loopback or address.is_link_local
            or address in ipaddress.ip_network("224.0.0.0/24")
            or address in ipaddress.ip_network("ff02::/16"))


def check_in_range(desired: dict) -> None:
    for (name, family), state in desired.items():
        assert family in (4, 6) and state.family == family
        assert isinstance(name.protocol, Protocol)
        assert 0 <= state.session_affinity_timeout <= 86400
        for frontend in state.frontends:
            assert frontend.address.version == family, frontend
            assert 1 <= frontend.port <= 65535, frontend
            assert frontend.protocol is name.protocol
            assert isinstance(frontend.kind, FrontendKind)
            assert not getattr(frontend.address, "scope_id", None), frontend
            if frontend.kind is FrontendKind.EXTERNAL_IP:
                assert not special(frontend.address), frontend
        assert len(set(state.frontends)) == len(state.frontends)
        for backends in (state.backends, state.external_backends, state.outside_backends):
            assert len({(b.address, b.port) for b in backends}) == len(backends)
            for backend in backends:
                assert backend.address.version == family, backend
                assert 1 <= backend.port <= 65535, backend
                assert isinstance(backend.state, BackendState)
                assert not getattr(backend.address, "scope_id", None), backend
                assert not special(backend.address), backend


def check_world(services: list, slices: list, nodes: list) -> None:
    node = NodeContext.from_node(nodes[0] if nodes else None, "node-a")
    desired = desired_state(services, slices, node)
    check_in_range(desired)
    planned = plan(by_scope(desired), {})
    assert all(len(s.backends) < 2**32 for s in planned.result.values())


def test_the_templates_are_valid_and_serve_something():
    services = [parse_object(s) for s in SERVICES]
    slices = [parse_object(s) for s in SLICES]
    desired = desired_state(services, slices, NodeContext.from_node(parse_object(NODE)))
    assert len(desired) >= 8 and any(state.backends for state in desired.values())
    check_in_range(desired)


@SETTINGS
@given(mutated(SERVICES + SLICES + [NODE]))
def test_a_mutated_object_is_parsed_or_invalid_and_served_in_range(raw):
    obj = parse_or_invalid(raw)
    object_key(raw)        # never raises, whatever it is given
    if obj is None:
        return
    assert isinstance(obj, (Service, EndpointSlice, Node))
    services = [obj] if isinstance(obj, Service) else [parse_object(s) for s in SERVICES]
    slices = [obj] if isinstance(obj, EndpointSlice) else [parse_object(s) for s in SLICES]
    nodes = [obj] if isinstance(obj, Node) else [parse_object(NODE)]
    check_world(services, slices, nodes)


@SETTINGS
@given(st.lists(mutated(SERVICES), min_size=1, max_size=3),
       st.lists(mutated(SLICES), min_size=1, max_size=3), mutated([NODE]))
def test_worlds_of_mutated_objects_stay_in_range(raw_services, raw_slices, raw_node):
    services = [s for s in map(parse_or_invalid, raw_services) if isinstance(s, Service)]
    slices = [s for s in map(parse_or_invalid, raw_slices) if isinstance(s, EndpointSlice)]
    node = parse_or_invalid(raw_node)
    check_world(services, slices, [node] if isinstance(node, Node) else [])


ADDRESS_FIELDS = {"clusterIP", "clusterIPs", "externalIPs", "addresses", "ip", "address"}
SPECIAL_ADDRESSES = ["0.0.0.0", "::", "127.0.0.1", "127.1.2.3", "::1", "169.254.169.254",
                     "fe80::1", "224.0.0.1", "ff02::1", "::ffff:127.0.0.1", "::ffff:0.0.0.0"]
address_values = st.one_of(st.sampled_from(SPECIAL_ADDRESSES), st.sampled_from(SPECIAL_TEXT),
                           st.ip_addresses().map(str), values)


@st.composite
def address_mutated(draw) -> dict:
    """An address field (or one entry of an address list) of a valid object replaced."""
    obj = copy.deepcopy(draw(st.sampled_from(SERVICES + SLICES + [NODE])))
    places = [p for p in paths(obj) if p[-1] in ADDRESS_FIELDS or
              (len(p) > 1 and isinstance(p[-1], int) and p[-2] in ADDRESS_FIELDS)]
    for _ in range(draw(st.integers(1, 2))):
        try:
            mutate(obj, draw(st.sampled_from(places)), "replace", draw(address_values))
        except (KeyError, IndexError, TypeError):
            pass    # an earlier replacement took the list away
    return obj


@SETTINGS
@given(address_mutated())
def test_address_fields_take_only_addresses_a_proxy_may_use(raw):
    obj = parse_or_invalid(raw)
    if obj is None:
        return
    services = [obj] if isinstance(obj, Service) else [parse_object(s) for s in SERVICES]
    slices = [obj] if isinstance(obj, EndpointSlice) else [parse_object(s) for s in SLICES]
    nodes = [obj] if isinstance(obj, Node) else [parse_object(NODE)]
    check_world(services, slices, nodes)


@SETTINGS
@given(values)
def test_any_value_at_all_is_parsed_or_invalid(raw):
    assert parse_or_invalid(raw) is None or isinstance(raw, dict)
    object_key(raw)


@pytest.mark.parametrize("field,address", [
    (("endpoints", 0, "addresses", 0), "127.0.0.1"),
    (("endpoints", 0, "addresses", 0), "0.0.0.0"),
    (("endpoints", 0, "addresses", 0), "169.254.169.254"),
    (("endpoints", 0, "addresses", 0), "224.0.0.5"),
])
def test_special_endpoint_addresses_are_invalid(field, address):
    """Found by the fuzzing above: the API server refuses these (ValidateNonSpecialIP)."""
    raw = endpoint_slice()
    mutate(raw, field, "replace", address)
    with pytest.raises(InvalidObject, match="endpoints\\[0\\].addresses\\[0\\]"):
        parse_object(raw)


@pytest.mark.parametrize("address", ["::1", "::", "fe80::5", "ff02::2", "::ffff:127.0.0.1"])
def test_special_ipv6_endpoint_addresses_are_invalid(address):
    raw = endpoint_slice("IPv6", ("fd00:10:244:1::5",))
    raw["endpoints"][0]["addresses"] = [address]
    with pytest.raises(InvalidObject, match="endpoints\\[0\\].addresses\\[0\\]"):
        parse_object(raw)


def test_yaml_only_types_are_invalid_not_crashes():
    for value in (datetime.date(2024, 1, 1), b"\x00\x01", frozenset({1}), float("nan")):
        raw = service()
        raw["spec"]["ports"][0]["port"] = value
        with pytest.raises(InvalidObject, match=r"spec.ports\[0\].port"):
            parse_object(raw)
