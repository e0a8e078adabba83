"""The pure model against kube-proxy's semantics: ClusterIP frontends per service port and
family, backends from matching EndpointSlices, ready first and serving-terminating fallback."""
from __future__ import annotations

import copy
import functools
import ipaddress
import operator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model import desired_state
from agent.model.objects import parse_object
from agent.model.types import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    InvalidObject,
    Protocol,
    Service,
    ServicePort,
)


def service(name="web", ips=("10.96.0.10",), ports=(("", "TCP", 80, 8080),),
            type="ClusterIP", namespace="default", headless=False) -> Service:
    return Service(namespace, name, type, tuple(ipaddress.ip_address(a) for a in ips),
                   tuple(ServicePort(n, Protocol[p], port, target)
                         for n, p, port, target in ports), headless)


def ep(address, ready=True, serving=None, terminating=False, node="", zone="") -> Endpoint:
    return Endpoint((ipaddress.ip_address(address),), ready,
                    True if serving is None else serving, terminating, node, zone)


def eps(name="web-1", service="web", ports=(("", "TCP", 8080),), endpoints=(),
        address_type="IPv4", namespace="default") -> EndpointSlice:
    return EndpointSlice(namespace, name, service, address_type,
                         tuple(EndpointPort(n, Protocol[p], port) for n, p, port in ports),
                         tuple(endpoints))


def summary(state) -> dict[str, tuple[list[str], list[str]]]:
    """{"default/web:http/TCP v4": (frontends, backends)}, backends "addr:port[ state]"."""
    out = {}
    for (name, family), sps in state.items():
        assert (sps.name, sps.family) == (name, family)
        frontends = [f"{f.address}:{f.port}/{f.protocol.value}" for f in sps.frontends]
        backends = [f"{b.address}:{b.port}" + ("" if b.state.value == "ready" else
                                               f" {b.state.value}") for b in sps.backends]
        out[f"{name} v{family}"] = (frontends, backends)
    return out


@dataclass
class Case:
    name: str
    services: list[Service]
    slices: list[EndpointSlice]
    want: dict[str, tuple[list[str], list[str]]]


WEB = "default/web/TCP v4"
WEB_FRONTEND = ["10.96.0.10:80/TCP"]

CASES = [
    Case("single port",
         [service()], [eps(endpoints=[ep("10.1.0.1"), ep("10.1.0.2")])],
         {WEB: (WEB_FRONTEND, ["10.1.0.1:8080", "10.1.0.2:8080"])}),
    Case("multi-port: endpoint ports matched by port name",
         [service(ports=[("http", "TCP", 80, 8080), ("https", "TCP", 443, 8443)])],
         [eps(ports=[("https", "TCP", 9443), ("http", "TCP", 9080)],
              endpoints=[ep("10.1.0.1")])],
         {"default/web:http/TCP v4": (["10.96.0.10:80/TCP"], ["10.1.0.1:9080"]),
          "default/web:https/TCP v4": (["10.96.0.10:443/TCP"], ["10.1.0.1:9443"])}),
    Case("TCP and UDP on the same port number",
         [service(name="dns", ports=[("dns", "UDP", 53, 53), ("dns-tcp", "TCP", 53, 53)])],
         [eps(service="dns", ports=[("dns", "UDP", 5353), ("dns-tcp", "TCP", 5354)],
              endpoints=[ep("10.1.0.1")])],
         {"default/dns:dns/UDP v4": (["10.96.0.10:53/UDP"], ["10.1.0.1:5353"]),
          "default/dns:dns-tcp/TCP v4": (["10.96.0.10:53/TCP"], ["10.1.0.1:5354"])}),
    Case("slice port with the right name but another protocol is not used",
         [service(ports=[("dns", "UDP", 53, 53)])],
         [eps(ports=[("dns", "TCP", 53)], endpoints=[ep("10.1.0.1")])],
         {"default/web:dns/UDP v4": (["10.96.0.10:53/UDP"], [])}),
    Case("named targetPort resolved via the slice port of the same name",
         [service(ports=[("http", "TCP", 80, "web")])],
         [eps(ports=[("http", "TCP", 8080)], endpoints=[ep("10.1.0.1")]),
          eps(name="web-2", ports=[("http", "TCP", 8081)], endpoints=[ep("10.1.0.2")])],
         {"default/web:http/TCP v4": (WEB_FRONTEND, ["10.1.0.1:8080", "10.1.0.2:8081"])}),
    Case("unnamed slice port does not match a named service port",
         [service(ports=[("http", "TCP", 80, 8080)])],
         [eps(ports=[("", "TCP", 8080)], endpoints=[ep("10.1.0.1")])],
         {"default/web:http/TCP v4": (WEB_FRONTEND, [])}),
    Case("endpoints from several slices merged and de-duplicated",
         [service()],
         [eps(name="web-a", endpoints=[ep("10.1.0.1"), ep("10.1.0.2")]),
          eps(name="web-b", endpoints=[ep("10.1.0.2"), ep("10.1.0.3")])],
         {WEB: (WEB_FRONTEND, ["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"])}),
    Case("same address, different ports across slices: both kept",
         [service()],
         [eps(name="web-a", endpoints=[ep("10.1.0.1")]),
          eps(name="web-b", ports=[("", "TCP", 9090)], endpoints=[ep("10.1.0.1")])],
         {WEB: (WEB_FRONTEND, ["10.1.0.1:8080", "10.1.0.1:9090"])}),
    Case("duplicate endpoint: the non-terminating copy wins",   # endpointslicecache.go
         [service()],
         [eps(name="web-a", endpoints=[ep("10.1.0.1", ready=False, serving=True,
                                          terminating=True)]),
          eps(name="web-b", endpoints=[ep("10.1.0.1")])],
         {WEB: (WEB_FRONTEND, ["10.1.0.1:8080"])}),
    Case("not ready excluded",
         [service()], [eps(endpoints=[ep("10.1.0.1"), ep("10.1.0.2", ready=False)])],
         {WEB: (WEB_FRONTEND, ["10.1.0.1:8080"])}),
    Case("terminating endpoints unused while any is ready",   # topology.go
         [service()],
         [eps(endpoints=[ep("10.1.0.1"),
                         ep("10.1.0.2", ready=False, serving=True, terminating=True)])],
         {WEB: (WEB_FRONTEND, ["10.1.0.1:8080"])}),
    Case("terminating fallback when none ready",   # topology.go: CategorizeEndpoints
         [service()],
         [eps(endpoints=[ep("10.1.0.1", ready=False, serving=True, terminating=True),
                         ep("10.1.0.2", ready=False)])],
         {WEB: (WEB_FRONTEND, ["10.1.0.1:8080 terminating"])}),
    Case("serving unset on a terminating endpoint counts as serving",  # endpointslicecache.go
         [service()],
         [eps(endpoints=[ep("10.1.0.1", ready=False, terminating=True)])],
         {WEB: (WEB_FRONTEND, ["10.1.0.1:8080 terminating"])}),
    Case("slice port named after the container port, not the service port: no match",
         # the EndpointSlice controller names slice ports after *service* ports; the
         # targetPort name ("web") is resolved by it, never by the proxy
         [service(ports=[("http", "TCP", 80, "web")])],
         [eps(ports=[("web", "TCP", 8080)], endpoints=[ep("10.1.0.1")])],
         {"default/web:http/TCP v4": (WEB_FRONTEND, [])}),
    Case("never terminating and not serving",
         [service()],
         [eps(endpoints=[ep("10.1.0.1", ready=False, serving=False, terminating=True)])],
         {WEB: (WEB_FRONTEND, [])}),
    Case("serving but not terminating is no fallback",
         [service()],
         [eps(endpoints=[ep("10.1.0.1", ready=False, serving=True, terminating=False)])],
         {WEB: (WEB_FRONTEND, [])}),
    Case("headless ignored",
         [service(ips=(), headless=True)], [eps(endpoints=[ep("10.1.0.1")])], {}),
    Case("ExternalName ignored",
         [service(ips=(), type="ExternalName")], [eps(endpoints=[ep("10.1.0.1")])], {}),
    Case("slice of another service ignored",
         [service()], [eps(service="api", endpoints=[ep("10.1.0.1")])],
         {WEB: (WEB_FRONTEND, [])}),
    Case("slice of the same name in another namespace ignored",
         [service()], [eps(namespace="shop", endpoints=[ep("10.1.0.1")])],
         {WEB: (WEB_FRONTEND, [])}),
    Case("IPv6 slice not used for an IPv4 cluster IP",
         [service()], [eps(address_type="IPv6", endpoints=[ep("fd00::1")])],
         {WEB: (WEB_FRONTEND, [])}),
    Case("FQDN slice not used",
         [service()], [eps(address_type="FQDN")], {WEB: (WEB_FRONTEND, [])}),
    Case("dual-stack gives one state per family",
         [service(ips=("fd00::10", "10.96.0.10"))],
         [eps(name="web-v4", endpoints=[ep("10.1.0.1")]),
          eps(name="web-v6", address_type="IPv6", endpoints=[ep("fd00::1")])],
         {WEB: (WEB_FRONTEND, ["10.1.0.1:8080"]),
          "default/web/TCP v6": (["fd00::10:80/TCP"], ["fd00::1:8080"])}),
    Case("no endpoints: a state with empty backends, so the datapath rejects",
         [service()], [], {WEB: (WEB_FRONTEND, [])}),
    Case("NodePort and LoadBalancer have a ClusterIP frontend",
         [service(name="np", type="NodePort"), service(name="lb", type="LoadBalancer",
                                                       ips=("10.96.0.11",))],
         [],
         {"default/np/TCP v4": (WEB_FRONTEND, []),
          "default/lb/TCP v4": (["10.96.0.11:80/TCP"], [])}),
    Case("backends sorted by address value, not text",
         [service()], [eps(endpoints=[ep("10.1.0.10"), ep("10.1.0.9"), ep("10.1.0.100")])],
         {WEB: (WEB_FRONTEND, ["10.1.0.9:8080", "10.1.0.10:8080", "10.1.0.100:8080"])}),
    Case("a slice without a port number serves nothing",
         [service()], [eps(ports=[], endpoints=[ep("10.1.0.1")])],
         {WEB: (WEB_FRONTEND, [])}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_desired_state(case):
    assert summary(desired_state(case.services, case.slices)) == case.want


def test_backends_carry_node_and_zone():
    state = desired_state([service()], [eps(endpoints=[ep("10.1.0.1", node="n1", zone="z")])])
    (sps,) = state.values()
    assert [(b.node_name, b.zone) for b in sps.backends] == [("n1", "z")]


def test_only_the_first_endpoint_address_is_used():   # endpointslicecache.go addEndpoints
    endpoint = Endpoint(tuple(map(ipaddress.ip_address, ["10.1.0.1", "10.1.0.2"])),
                        True, True, False)
    (sps,) = desired_state([service()], [eps(endpoints=[endpoint])]).values()
    assert [str(b.address) for b in sps.backends] == ["10.1.0.1"]


def test_inputs_may_be_generators():
    state = desired_state((s for s in [service()]), (s for s in [eps(endpoints=[ep("10.1.0.1")])]))
    assert summary(state) == {WEB: (WEB_FRONTEND, ["10.1.0.1:8080"])}


# --- property: random, partly broken objects never break the model ----------------------

junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=4),
                 st.floats(), st.lists(st.integers(), max_size=2),
                 st.sampled_from(["None", "", "10.1.0.300", "fd00::1", "10.1.0.1", "UDP"]),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
ADDRESSES = {"IPv4": ["10.96.0.1", "10.1.0.1", "10.1.0.2", "10.1.0.3"],
             "IPv6": ["fd00::1", "fd00::2", "::ffff:10.1.0.1"]}


def _paths(value, prefix=()):
    yield prefix
    children = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from _paths(child, (*prefix, key))


@st.composite
def corrupted(draw, value):
    """value with up to two fields deleted or replaced by junk; mostly left intact."""
    value = copy.deepcopy(value)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        *parents, last = draw(st.sampled_from(list(_paths(value))[1:]))
        parent = functools.reduce(operator.getitem, parents, value)
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[last]
        else:
            parent[last] = draw(junk)
    return value


@st.composite
def service_dicts(draw):
    families = draw(st.sampled_from([["IPv4"], ["IPv6"], ["IPv4", "IPv6"], ["IPv6", "IPv4"],
                                     ["None"]]))
    ips = [f if f == "None" else draw(st.sampled_from(ADDRESSES[f])) for f in families]
    count = draw(st.integers(1, 3))
    port_names = draw(st.permutations(["http", "dns", "metrics"]))[:count]
    if count == 1:
        port_names = [draw(st.sampled_from(["", "http"]))]
    ports = [{"name": name, "protocol": draw(st.sampled_from(["TCP", "UDP", "SCTP"])),
              "port": draw(st.sampled_from([53, 80, 443, 65535])),
              "targetPort": draw(st.one_of(st.integers(1, 65535), st.just("http")))}
             for name in port_names]
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": draw(st.sampled_from(["web", "dns"])),
                         "namespace": draw(st.sampled_from(["default", "shop"]))},
            "spec": {"type": draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer",
                                                   "ExternalName"])),
                     "clusterIP": ips[0], "clusterIPs": ips, "ports": ports}}


TERMINATING = {"ready": False, "serving": True, "terminating": True}
CONDITIONS = st.one_of(st.sampled_from([{}, {"ready": False}, TERMINATING, TERMINATING,
                                        {"ready": False, "serving": False, "terminating": True}]),
                       st.fixed_dictionaries({}, optional={
                           key: st.booleans() for key in ("ready", "serving", "terminating")}))


@st.composite
def slice_dicts_for(draw, service: dict, index: int):
    """A slice that mostly fits the service: its name, port names, protocols and families."""
    meta, spec = service["metadata"], service["spec"]
    own = [f for f in spec["clusterIPs"] if f != "None"]
    own = ["IPv6" if ":" in ip else "IPv4" for ip in own]
    family = draw(st.sampled_from(own * 4 + ["IPv4", "IPv6", "FQDN"]))
    ports = [{"name": p["name"],
              "protocol": draw(st.sampled_from([p["protocol"]] * 4 + ["TCP", "UDP"])),
              "port": draw(st.sampled_from([None] + [p["port"], 8080, 1, 65535] * 3))}
             for p in spec["ports"] if draw(st.integers(0, 4))]
    endpoints = [{"addresses": [draw(st.sampled_from(ADDRESSES.get(family, ["db.local"])))],
                  "conditions": draw(CONDITIONS),
                  "nodeName": "n1"}
                 for _ in range(draw(st.integers(1, 4)))]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{meta['name']}-{index}", "namespace": meta["namespace"],
                         "labels": {"kubernetes.io/service-name": meta["name"]}},
            "addressType": family, "ports": ports, "endpoints": endpoints}


@st.composite
def worlds(draw):
    """Raw services and slices that mostly belong together, some fields broken."""
    services = draw(st.lists(service_dicts(), min_size=1, max_size=3))
    slices = [draw(slice_dicts_for(service, i))
              for service in services for i in range(draw(st.integers(0, 3)))]
    return ([draw(corrupted(raw)) for raw in services],
            [draw(corrupted(raw)) for raw in slices])


def parsed(raw_objects):
    out = []
    for raw in raw_objects:
        try:
            obj = parse_object(raw)
        except InvalidObject:
            continue
        if obj is not None:
            out.append(obj)
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_random_objects_never_break_the_model(world):
    raw_services, raw_slices = world
    services = parsed(raw_services)
    slices = parsed(raw_slices)
    assert all(isinstance(s, Service) for s in services)
    assert all(isinstance(s, EndpointSlice) for s in slices)
    for (name, family), sps in desired_state(services, slices).items():
        assert family in (4, 6) and sps.family == family and sps.name == name
        assert sps.frontends, name
        for frontend in sps.frontends:
            assert frontend.address.version == family
            assert 1 <= frontend.port <= 65535
            assert frontend.protocol == name.protocol
        for backend in sps.backends:
            assert backend.address.version == family
            assert 1 <= backend.port <= 65535
        states = {b.state for b in sps.backends}
        assert len(states) <= 1, "terminating backends only when none is ready"
        keys = [(b.address, b.port) for b in sps.backends]
        assert len(keys) == len(set(keys)), "backends de-duplicated"
        assert list(sps.backends) == sorted(sps.backends, key=lambda b: b.sort_key())


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                               max_size=3),
    max_leaves=20)
kinds = st.sampled_from([("v1", "Service"), ("discovery.k8s.io/v1", "EndpointSlice")])


@settings(max_examples=300, deadline=None)
@given(kinds, st.dictionaries(st.sampled_from(["metadata", "spec", "ports", "endpoints",
                                               "addressType"]), json_values))
def test_arbitrary_json_raises_only_invalid_object(kind, body):
    raw = {"apiVersion": kind[0], "kind": kind[1], **body}
    try:
        parse_object(raw)
    except InvalidObject:
        pass
