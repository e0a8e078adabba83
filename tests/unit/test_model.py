"""The pure model against kube-proxy's semantics: every frontend of a service port, and the
backends each kind of traffic gets. Tables mirror kube-proxy's own tests, case by case."""
from __future__ import annotations

import copy
import functools
import ipaddress
import operator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model import NodeContext, desired_state
from agent.model.objects import parse_endpoint_slice, parse_node, parse_object, parse_service
from agent.model.types import (
    HEADLESS_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    FrontendKind,
    InvalidObject,
    Node,
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




# --- kube-proxy's packet flow tests, run against the model --------------------------------
# pkg/proxy/nftables/proxier_test.go sends packets from a pod, the node or an outside client
# through the rules and reports which endpoints they can reach. Here the same question goes
# to the desired state: the frontend the packet hits, and backends_for(kind, from_outside).
# Names, addresses and expected outputs are kube-proxy's (NewFakeProxier's conventions).

TEST_NODE_NAME = "test-node"
TEST_NODE_IP, TEST_NODE_IP_ALT, TEST_EXTERNAL_IP = "192.168.0.2", "192.168.1.2", "192.168.99.11"
TEST_NODE_IPV6, TEST_NODE_IPV6_ALT = "2001:db8::1", "2001:db8:1::2"
TEST_NODE_IPS = [TEST_NODE_IP, TEST_NODE_IP_ALT, TEST_EXTERNAL_IP, TEST_NODE_IPV6,
                 TEST_NODE_IPV6_ALT]
TEST_EXTERNAL_CLIENT, TEST_EXTERNAL_CLIENT_BLOCKED = "203.0.113.2", "203.0.113.130"
OUTSIDE_CLIENTS = {TEST_EXTERNAL_CLIENT, TEST_EXTERNAL_CLIENT_BLOCKED, "2600:5200::1"}
ip = ipaddress.ip_address


def fake_node(node_port_addresses=(f"{TEST_NODE_IP}/32", f"{TEST_NODE_IPV6}/128")
              ) -> NodeContext:
    """NewFakeProxier's node: test-node with all of testNodeIPs; NodePorts on the primary
    IPs only (its nodePortAddresses)."""
    return NodeContext(TEST_NODE_NAME, tuple(map(ip, TEST_NODE_IPS)),
                       tuple(map(ipaddress.ip_network, node_port_addresses)))


def make_service(ns: str, name: str, spec: dict, ingress=(), labels=None) -> Service:
    """makeTestService, through the border like a real object."""
    raw = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"namespace": ns, "name": name, **({"labels": labels} if labels else {})},
           "spec": spec}
    if ingress:
        raw["status"] = {"loadBalancer": {"ingress": [
            i if isinstance(i, dict) else {"ip": i} for i in ingress]}}
    return parse_service(raw)


def make_slice(ns: str, service_name: str, endpoints: list[dict],
               ports=(("p80", 80, "TCP"),), address_type="IPv4", labels=None) -> EndpointSlice:
    """makeTestEndpointSlice(ns, name, 1, ...)."""
    return parse_endpoint_slice({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": f"{service_name}-1",
                     "labels": {"kubernetes.io/service-name": service_name, **(labels or {})}},
        "addressType": address_type,
        "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
        "endpoints": endpoints})


def at(address: str, node: str | None = None, **conditions) -> dict:
    """One discovery.Endpoint: addresses, nodeName (when given), conditions (when given)."""
    return {"addresses": [address], **({"nodeName": node} if node else {}),
            **({"conditions": conditions} if conditions else {})}


def join_host_port(address, port) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def flow(state, source: str, dest: str, port: int, protocol: str = "TCP") -> str:
    """runPacketFlowTests' output: "ip:port, ..." of the reachable endpoints, "REJECT" or
    "DROP" for a service frontend without any, "" when no frontend matches."""
    for sps in state.values():
        for frontend in sps.frontends:
            if (frontend.address, frontend.port, frontend.protocol.value) == \
                    (ip(dest), port, protocol):
                if frontend.kind is FrontendKind.LOAD_BALANCER and sps.source_ranges and \
                        not any(ip(source) in r for r in sps.source_ranges):
                    return "DROP"     # the firewall, before any endpoint is chosen
                backends = sps.backends_for(frontend.kind, source in OUTSIDE_CLIENTS)
                if not backends:
                    return "DROP" if sps.has_any_endpoints else "REJECT"
                return ", ".join(join_host_port(b.address, b.port) for b in backends)
    return ""


@dataclass
class Flow:
    test: str                     # the Go test (and subtest) the flow belongs to
    name: str                     # the packetFlowTest's name
    source: str
    dest: str
    port: int
    output: str
    protocol: str = "TCP"


def no_endpoints_reject():
    return desired_state([make_service("ns1", "svc1", {
        "type": "LoadBalancer", "clusterIP": "172.30.0.41", "externalIPs": ["192.168.99.11"],
        "ports": [{"name": "p80", "protocol": "TCP", "port": 80, "nodePort": 3001}]},
        ingress=["1.2.3.4"])], [], fake_node())


def cluster_ip_general():
    ports = [("http", 80, "TCP"), ("https", 8443, "TCP"), ("dns-udp", 53, "UDP"),
             ("dns-tcp", 5353, "TCP"), ("dns-sctp", 53, "SCTP")]
    return desired_state(
        [make_service("ns1", "svc1", {"clusterIP": "172.30.0.41",
                                      "ports": [{"name": "http", "port": 80}]}),
         make_service("ns2", "svc2", {"clusterIP": "172.30.0.42", "ports": [
             {"name": "http", "port": 80, "protocol": "TCP"},
             {"name": "https", "port": 443, "protocol": "TCP", "targetPort": 8443},
             {"name": "dns-udp", "port": 53, "protocol": "UDP"},
             {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 5353},
             {"name": "dns-sctp", "port": 53, "protocol": "SCTP"}]})],
        [make_slice("ns1", "svc1", [at("10.180.0.1", TEST_NODE_NAME)], [("http", 80, "TCP")]),
         make_slice("ns2", "svc2", [at("10.180.0.1", TEST_NODE_NAME), at("10.180.2.1", "node2")],
                    ports)],
        fake_node())


def load_balancer():
    return desired_state(
        [make_service("ns1", "svc1", {
            "type": "LoadBalancer", "clusterIP": "172.30.0.41",
            "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3001}],
            "loadBalancerSourceRanges": ["192.168.0.0/24", " 203.0.113.0/25"]},
            ingress=["1.2.3.4", "5.6.7.8"])],
        [make_slice("ns1", "svc1", [at("10.180.0.1")])], fake_node())


def node_ports(family: int, node_port_addresses):
    svc_ip, ep1, ep2 = ("172.30.0.41", "10.180.0.1", "10.180.2.1") if family == 4 else \
        ("fd00:172:30::41", "fd00:10:180::1", "fd00:10:180::2:1")
    node = fake_node(node_port_addresses) if node_port_addresses else fake_node()
    return desired_state(
        [make_service("ns1", "svc1", {"type": "NodePort", "clusterIP": svc_ip, "ports": [
            {"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3001}]})],
        [make_slice("ns1", "svc1", [at(ep1), at(ep2, TEST_NODE_NAME)],
                    address_type=f"IPv{family}")], node)


def external_traffic_policy(policy: str):
    spec = {"type": "LoadBalancer", "externalTrafficPolicy": policy, "clusterIP": "172.30.0.41",
            "externalIPs": ["192.168.99.11"],
            "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3001,
                       "targetPort": 80}]}
    return desired_state(
        [make_service("ns1", "svc1", spec, ingress=["1.2.3.4"])],
        [make_slice("ns1", "svc1", [at("10.180.0.1"), at("10.180.2.1", TEST_NODE_NAME)])],
        fake_node())


def internal_external_masquerade():
    def lb(ns, name, cluster_ip, node_port, lb_ip, **policies):
        return make_service(ns, name, {
            "type": "LoadBalancer", "clusterIP": cluster_ip, **policies,
            "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": node_port}]},
            ingress=[lb_ip])

    return desired_state(
        [lb("ns1", "svc1", "172.30.0.41", 3001, "1.2.3.4"),
         lb("ns2", "svc2", "172.30.0.42", 3002, "5.6.7.8", externalTrafficPolicy="Local"),
         lb("ns3", "svc3", "172.30.0.43", 3003, "9.10.11.12", internalTrafficPolicy="Local")],
        [make_slice(f"ns{i}", f"svc{i}", [at(f"10.180.0.{i}", TEST_NODE_NAME),
                                          at(f"10.180.1.{i}", "remote")])
         for i in (1, 2, 3)],
        fake_node())


SETUPS = {
    "TestNoEndpointsReject": no_endpoints_reject,
    "TestClusterIPGeneral": cluster_ip_general,
    "TestLoadBalancer": load_balancer,
    "TestNodePorts/ipv4": lambda: node_ports(4, None),
    "TestNodePorts/ipv4, multiple nodeport-addresses":
        lambda: node_ports(4, ["192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"]),
    "TestNodePorts/ipv6": lambda: node_ports(6, None),
    "TestNodePorts/ipv6, multiple nodeport-addresses":
        lambda: node_ports(6, ["192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64",
                               "2001:db8:1::2/128"]),
    "TestExternalTrafficPolicyLocal": lambda: external_traffic_policy("Local"),
    "TestExternalTrafficPolicyCluster": lambda: external_traffic_policy("Cluster"),
    "TestInternalExternalMasquerade/base": internal_external_masquerade,
}

EP1, EP2 = "10.180.0.1:80", "10.180.2.1:80"
POD, NODE_IP, OUTSIDE = "10.0.0.2", TEST_NODE_IP, TEST_EXTERNAL_CLIENT

FLOWS = [
    Flow("TestNoEndpointsReject", "pod to cluster IP with no endpoints",
         POD, "172.30.0.41", 80, "REJECT"),
    Flow("TestNoEndpointsReject", "external to external IP with no endpoints",
         OUTSIDE, "192.168.99.11", 80, "REJECT"),
    Flow("TestNoEndpointsReject", "pod to NodePort with no endpoints",
         POD, NODE_IP, 3001, "REJECT"),
    Flow("TestNoEndpointsReject", "external to NodePort with no endpoints",
         OUTSIDE, NODE_IP, 3001, "REJECT"),
    Flow("TestNoEndpointsReject", "pod to LoadBalancer IP with no endpoints",
         POD, "1.2.3.4", 80, "REJECT"),
    Flow("TestNoEndpointsReject", "external to LoadBalancer IP with no endpoints",
         OUTSIDE, "1.2.3.4", 80, "REJECT"),

    # Not mirrored: "TCP-only port does not match UDP traffic", "svc1 does not accept
    # svc2's ports" and "packet to unallocated cluster ip" test nftables' cluster-ips-check
    # chain (reject a ClusterIP's unknown ports, drop the unallocated service CIDR), which
    # needs the service CIDR and lives in the datapath, not in per-service state.
    Flow("TestClusterIPGeneral", "simple clusterIP", "10.180.0.2", "172.30.0.41", 80,
         "10.180.0.1:80"),
    Flow("TestClusterIPGeneral", "hairpin to cluster IP", "10.180.0.1", "172.30.0.41", 80,
         "10.180.0.1:80"),
    Flow("TestClusterIPGeneral", "clusterIP with multiple endpoints", "10.180.0.2",
         "172.30.0.42", 80, "10.180.0.1:80, 10.180.2.1:80"),
    Flow("TestClusterIPGeneral", "clusterIP with TargetPort", "10.180.0.2", "172.30.0.42", 443,
         "10.180.0.1:8443, 10.180.2.1:8443"),
    Flow("TestClusterIPGeneral", "clusterIP with TCP, UDP, and SCTP on same port (TCP)",
         "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:5353, 10.180.2.1:5353", "TCP"),
    Flow("TestClusterIPGeneral", "clusterIP with TCP, UDP, and SCTP on same port (TCP)",
         "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:53, 10.180.2.1:53", "UDP"),
    Flow("TestClusterIPGeneral", "clusterIP with TCP, UDP, and SCTP on same port (SCTP)",
         "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:53, 10.180.2.1:53", "SCTP"),

    Flow("TestLoadBalancer", "pod to cluster IP", POD, "172.30.0.41", 80, "10.180.0.1:80"),
    Flow("TestLoadBalancer", "external to nodePort", OUTSIDE, NODE_IP, 3001, "10.180.0.1:80"),
    Flow("TestLoadBalancer", "nodePort bypasses LoadBalancerSourceRanges",
         TEST_EXTERNAL_CLIENT_BLOCKED, NODE_IP, 3001, "10.180.0.1:80"),
    Flow("TestLoadBalancer", "accepted external to LB1", OUTSIDE, "1.2.3.4", 80,
         "10.180.0.1:80"),
    Flow("TestLoadBalancer", "accepted external to LB2", OUTSIDE, "5.6.7.8", 80,
         "10.180.0.1:80"),
    Flow("TestLoadBalancer", "blocked external to LB1", TEST_EXTERNAL_CLIENT_BLOCKED,
         "1.2.3.4", 80, "DROP"),
    Flow("TestLoadBalancer", "blocked external to LB2", TEST_EXTERNAL_CLIENT_BLOCKED,
         "5.6.7.8", 80, "DROP"),
    Flow("TestLoadBalancer", "pod to LB1 (blocked by LoadBalancerSourceRanges)", POD,
         "1.2.3.4", 80, "DROP"),
    Flow("TestLoadBalancer", "pod to LB2 (blocked by LoadBalancerSourceRanges)", POD,
         "5.6.7.8", 80, "DROP"),
    Flow("TestLoadBalancer", "node to LB1 (allowed by LoadBalancerSourceRanges)", NODE_IP,
         "1.2.3.4", 80, "10.180.0.1:80"),
    Flow("TestLoadBalancer", "node to LB2 (allowed by LoadBalancerSourceRanges)", NODE_IP,
         "5.6.7.8", 80, "10.180.0.1:80"),
    Flow("TestLoadBalancer", "same node to LB1, SNATted to LB1 (implicitly allowed)",
         "1.2.3.4", "1.2.3.4", 80, "10.180.0.1:80"),
    Flow("TestLoadBalancer", "same node to LB2, SNATted to LB2 (implicitly allowed)",
         "5.6.7.8", "5.6.7.8", 80, "10.180.0.1:80"),

    *[Flow(f"TestNodePorts/{case}", name, source, dest, port, output)
      for case, v4, allow_alt in [("ipv4", True, False),
                                  ("ipv4, multiple nodeport-addresses", True, True),
                                  ("ipv6", False, False),
                                  ("ipv6, multiple nodeport-addresses", False, True)]
      for both in [("10.180.0.1:80, 10.180.2.1:80" if v4 else
                    "[fd00:10:180::1]:80, [fd00:10:180::2:1]:80")]
      for name, source, dest, port, output in [
          ("pod to cluster IP", POD if v4 else "fd00:10::2",
           "172.30.0.41" if v4 else "fd00:172:30::41", 80, both),
          ("external to nodePort", OUTSIDE if v4 else "2600:5200::1",
           TEST_NODE_IP if v4 else TEST_NODE_IPV6, 3001, both),
          ("node to nodePort", TEST_NODE_IP if v4 else TEST_NODE_IPV6,
           TEST_NODE_IP if v4 else TEST_NODE_IPV6, 3001, both),
          ("external to nodePort on secondary IP" if allow_alt else
           "secondary nodeIP ignores NodePorts", OUTSIDE if v4 else "2600:5200::1",
           TEST_NODE_IP_ALT if v4 else TEST_NODE_IPV6_ALT, 3001, both if allow_alt else "")]],

    Flow("TestExternalTrafficPolicyLocal", "pod to cluster IP hits both endpoints, "
         "unmasqueraded", POD, "172.30.0.41", 80, f"{EP1}, {EP2}"),
    Flow("TestExternalTrafficPolicyLocal", "pod to external IP hits both endpoints, "
         "unmasqueraded", POD, "192.168.99.11", 80, f"{EP1}, {EP2}"),
    Flow("TestExternalTrafficPolicyLocal", "external to external IP hits only local endpoint, "
         "unmasqueraded", OUTSIDE, "192.168.99.11", 80, EP2),
    Flow("TestExternalTrafficPolicyLocal", "pod to LB IP hits only both endpoints, "
         "unmasqueraded", POD, "1.2.3.4", 80, f"{EP1}, {EP2}"),
    Flow("TestExternalTrafficPolicyLocal", "external to LB IP hits only local endpoint, "
         "unmasqueraded", OUTSIDE, "1.2.3.4", 80, EP2),
    Flow("TestExternalTrafficPolicyLocal", "pod to NodePort hits both endpoints, "
         "unmasqueraded", POD, NODE_IP, 3001, f"{EP1}, {EP2}"),
    Flow("TestExternalTrafficPolicyLocal", "external to NodePort hits only local endpoint, "
         "unmasqueraded", OUTSIDE, NODE_IP, 3001, EP2),
    *[Flow("TestExternalTrafficPolicyCluster", f"{name}, {masq}", source, dest, port,
           f"{EP1}, {EP2}")
      for name, masq, source, dest, port in [
          ("pod to cluster IP hits both endpoints", "unmasqueraded", POD, "172.30.0.41", 80),
          ("pod to external IP hits both endpoints", "masqueraded", POD, "192.168.99.11", 80),
          ("external to external IP hits both endpoints", "masqueraded", OUTSIDE,
           "192.168.99.11", 80),
          ("pod to LB IP hits both endpoints", "masqueraded", POD, "1.2.3.4", 80),
          ("external to LB IP hits both endpoints", "masqueraded", OUTSIDE, "1.2.3.4", 80),
          ("pod to NodePort hits both endpoints", "masqueraded", POD, NODE_IP, 3001),
          ("external to NodePort hits both endpoints", "masqueraded", OUTSIDE, NODE_IP, 3001)]],

    # The eTP:Local rows are the short-circuit rule this model has to get right: traffic
    # that starts on the node reaches every endpoint, outside traffic only local ones.
    *[Flow("TestInternalExternalMasquerade/base", name, source, dest, port, output)
      for name, source, dest, port, output in [
          ("pod to ClusterIP", POD, "172.30.0.41", 80, "10.180.0.1:80, 10.180.1.1:80"),
          ("pod to NodePort", POD, NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80"),
          ("pod to LB", POD, "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80"),
          ("node to ClusterIP", NODE_IP, "172.30.0.41", 80, "10.180.0.1:80, 10.180.1.1:80"),
          ("node to NodePort", NODE_IP, NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80"),
          ("node to LB", NODE_IP, "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80"),
          ("external to ClusterIP", OUTSIDE, "172.30.0.41", 80,
           "10.180.0.1:80, 10.180.1.1:80"),
          ("external to NodePort", OUTSIDE, NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80"),
          ("external to LB", OUTSIDE, "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80"),
          ("pod to ClusterIP with eTP:Local", POD, "172.30.0.42", 80,
           "10.180.0.2:80, 10.180.1.2:80"),
          ("pod to NodePort with eTP:Local", POD, NODE_IP, 3002,
           "10.180.0.2:80, 10.180.1.2:80"),
          ("pod to LB with eTP:Local", POD, "5.6.7.8", 80, "10.180.0.2:80, 10.180.1.2:80"),
          ("node to ClusterIP with eTP:Local", NODE_IP, "172.30.0.42", 80,
           "10.180.0.2:80, 10.180.1.2:80"),
          # (kube-proxy's case sends this one to svc1's NodePort, 3001; so do we)
          ("node to NodePort with eTP:Local", NODE_IP, NODE_IP, 3001,
           "10.180.0.1:80, 10.180.1.1:80"),
          ("node to LB with eTP:Local", NODE_IP, "5.6.7.8", 80,
           "10.180.0.2:80, 10.180.1.2:80"),
          ("external to ClusterIP with eTP:Local", OUTSIDE, "172.30.0.42", 80,
           "10.180.0.2:80, 10.180.1.2:80"),
          ("external to NodePort with eTP:Local", OUTSIDE, NODE_IP, 3002, "10.180.0.2:80"),
          ("external to LB with eTP:Local", OUTSIDE, "5.6.7.8", 80, "10.180.0.2:80"),
          ("pod to ClusterIP with iTP:Local", POD, "172.30.0.43", 80, "10.180.0.3:80"),
          ("pod to NodePort with iTP:Local", POD, NODE_IP, 3003,
           "10.180.0.3:80, 10.180.1.3:80"),
          ("pod to LB with iTP:Local", POD, "9.10.11.12", 80, "10.180.0.3:80, 10.180.1.3:80"),
          ("node to ClusterIP with iTP:Local", NODE_IP, "172.30.0.43", 80, "10.180.0.3:80"),
          ("node to NodePort with iTP:Local", NODE_IP, NODE_IP, 3003,
           "10.180.0.3:80, 10.180.1.3:80"),
          ("node to LB with iTP:Local", NODE_IP, "9.10.11.12", 80,
           "10.180.0.3:80, 10.180.1.3:80"),
          ("external to ClusterIP with iTP:Local", OUTSIDE, "172.30.0.43", 80,
           "10.180.0.3:80"),
          ("external to NodePort with iTP:Local", OUTSIDE, NODE_IP, 3003,
           "10.180.0.3:80, 10.180.1.3:80"),
          ("external to LB with iTP:Local", OUTSIDE, "9.10.11.12", 80,
           "10.180.0.3:80, 10.180.1.3:80")]],
]


@pytest.fixture(scope="module")
def setups():
    return {}


@pytest.mark.parametrize("case", FLOWS, ids=lambda c: f"{c.test}/{c.name}")
def test_packet_flows(case, setups):
    if case.test not in setups:
        setups[case.test] = SETUPS[case.test]()
    assert flow(setups[case.test], case.source, case.dest, case.port, case.protocol) == \
        case.output


# Table-per-subtest flows: each kube-proxy subtest brings its own endpoints, and afterwards
# deletes the slice and expects REJECT everywhere.

@dataclass
class PolicyCase:
    test: str
    name: str
    service: dict
    endpoints: list[dict]
    flows: list[tuple[str, str, str, int, str]]    # (flow name, source, dest, port, output)


ITP_SERVICE = {"clusterIP": "172.30.1.1", "ports": [{"name": "", "port": 80}]}
TERMINATING_LB = {"type": "LoadBalancer", "clusterIP": "172.30.1.1",
                  "ports": [{"name": "", "port": 80, "targetPort": 80}]}


def conditioned(address, node, ready, serving, terminating):
    return at(address, node, ready=ready, serving=serving, terminating=terminating)


POLICY_CASES = [
    PolicyCase("TestInternalTrafficPolicy", "internalTrafficPolicy is cluster",
               {**ITP_SERVICE, "internalTrafficPolicy": "Cluster"},
               [at("10.0.1.1", TEST_NODE_NAME), at("10.0.1.2", "node1"), at("10.0.1.3", "node2")],
               [("pod to ClusterIP hits all endpoints", POD, "172.30.1.1", 80,
                 "10.0.1.1:80, 10.0.1.2:80, 10.0.1.3:80")]),
    PolicyCase("TestInternalTrafficPolicy",
               "internalTrafficPolicy is local and there is one local endpoint",
               {**ITP_SERVICE, "internalTrafficPolicy": "Local"},
               [at("10.0.1.1", TEST_NODE_NAME), at("10.0.1.2", "node1"), at("10.0.1.3", "node2")],
               [("pod to ClusterIP hits only local endpoint", POD, "172.30.1.1", 80,
                 "10.0.1.1:80")]),
    PolicyCase("TestInternalTrafficPolicy",
               "internalTrafficPolicy is local and there are multiple local endpoints",
               {**ITP_SERVICE, "internalTrafficPolicy": "Local"},
               [at("10.0.1.1", TEST_NODE_NAME), at("10.0.1.2", TEST_NODE_NAME),
                at("10.0.1.3", "node2")],
               [("pod to ClusterIP hits all local endpoints", POD, "172.30.1.1", 80,
                 "10.0.1.1:80, 10.0.1.2:80")]),
    PolicyCase("TestInternalTrafficPolicy",
               "internalTrafficPolicy is local and there are no local endpoints",
               {**ITP_SERVICE, "internalTrafficPolicy": "Local"},
               [at("10.0.1.1", "node0"), at("10.0.1.2", "node1"), at("10.0.1.3", "node2")],
               [("no endpoints", POD, "172.30.1.1", 80, "DROP")]),

    PolicyCase("TestTerminatingEndpointsTrafficPolicyLocal", "ready endpoints exist",
               {**TERMINATING_LB, "externalTrafficPolicy": "Local"},
               [conditioned("10.0.1.1", TEST_NODE_NAME, True, True, False),
                conditioned("10.0.1.2", TEST_NODE_NAME, True, True, False),
                conditioned("10.0.1.3", TEST_NODE_NAME, False, True, True),
                conditioned("10.0.1.4", TEST_NODE_NAME, False, False, True),
                conditioned("10.0.1.5", "node-1", True, True, False)],
               [("pod to clusterIP", POD, "172.30.1.1", 80,
                 "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80"),
                ("external to LB", OUTSIDE, "1.2.3.4", 80, "10.0.1.1:80, 10.0.1.2:80")]),
    PolicyCase("TestTerminatingEndpointsTrafficPolicyLocal", "only terminating endpoints exist",
               {**TERMINATING_LB, "externalTrafficPolicy": "Local"},
               [conditioned("10.0.1.2", TEST_NODE_NAME, False, True, True),
                conditioned("10.0.1.3", TEST_NODE_NAME, False, True, True),
                conditioned("10.0.1.4", TEST_NODE_NAME, False, False, True),
                conditioned("10.0.1.5", "node-1", True, True, False)],
               [("pod to clusterIP", POD, "172.30.1.1", 80, "10.0.1.5:80"),
                ("external to LB", OUTSIDE, "1.2.3.4", 80, "10.0.1.2:80, 10.0.1.3:80")]),
    PolicyCase("TestTerminatingEndpointsTrafficPolicyLocal",
               "terminating endpoints on remote node",
               {**TERMINATING_LB, "externalTrafficPolicy": "Local"},
               [conditioned("10.0.1.5", "node-1", False, True, True)],
               [("pod to clusterIP", POD, "172.30.1.1", 80, "10.0.1.5:80"),
                ("external to LB, no locally-usable endpoints", OUTSIDE, "1.2.3.4", 80,
                 "DROP")]),
    PolicyCase("TestTerminatingEndpointsTrafficPolicyLocal", "no usable endpoints on any node",
               {**TERMINATING_LB, "externalTrafficPolicy": "Local"},
               [conditioned("10.0.1.5", TEST_NODE_NAME, False, False, True),
                conditioned("10.0.1.5", "node-1", False, False, True)],
               [("pod to clusterIP, no usable endpoints", POD, "172.30.1.1", 80, "REJECT"),
                ("external to LB, no usable endpoints", OUTSIDE, "1.2.3.4", 80, "REJECT")]),

    PolicyCase("TestTerminatingEndpointsTrafficPolicyCluster", "ready endpoints exist",
               {**TERMINATING_LB, "externalTrafficPolicy": "Cluster"},
               [conditioned("10.0.1.1", TEST_NODE_NAME, True, True, False),
                conditioned("10.0.1.2", TEST_NODE_NAME, True, True, False),
                conditioned("10.0.1.3", "another-node", False, True, True),
                conditioned("10.0.1.4", "another-node", False, False, True),
                conditioned("10.0.1.5", "another-node", True, True, False)],
               [("pod to clusterIP", POD, "172.30.1.1", 80,
                 "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80"),
                ("external to LB", OUTSIDE, "1.2.3.4", 80,
                 "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80")]),
    PolicyCase("TestTerminatingEndpointsTrafficPolicyCluster",
               "only terminating endpoints exist",
               {**TERMINATING_LB, "externalTrafficPolicy": "Cluster"},
               [conditioned("10.0.1.2", TEST_NODE_NAME, False, True, True),
                conditioned("10.0.1.3", TEST_NODE_NAME, False, True, True),
                conditioned("10.0.1.4", "another-node", False, False, True),
                conditioned("10.0.1.5", "another-node", False, True, True)],
               [("pod to clusterIP", POD, "172.30.1.1", 80,
                 "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80"),
                ("external to LB", OUTSIDE, "1.2.3.4", 80,
                 "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80")]),
    PolicyCase("TestTerminatingEndpointsTrafficPolicyCluster",
               "terminating endpoints on remote node",
               {**TERMINATING_LB, "externalTrafficPolicy": "Cluster"},
               [conditioned("10.0.1.5", "node-1", False, True, True)],
               [("pod to clusterIP", POD, "172.30.1.1", 80, "10.0.1.5:80"),
                ("external to LB", OUTSIDE, "1.2.3.4", 80, "10.0.1.5:80")]),
    PolicyCase("TestTerminatingEndpointsTrafficPolicyCluster",
               "no usable endpoints on any node",
               {**TERMINATING_LB, "externalTrafficPolicy": "Cluster"},
               [conditioned("10.0.1.5", TEST_NODE_NAME, False, False, True),
                conditioned("10.0.1.5", "node-1", False, False, True)],
               [("pod to clusterIP", POD, "172.30.1.1", 80, "REJECT"),
                ("external to LB", OUTSIDE, "1.2.3.4", 80, "REJECT")]),
]


@pytest.mark.parametrize("case", POLICY_CASES, ids=lambda c: f"{c.test}/{c.name}")
def test_traffic_policy_flows(case):
    service = make_service("ns1", "svc1", case.service, ingress=["1.2.3.4"])
    state = desired_state([service], [make_slice("ns1", "svc1", case.endpoints,
                                                 ports=[("", 80, "TCP")])], fake_node())
    for name, source, dest, port, output in case.flows:
        assert flow(state, source, dest, port) == output, name
    # "... after endpoints deleted" / "endpoints deleted": every destination REJECTs.
    deleted = desired_state([service], [], fake_node())
    for _, source, dest, port, _ in case.flows:
        assert flow(deleted, source, dest, port) == "REJECT"


# --- frontends: servicechangetracker_test.go TestServiceToServiceMap -----------------------

def frontends(state) -> dict[str, list[str]]:
    """{"ns/name:port/TCP v4": ["ClusterIP 10.0.0.1:80", ...]} in sort_key order."""
    return {f"{name} v{family}": [f"{f.kind.value} {join_host_port(f.address, f.port)}"
                                  for f in sps.frontends]
            for (name, family), sps in state.items()}


V4_CLUSTER, V6_CLUSTER = "10.0.0.1", "2001:db8:85a3:0:0:8a2e:370:7334"
V4_EXTERNAL, V6_EXTERNAL = "8.8.8.8", "2001:db8:85a3:0:0:8a2e:370:7335"
TEST_PORT = [{"name": "testPort", "port": 12345, "protocol": "TCP"}]
BOTH_INGRESS = [V4_EXTERNAL, V6_EXTERNAL]


def port_pair(*ports):
    return [{"name": n, "protocol": proto, "port": p, "nodePort": np, "targetPort": t}
            for n, proto, p, np, t in ports]


SERVICE_MAP_CASES = [
    ("headless service",
     make_service("ns2", "headless", {"type": "ClusterIP", "clusterIP": "None",
                                      "ports": port_pair(("rpc", "UDP", 1234, 0, 0))}), {}),
    ("headless sctp service",
     make_service("ns2", "headless", {"type": "ClusterIP", "clusterIP": "None",
                                      "ports": port_pair(("sip", "SCTP", 7777, 0, 0))}), {}),
    ("headless service without port",
     make_service("ns2", "headless-without-port", {"type": "ClusterIP", "clusterIP": "None"}),
     {}),
    # (kube-proxy's case also sets nodePorts 4321 and 5321 on this ClusterIP service; the
    # API server forbids that, and so does our border: see test_objects)
    ("cluster ip service",
     make_service("ns2", "cluster-ip", {"type": "ClusterIP", "clusterIP": "172.16.55.4",
                                        "ports": port_pair(("p1", "UDP", 1234, 0, 0),
                                                           ("p2", "UDP", 1235, 0, 0))}),
     {"ns2/cluster-ip:p1/UDP v4": ["ClusterIP 172.16.55.4:1234"],
      "ns2/cluster-ip:p2/UDP v4": ["ClusterIP 172.16.55.4:1235"]}),
    ("nodeport service",
     make_service("ns2", "node-port", {"type": "NodePort", "clusterIP": "172.16.55.10",
                                       "ports": port_pair(("port1", "UDP", 345, 678, 0),
                                                          ("port2", "TCP", 344, 677, 0))}),
     {"ns2/node-port:port1/UDP v4": ["ClusterIP 172.16.55.10:345", "NodePort 192.168.0.2:678"],
      "ns2/node-port:port2/TCP v4": ["ClusterIP 172.16.55.10:344",
                                     "NodePort 192.168.0.2:677"]}),
    *[(name, make_service("ns1", "load-balancer", {
        "type": "LoadBalancer", "clusterIP": "172.16.55.11", "loadBalancerIP": "5.6.7.8",
        "ports": port_pair(("port3", "UDP", 8675, 30061, 7000),
                           ("port4", "UDP", 8676, 30062, 7001))}, ingress=[ingress]),
       {"ns1/load-balancer:port3/UDP v4": ["LoadBalancer 10.1.2.4:8675",
                                           "ClusterIP 172.16.55.11:8675",
                                           "NodePort 192.168.0.2:30061"][lb:],
        "ns1/load-balancer:port4/UDP v4": ["LoadBalancer 10.1.2.4:8676",
                                           "ClusterIP 172.16.55.11:8676",
                                           "NodePort 192.168.0.2:30062"][lb:]})
      for name, ingress, lb in [
          ("load balancer service", {"ip": "10.1.2.4"}, 0),
          ("load balancer service ipMode VIP feature gate enabled",
           {"ip": "10.1.2.4", "ipMode": "VIP"}, 0),
          ("load balancer service ipMode Proxy feature gate enabled",
           {"ip": "10.1.2.4", "ipMode": "Proxy"}, 1)]],
    ("load balancer service with only local traffic policy",
     make_service("ns1", "only-local-load-balancer", {
         "type": "LoadBalancer", "clusterIP": "172.16.55.12", "loadBalancerIP": "5.6.7.8",
         "externalTrafficPolicy": "Local", "healthCheckNodePort": 345,
         "ports": port_pair(("portx", "UDP", 8677, 30063, 7002),
                            ("porty", "UDP", 8678, 30064, 7003))}, ingress=["10.1.2.3"]),
     {"ns1/only-local-load-balancer:portx/UDP v4": [
         "LoadBalancer 10.1.2.3:8677", "ClusterIP 172.16.55.12:8677",
         "NodePort 192.168.0.2:30063"],
      "ns1/only-local-load-balancer:porty/UDP v4": [
          "LoadBalancer 10.1.2.3:8678", "ClusterIP 172.16.55.12:8678",
          "NodePort 192.168.0.2:30064"]}),
    ("external name service",
     make_service("ns2", "external-name", {"type": "ExternalName", "clusterIP": "172.16.55.4",
                                           "externalName": "foo2.bar.com",
                                           "ports": port_pair(("portz", "UDP", 1235, 5321, 0))}),
     {}),
    ("service with ipv6 clusterIP under ipv4 mode, service should be filtered",
     make_service("test", "invalidIPv6InIPV4Mode", {"clusterIP": V6_CLUSTER, "ports": TEST_PORT},
                  ingress=BOTH_INGRESS),
     {"test/invalidIPv6InIPV4Mode:testPort/TCP v6": [
         f"ClusterIP [{ip(V6_CLUSTER)}]:12345", f"LoadBalancer [{ip(V6_EXTERNAL)}]:12345"]}),
    ("service with ipv4 clusterIP under ipv6 mode, service should be filtered",
     make_service("test", "invalidIPv4InIPV6Mode", {"clusterIP": V4_CLUSTER, "ports": TEST_PORT},
                  ingress=BOTH_INGRESS),
     {"test/invalidIPv4InIPV6Mode:testPort/TCP v4": [
         "LoadBalancer 8.8.8.8:12345", "ClusterIP 10.0.0.1:12345"]}),
    # kube-proxy lists 8.8.8.8 both as externalIP and LB VIP; one frontend serves both, and
    # the externalIP wins the tie as its rule comes first (iptables KUBE-SERVICES order).
    ("service with ipv4 configurations under ipv4 mode",
     make_service("test", "validIPv4", {"clusterIP": V4_CLUSTER, "externalIPs": [V4_EXTERNAL],
                                        "loadBalancerSourceRanges": ["0.0.0.0/1"],
                                        "ports": TEST_PORT}, ingress=BOTH_INGRESS),
     {"test/validIPv4:testPort/TCP v4": ["ExternalIP 8.8.8.8:12345",
                                         "ClusterIP 10.0.0.1:12345"]}),
    ("service with ipv6 configurations under ipv6 mode",
     make_service("test", "validIPv6", {"clusterIP": V6_CLUSTER, "externalIPs": [V6_EXTERNAL],
                                        "loadBalancerSourceRanges": ["2001:db8::/32"],
                                        "ports": TEST_PORT}, ingress=BOTH_INGRESS),
     {"test/validIPv6:testPort/TCP v6": [f"ClusterIP [{ip(V6_CLUSTER)}]:12345",
                                         f"ExternalIP [{ip(V6_EXTERNAL)}]:12345"]}),
    ("service with both ipv4 and ipv6 configurations under ipv4 mode, ipv6 fields should be "
     "filtered",
     make_service("test", "filterIPv6InIPV4Mode", {
         "clusterIP": V4_CLUSTER, "externalIPs": [V4_EXTERNAL, V6_EXTERNAL],
         "ports": TEST_PORT}, ingress=BOTH_INGRESS),
     {"test/filterIPv6InIPV4Mode:testPort/TCP v4": ["ExternalIP 8.8.8.8:12345",
                                                    "ClusterIP 10.0.0.1:12345"]}),
    ("service with both ipv4 and ipv6 configurations under ipv6 mode, ipv4 fields should be "
     "filtered",
     make_service("test", "filterIPv4InIPV6Mode", {
         "clusterIP": V6_CLUSTER, "externalIPs": [V4_EXTERNAL, V6_EXTERNAL],
         "ports": TEST_PORT}, ingress=BOTH_INGRESS),
     {"test/filterIPv4InIPV6Mode:testPort/TCP v6": [f"ClusterIP [{ip(V6_CLUSTER)}]:12345",
                                                    f"ExternalIP [{ip(V6_EXTERNAL)}]:12345"]}),
]


@pytest.mark.parametrize("name,service,want", SERVICE_MAP_CASES,
                         ids=[c[0] for c in SERVICE_MAP_CASES])
def test_service_to_service_map(name, service, want):
    assert frontends(desired_state([service], [], fake_node())) == want


# --- loadBalancerSourceRanges: serviceport.go filtering, proxier.go allowFromNode ---------

def lb_with_ranges(ranges, ingress=("1.2.3.4", "5.6.7.8"), cluster_ips=("172.30.0.41",)):
    return make_service("ns1", "svc1", {
        "type": "LoadBalancer", "clusterIP": cluster_ips[0], "clusterIPs": list(cluster_ips),
        "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3001}],
        "loadBalancerSourceRanges": list(ranges)}, ingress=ingress)


SOURCE_RANGE_CASES = [
    # (name, service, node IPs, {family: ranges})
    ("TestLoadBalancer: node IP inside a range lets the VIPs in as sources",
     lb_with_ranges(["192.168.0.0/24", " 203.0.113.0/25"]), TEST_NODE_IPS,
     {4: ["1.2.3.4/32", "5.6.7.8/32", "192.168.0.0/24", "203.0.113.0/25"]}),
    ("node IP outside every range: the ranges alone",
     lb_with_ranges(["203.0.113.0/25"]), TEST_NODE_IPS, {4: ["203.0.113.0/25"]}),
    ("only the first node IP of the family counts (kube-proxy's nodeIP)",
     lb_with_ranges(["192.168.1.0/24"]), TEST_NODE_IPS, {4: ["192.168.1.0/24"]}),
    ("no node IP of the family: kube-proxy assumes loopback",
     lb_with_ranges(["127.0.0.0/8"]), [TEST_NODE_IPV6],
     {4: ["1.2.3.4/32", "5.6.7.8/32", "127.0.0.0/8"]}),
    ("zero CIDR allows any source: no restriction",          # IsZeroCIDR
     lb_with_ranges(["0.0.0.0/0", "203.0.113.0/25"]), TEST_NODE_IPS, {4: []}),
    ("ipMode Proxy ingress is no VIP and never a source",
     lb_with_ranges(["192.168.0.0/24"], ingress=[{"ip": "1.2.3.4", "ipMode": "Proxy"},
                                                 "5.6.7.8"]), TEST_NODE_IPS,
     {4: ["5.6.7.8/32", "192.168.0.0/24"]}),
    ("sorted and de-duplicated, host bits cleared",
     lb_with_ranges(["203.0.113.9/25", "10.0.0.0/8", "203.0.113.0/25", "10.0.0.0/16"]),
     TEST_NODE_IPS, {4: ["10.0.0.0/8", "10.0.0.0/16", "203.0.113.0/25"]}),
    ("dual-stack: each family keeps its own ranges; a /0 frees only its family",
     lb_with_ranges(["::/0", "203.0.113.0/25", "2001:db8::/64", "192.168.0.0/16"],
                    ingress=["1.2.3.4", "2001:db8:ff::4"],
                    cluster_ips=("172.30.0.41", "fd00:172:30::41")), TEST_NODE_IPS,
     {4: ["1.2.3.4/32", "192.168.0.0/16", "203.0.113.0/25"], 6: []}),
    ("IPv6: the node's IPv6 address inside a range lets the IPv6 VIP in",
     lb_with_ranges(["2001:db8::/64"], ingress=["1.2.3.4", "2001:db8:ff::4"],
                    cluster_ips=("fd00:172:30::41",)), TEST_NODE_IPS,
     {6: ["2001:db8::/64", "2001:db8:ff::4/128"]}),
    ("no ranges: no restriction",
     lb_with_ranges([]), TEST_NODE_IPS, {4: []}),
]


@pytest.mark.parametrize("name,service,node_ips,want", SOURCE_RANGE_CASES,
                         ids=[c[0] for c in SOURCE_RANGE_CASES])
def test_load_balancer_source_ranges(name, service, node_ips, want):
    node = NodeContext(TEST_NODE_NAME, tuple(map(ip, node_ips)))
    state = desired_state([service], [], node)
    got = {family: [str(r) for r in sps.source_ranges] for (_, family), sps in state.items()}
    assert got == want


# --- nftables TestOverallNFTablesRules: every set of every service at once ---------------

def test_overall_nftables_rules():
    services = [
        make_service("ns1", "svc1", {"clusterIP": "172.30.0.41", "ports": [
            {"name": "p80", "port": 80, "protocol": "TCP"}]}),
        make_service("ns2", "svc2", {
            "type": "LoadBalancer", "externalTrafficPolicy": "Local", "clusterIP": "172.30.0.42",
            "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3001}],
            "externalIPs": ["192.168.99.22"], "healthCheckNodePort": 30000},
            ingress=["1.2.3.4"]),
        make_service("ns3", "svc3", {"type": "NodePort", "clusterIP": "172.30.0.43", "ports": [
            {"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3003}]}),
        make_service("ns4", "svc4", {"type": "NodePort", "clusterIP": "172.30.0.44",
                                     "externalIPs": ["192.168.99.33"], "ports": [
            {"name": "p80", "port": 80, "protocol": "TCP", "targetPort": 80}]}),
        make_service("ns5", "svc5", {
            "type": "LoadBalancer", "externalTrafficPolicy": "Cluster", "clusterIP": "172.30.0.45",
            "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3002}],
            "healthCheckNodePort": 30000, "loadBalancerSourceRanges": [" 203.0.113.0/25"],
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10800}}},
            ingress=["5.6.7.8"]),
        make_service("ns6", "svc6", {"type": "ClusterIP", "clusterIP": "172.30.0.46", "ports": [
            {"name": "p80", "port": 80, "protocol": "TCP", "targetPort": 80}]}),
    ]
    slices = [make_slice("ns1", "svc1", [at("10.180.0.1")]),
              # "since we aren't setting its NodeName, this endpoint will be considered
              # non-local and ignored" (for outside traffic)
              make_slice("ns2", "svc2", [at("10.180.0.2")]),
              make_slice("ns3", "svc3", [at("10.180.0.3")]),
              make_slice("ns4", "svc4", [at("10.180.0.4"), at("10.180.0.5", TEST_NODE_NAME)]),
              make_slice("ns5", "svc5", [at("10.180.0.3")])]
    state = desired_state(services, slices, fake_node())

    def sets(ns):
        (sps,) = [s for (n, _), s in state.items() if n.namespace == ns]
        render = lambda bs: [f"{b.address}:{b.port}" for b in bs]  # noqa: E731
        return (frontends({(sps.name, sps.family): sps})[f"{sps.name} v4"],
                render(sps.backends), render(sps.external_backends),
                render(sps.outside_backends), sps.session_affinity_timeout,
                sps.has_any_endpoints)

    assert sets("ns1") == (["ClusterIP 172.30.0.41:80"], ["10.180.0.1:80"], [], [], 0, True)
    # eTP Local, no local endpoint: ClusterIP and traffic started here reach 10.180.0.2,
    # outside traffic is dropped (no-endpoint-nodeports / no-endpoint-services "drop").
    assert sets("ns2") == (["LoadBalancer 1.2.3.4:80", "ClusterIP 172.30.0.42:80",
                            "NodePort 192.168.0.2:3001", "ExternalIP 192.168.99.22:80"],
                           ["10.180.0.2:80"], ["10.180.0.2:80"], [], 0, True)
    assert sets("ns3") == (["ClusterIP 172.30.0.43:80", "NodePort 192.168.0.2:3003"],
                           ["10.180.0.3:80"], ["10.180.0.3:80"], ["10.180.0.3:80"], 0, True)
    # A NodePort service whose port has no nodePort: ClusterIP and ExternalIP only.
    both = ["10.180.0.4:80", "10.180.0.5:80"]
    assert sets("ns4") == (["ClusterIP 172.30.0.44:80", "ExternalIP 192.168.99.33:80"],
                           both, both, both, 0, True)
    assert sets("ns5") == (["LoadBalancer 5.6.7.8:80", "ClusterIP 172.30.0.45:80",
                            "NodePort 192.168.0.2:3002"],
                           ["10.180.0.3:80"], ["10.180.0.3:80"], ["10.180.0.3:80"], 10800, True)
    assert sets("ns6") == (["ClusterIP 172.30.0.46:80"], [], [], [], 0, False)   # REJECT


# --- NodePort addresses: proxyutil.NewNodePortAddresses -----------------------------------

NODE_PORT_ADDRESS_CASES = [
    ("no CIDRs: every node IP of each family", [], TEST_NODE_IPS),
    ("CIDRs of one family leave the other family unfiltered", ["192.168.0.0/24"],
     [TEST_NODE_IP, TEST_NODE_IPV6, TEST_NODE_IPV6_ALT]),
    ("zero CIDR matches all of its family", ["0.0.0.0/0", "2001:db8::1/128"],
     [TEST_NODE_IP, TEST_NODE_IP_ALT, TEST_EXTERNAL_IP, TEST_NODE_IPV6]),
    ("no node IP inside the CIDRs: no NodePort in that family", ["10.0.0.0/8"],
     [TEST_NODE_IPV6, TEST_NODE_IPV6_ALT]),
]


@pytest.mark.parametrize("name,cidrs,want", NODE_PORT_ADDRESS_CASES,
                         ids=[c[0] for c in NODE_PORT_ADDRESS_CASES])
def test_node_port_addresses(name, cidrs, want):
    node = NodeContext(TEST_NODE_NAME, tuple(map(ip, TEST_NODE_IPS)),
                       tuple(map(ipaddress.ip_network, cidrs)))
    assert [str(a) for a in node.node_port_ips(4) + node.node_port_ips(6)] == \
        [str(ip(a)) for a in want]


def test_no_node_context_means_no_node_ports_and_nothing_local():
    service = make_service("ns", "web", {
        "type": "NodePort", "clusterIP": "172.30.0.41", "internalTrafficPolicy": "Local",
        "ports": [{"name": "p80", "port": 80, "nodePort": 30080}]})
    (sps,) = desired_state([service], [make_slice("ns", "web", [at("10.0.0.1", "n1")])]).values()
    assert [f.kind for f in sps.frontends] == [FrontendKind.CLUSTER_IP]
    assert sps.backends == () and sps.has_any_endpoints       # kube-proxy: DROP
    assert sps.external_backends == sps.outside_backends == ()   # no external frontend


def test_node_context_from_a_node_object():
    node = parse_node({"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": TEST_NODE_NAME, "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "status": {"addresses": [{"type": "InternalIP", "address": TEST_NODE_IP},
                                 {"type": "InternalIP", "address": TEST_NODE_IP_ALT},
                                 {"type": "InternalIP", "address": TEST_NODE_IPV6}]}})
    context = NodeContext.from_node(node)
    assert context == NodeContext(TEST_NODE_NAME, (ip(TEST_NODE_IP), ip(TEST_NODE_IPV6)), (),
                                  "zone-a")
    # --node-ip and --nodeport-addresses win over the Node object; its zone stays.
    override = NodeContext.from_node(node, node_ips=(ip(TEST_NODE_IP_ALT),),
                                     node_port_cidrs=(ipaddress.ip_network("192.168.1.0/24"),))
    assert override.node_ips == (ip(TEST_NODE_IP_ALT),) and override.zone == "zone-a"
    assert NodeContext.from_node(None, "n1") == NodeContext("n1")
    assert NodeContext.from_node(Node("n2"), "n1").node_name == "n1"


# --- topology: hints with this node's zone and name ---------------------------------------

def hinted(address, node, zones=(), nodes=(), **conditions):
    return {**at(address, node, **conditions),
            "hints": {"forZones": [{"name": z} for z in zones],
                      "forNodes": [{"name": n} for n in nodes]}}


TOPOLOGY_SLICE = [hinted("10.1.2.3", "n-a", ["zone-a"], [TEST_NODE_NAME]),
                  hinted("10.1.2.4", "n-b", ["zone-b"], ["n-b"]),
                  hinted("10.1.2.5", "n-c", ["zone-c"], ["n-c"]),
                  hinted("10.1.2.6", "n-a2", ["zone-a"], ["n-a2"])]


@pytest.mark.parametrize("annotations", [
    {}, {"service.kubernetes.io/topology-mode": "Auto"},
    {"service.kubernetes.io/topology-mode": "Disabled"},
    {"service.kubernetes.io/topology-aware-hints": "auto"}],
    ids=["no annotation", "topology-mode Auto", "topology-mode Disabled",
         "old topology-aware-hints"])
def test_zone_hints_follow_the_nodes_zone_label_whatever_the_annotations(annotations):
    # kube-proxy >= 1.33 reads hints only (topology.go topologyModeFromHints): annotations
    # and trafficDistribution are the EndpointSlice controller's business.
    raw = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"namespace": "ns", "name": "web", "annotations": annotations},
           "spec": {"clusterIP": "172.30.0.41", "trafficDistribution": "PreferClose",
                    "ports": [{"name": "p80", "port": 80}]}}
    node = NodeContext.from_node(parse_node({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "elsewhere", "labels": {"topology.kubernetes.io/zone": "zone-a"}}}))
    (sps,) = desired_state([parse_service(raw)],
                           [make_slice("ns", "web", TOPOLOGY_SLICE)], node).values()
    assert [str(b.address) for b in sps.backends] == ["10.1.2.3", "10.1.2.6"]


def test_node_hints_prefer_this_node():   # trafficDistribution PreferSameNode
    service = make_service("ns", "web", {"clusterIP": "172.30.0.41",
                                         "trafficDistribution": "PreferSameNode",
                                         "ports": [{"name": "p80", "port": 80}]})
    node = NodeContext(TEST_NODE_NAME, zone="zone-a")
    (sps,) = desired_state([service], [make_slice("ns", "web", TOPOLOGY_SLICE)], node).values()
    assert [str(b.address) for b in sps.backends] == ["10.1.2.3"]
    # Cluster-policy traffic started here follows the hints too; a node without hints for
    # it gets the zone's endpoints.
    other = NodeContext("n-x", zone="zone-b")
    (sps,) = desired_state([service], [make_slice("ns", "web", TOPOLOGY_SLICE)],
                           other).values()
    assert [str(b.address) for b in sps.backends] == ["10.1.2.4"]


def test_hints_filter_the_short_circuit_set_but_not_the_local_one():
    service = make_service("ns", "web", {
        "type": "NodePort", "externalTrafficPolicy": "Local", "clusterIP": "172.30.0.41",
        "ports": [{"name": "p80", "port": 80, "nodePort": 30080}]})
    slice_ = make_slice("ns", "web", [hinted("10.1.2.3", "n-a", ["zone-a"]),
                                      hinted("10.1.2.4", TEST_NODE_NAME, ["zone-b"])])
    node = NodeContext(TEST_NODE_NAME, (ip(TEST_NODE_IP),), (), "zone-a")
    (sps,) = desired_state([service], [slice_], node).values()
    assert [str(b.address) for b in sps.external_backends] == ["10.1.2.3"]
    assert [str(b.address) for b in sps.outside_backends] == ["10.1.2.4"]


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


# --- property: random, partly broken objects never break the model ----------------------

junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=4),
                 st.floats(), st.lists(st.integers(), max_size=2),
                 st.sampled_from(["None", "", "10.1.0.300", "fd00::1", "10.1.0.1", "UDP",
                                  "Local", "Proxy", "ClientIP", "127.0.0.1"]),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
ADDRESSES = {"IPv4": ["10.96.0.1", "10.1.0.1", "10.1.0.2", "10.1.0.3"],
             "IPv6": ["fd00::1", "fd00::2", "::ffff:10.1.0.1"]}
EXTERNAL = ["192.168.99.11", "192.168.0.2", "1.2.3.4", "2001:db8::99", "2001:db8::1"]
NODES = ["n1", "n2", ""]
ZONES = ["zone-a", "zone-b"]


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


def maybe(draw, strategy, absent=0.5):
    return draw(strategy) if draw(st.floats(0, 1)) >= absent else None


@st.composite
def service_dicts(draw):
    families = draw(st.sampled_from([["IPv4"], ["IPv6"], ["IPv4", "IPv6"], ["IPv6", "IPv4"],
                                     ["None"]]))
    ips = [f if f == "None" else draw(st.sampled_from(ADDRESSES[f])) for f in families]
    service_type = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer",
                                         "ExternalName"]))
    count = draw(st.integers(1, 3))
    port_names = draw(st.permutations(["http", "dns", "metrics"]))[:count]
    if count == 1:
        port_names = [draw(st.sampled_from(["", "http"]))]
    ports = [{"name": name, "protocol": draw(st.sampled_from(["TCP", "UDP", "SCTP"])),
              "port": draw(st.sampled_from([53, 80, 443, 65535])),
              "targetPort": draw(st.one_of(st.integers(1, 65535), st.just("http")))}
             for name in port_names]
    if service_type in ("NodePort", "LoadBalancer"):
        for i, port in enumerate(ports):
            port["nodePort"] = draw(st.sampled_from([0, 30000 + i, 30080 + i, 32767 - i]))
    spec = {"type": service_type, "clusterIP": ips[0], "clusterIPs": ips, "ports": ports}
    optional = {
        "externalIPs": st.lists(st.sampled_from(EXTERNAL), max_size=3),
        "internalTrafficPolicy": st.sampled_from(["Cluster", "Local"]),
        "externalTrafficPolicy": st.sampled_from(["Cluster", "Local"]),
        "sessionAffinity": st.sampled_from(["None", "ClientIP"]),
        "ipFamilies": st.just(["IPv6" if ":" in a else "IPv4" for a in ips if a != "None"]),
        "trafficDistribution": st.sampled_from(["PreferClose", "PreferSameNode"]),
        "loadBalancerSourceRanges": st.lists(st.sampled_from(
            ["10.0.0.0/8", " 192.168.0.0/16", "0.0.0.0/0", "2001:db8::/32", "::/0",
             "192.168.99.11/32"]), max_size=3),
        "healthCheckNodePort": st.sampled_from([0, 30000, 32767]),
    }
    for key, strategy in optional.items():
        value = maybe(draw, strategy)
        if value is not None:
            spec[key] = value
    if spec.get("sessionAffinity") == "ClientIP" and draw(st.booleans()):
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": draw(st.sampled_from(
            [1, 60, 10800, 86400]))}}
    metadata = {"name": draw(st.sampled_from(["web", "dns"])),
                "namespace": draw(st.sampled_from(["default", "shop"]))}
    label = maybe(draw, st.sampled_from([SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL]), 0.9)
    if label:
        metadata["labels"] = {label: ""}
    raw = {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec}
    ingress = maybe(draw, st.lists(st.fixed_dictionaries(
        {"ip": st.sampled_from(EXTERNAL)},
        optional={"ipMode": st.sampled_from(["VIP", "Proxy"])}), max_size=2))
    if ingress:
        raw["status"] = {"loadBalancer": {"ingress": ingress}}
    return raw


TERMINATING = {"ready": False, "serving": True, "terminating": True}
CONDITIONS = st.one_of(st.sampled_from([{}, {"ready": False}, TERMINATING, TERMINATING,
                                        {"ready": False, "serving": False, "terminating": True}]),
                       st.fixed_dictionaries({}, optional={
                           key: st.booleans() for key in ("ready", "serving", "terminating")}))
HINTS = st.fixed_dictionaries({}, optional={
    "forZones": st.lists(st.fixed_dictionaries({"name": st.sampled_from(ZONES)}), max_size=2),
    "forNodes": st.lists(st.fixed_dictionaries({"name": st.sampled_from(NODES[:2])}),
                         max_size=2)})


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
    endpoints = []
    for _ in range(draw(st.integers(1, 4))):
        endpoint = {"addresses": [draw(st.sampled_from(ADDRESSES.get(family, ["db.local"])))],
                    "conditions": draw(CONDITIONS)}
        node = draw(st.sampled_from(NODES))
        if node:
            endpoint["nodeName"] = node
        hints = maybe(draw, HINTS)
        if hints is not None:
            endpoint["hints"] = hints
        endpoints.append(endpoint)
    labels = {"kubernetes.io/service-name": meta["name"]}
    if draw(st.integers(0, 9)) == 0:
        labels[HEADLESS_LABEL] = ""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{meta['name']}-{index}", "namespace": meta["namespace"],
                         "labels": labels},
            "addressType": family, "ports": ports, "endpoints": endpoints}


node_dicts = st.builds(
    lambda name, zone, addresses: {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"addresses": [{"type": t, "address": a} for t, a in addresses]}},
    st.sampled_from(NODES[:2]), st.sampled_from(ZONES),
    st.lists(st.tuples(st.sampled_from(["InternalIP", "ExternalIP", "Hostname"]),
                       st.sampled_from(["192.168.0.2", "192.168.1.2", "2001:db8::1", "n1"])),
             max_size=3))
node_port_cidrs = st.lists(st.sampled_from(["192.168.0.0/24", "192.168.0.2/32",
                                            "2001:db8::/64", "10.0.0.0/8"]), max_size=2)


@st.composite
def worlds(draw):
    """Raw services, slices and a node that mostly belong together, some fields broken."""
    services = draw(st.lists(service_dicts(), min_size=1, max_size=3))
    slices = [draw(slice_dicts_for(service, i))
              for service in services for i in range(draw(st.integers(0, 3)))]
    return ([draw(corrupted(raw)) for raw in services],
            [draw(corrupted(raw)) for raw in slices],
            draw(corrupted(draw(node_dicts))), draw(node_port_cidrs))


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


def check_backend_set(backends, family, node_name=None):
    for backend in backends:
        assert backend.address.version == family
        assert 1 <= backend.port <= 65535
        if node_name is not None:
            assert node_name and backend.node_name == node_name, "a Local set holds local ones"
    assert len({b.state for b in backends}) <= 1, "terminating only when none is ready"
    keys = [(b.address, b.port) for b in backends]
    assert len(keys) == len(set(keys)), "backends de-duplicated"
    assert list(backends) == sorted(backends, key=lambda b: b.sort_key())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_random_objects_never_break_the_model(world):
    raw_services, raw_slices, raw_node, cidrs = world
    # One object per key, the last one winning, as every source delivers them.
    services = list({s.key: s for s in parsed(raw_services)}.values())
    slices = list({s.key: s for s in parsed(raw_slices)}.values())
    nodes = parsed([raw_node])
    assert all(isinstance(s, Service) for s in services)
    assert all(isinstance(s, EndpointSlice) for s in slices)
    assert all(isinstance(n, Node) for n in nodes)
    node = NodeContext.from_node(nodes[0] if nodes else None, "n1",
                                 node_port_cidrs=tuple(map(ipaddress.ip_network, cidrs)))
    by_key = {(s.namespace, s.name): s for s in services}
    for (name, family), sps in desired_state(services, slices, node).items():
        assert family in (4, 6) and sps.family == family and sps.name == name
        service = by_key[name.namespace, name.name]
        assert not service.excluded_by_label and not service.headless
        assert service.type != "ExternalName"
        kinds = [f.kind for f in sps.frontends]
        assert kinds.count(FrontendKind.CLUSTER_IP) == 1
        claimed = [(f.address, f.port, f.protocol) for f in sps.frontends]
        assert len(claimed) == len(set(claimed)), "one frontend per address, port, protocol"
        assert list(sps.frontends) == sorted(sps.frontends, key=lambda f: f.sort_key())
        for frontend in sps.frontends:
            assert frontend.address.version == family
            assert 1 <= frontend.port <= 65535
            assert frontend.protocol == name.protocol
            if frontend.kind is FrontendKind.NODE_PORT:
                assert frontend.address in node.node_port_ips(family), "NodePort on node IPs"
            elif frontend.kind is FrontendKind.EXTERNAL_IP:
                assert frontend.address in service.external_ips
            elif frontend.kind is FrontendKind.LOAD_BALANCER:
                assert any(i.ip == frontend.address and i.ip_mode == "VIP"
                           for i in service.load_balancer_ingress)
            else:
                assert frontend.address in service.cluster_ips
        local = service.internal_traffic_policy == "Local"
        check_backend_set(sps.backends, family, node.node_name if local else None)
        check_backend_set(sps.external_backends, family)
        check_backend_set(sps.outside_backends, family)
        if not any(k.external for k in kinds):
            assert not sps.outside_backends
        if sps.backends or sps.external_backends or sps.outside_backends:
            assert sps.has_any_endpoints
        assert 0 <= sps.session_affinity_timeout <= 86400
        assert (sps.session_affinity_timeout > 0) == (service.session_affinity_timeout > 0)
        assert all(r.version == family for r in sps.source_ranges)
        assert list(sps.source_ranges) == sorted(set(sps.source_ranges), key=lambda r: (
            int(r.network_address), r.prefixlen)), "sorted, de-duplicated"
        assert all(r.prefixlen for r in sps.source_ranges), "a /0 means no restriction"
        assert set(sps.source_ranges) <= set(service.load_balancer_source_ranges) | {
            ipaddress.ip_network(i.ip) for i in service.load_balancer_ingress}


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                               max_size=3),
    max_leaves=20)
kinds = st.sampled_from([("v1", "Service"), ("discovery.k8s.io/v1", "EndpointSlice"),
                         ("v1", "Node")])


@settings(max_examples=300, deadline=None)
@given(kinds, st.dictionaries(st.sampled_from(["metadata", "spec", "ports", "endpoints",
                                               "addressType", "status"]), json_values))
def test_arbitrary_json_raises_only_invalid_object(kind, body):
    raw = {"apiVersion": kind[0], "kind": kind[1], **body}
    try:
        parse_object(raw)
    except InvalidObject:
        pass


spec_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-1, 70000), st.sampled_from(
        ["Local", "Cluster", "ClientIP", "VIP", "Proxy", "1.2.3.4", "fd00::1", "TCP", ""])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["ip", "ipMode", "clientIP", "timeoutSeconds", "name", "port",
                         "nodePort", "ingress", "loadBalancer", "forZones", "hints"]),
        inner, max_size=3),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(
    ["externalIPs", "sessionAffinity", "sessionAffinityConfig", "internalTrafficPolicy",
     "externalTrafficPolicy", "ipFamilies", "allocateLoadBalancerNodePorts", "type"]),
    spec_values), spec_values)
def test_arbitrary_service_fields_raise_only_invalid_object(spec, status):
    raw = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "nodePort": 30080}],
                    **spec}, "status": {"loadBalancer": status}}
    try:
        service = parse_object(raw)
    except InvalidObject:
        return
    desired_state([service], [], NodeContext("n1", (ip("10.96.0.99"),)))
