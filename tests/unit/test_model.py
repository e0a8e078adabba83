"""The pure model against kube-proxy's semantics: desired_state() from Services and
EndpointSlices, table by table, and what it ignores on purpose. The other model tests:
test_model_packet_flows (kube-proxy's packet flow tests), test_model_service (frontends,
source ranges, node ports), test_model_topology (traffic policies and hints),
test_model_random_objects (properties); test_objects, test_topology, test_model_health."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest

from agent.model import desired_state
from agent.model.types import (
    HEADLESS_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Protocol,
    Service,
    ServicePort,
)
from tests.helpers import (
    at,
    fake_node,
    frontends,
    ip,
    make_service,
    make_slice,
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


# --- ignored on purpose ---------------------------------------------------------------------

def test_services_labelled_for_another_proxy_are_ignored():   # server.go label selector
    spec = {"clusterIP": "172.30.0.41", "ports": [{"name": "p80", "port": 80}]}
    services = [make_service("ns", "other", spec, labels={SERVICE_PROXY_NAME_LABEL: "cilium"}),
                make_service("ns", "empty", spec, labels={SERVICE_PROXY_NAME_LABEL: ""}),
                make_service("ns", "headless-label", spec, labels={HEADLESS_LABEL: ""})]
    assert desired_state(services, [], fake_node()) == {}


def test_slices_labelled_headless_are_ignored():   # server.go label selector
    service = make_service("ns", "web", {"clusterIP": "172.30.0.41",
                                         "ports": [{"name": "p80", "port": 80}]})
    labelled = make_slice("ns", "web", [at("10.0.0.1")], labels={HEADLESS_LABEL: ""})
    proxied = make_slice("ns", "web", [at("10.0.0.2")])
    (sps,) = desired_state([service], [labelled], fake_node()).values()
    assert sps.backends == () and not sps.has_any_endpoints
    (sps,) = desired_state([service], [proxied], fake_node()).values()
    assert [str(b.address) for b in sps.backends] == ["10.0.0.2"]


def test_endpoints_of_a_family_the_service_has_no_cluster_ip_for_are_ignored():
    service = make_service("ns", "web", {"clusterIP": "172.30.0.41", "externalIPs": [
        "2001:db8::99"], "ports": [{"name": "p80", "port": 80}]})
    state = desired_state([service], [make_slice("ns", "web", [at("fd00::1")],
                                                 address_type="IPv6")], fake_node())
    assert list(frontends(state)) == ["ns/web:p80/TCP v4"]
    assert [sps.backends for sps in state.values()] == [()]


def test_dual_stack_load_balancer_keeps_each_family_apart():
    service = make_service("ns", "web", {
        "type": "LoadBalancer", "clusterIPs": ["172.30.0.41", "fd00:172:30::41"],
        "ipFamilies": ["IPv4", "IPv6"], "externalIPs": ["192.168.99.11", "2001:db8::99"],
        "sessionAffinity": "ClientIP",
        "ports": [{"name": "p80", "port": 80, "nodePort": 30080}]},
        ingress=["1.2.3.4", "2001:db8::1:4"])
    v6_slice = EndpointSlice("ns", "web-v6", "web", "IPv6",
                             (EndpointPort("p80", Protocol.TCP, 80),),
                             (Endpoint((ip("fd00::1"),), True, True, False),))
    state = desired_state([service], [make_slice("ns", "web", [at("10.0.0.1")]), v6_slice],
                          fake_node())
    assert frontends(state) == {
        "ns/web:p80/TCP v4": ["LoadBalancer 1.2.3.4:80", "ClusterIP 172.30.0.41:80",
                              "NodePort 192.168.0.2:30080", "ExternalIP 192.168.99.11:80"],
        "ns/web:p80/TCP v6": ["NodePort [2001:db8::1]:30080",
                              "ExternalIP [2001:db8::99]:80",
                              "LoadBalancer [2001:db8::1:4]:80",
                              "ClusterIP [fd00:172:30::41]:80"]}
    for (_, family), sps in state.items():
        assert [b.address.version for b in sps.backends + sps.external_backends +
                sps.outside_backends] == [family] * 3
        assert sps.session_affinity_timeout == 10800
