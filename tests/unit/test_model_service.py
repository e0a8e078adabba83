"""The Service side of the model (agent/model/service.py): every frontend of a service port,
loadBalancerSourceRanges, and NodePort addresses from this node (NodeContext). Tables mirror
servicechangetracker_test.go, serviceport.go and proxyutil."""
from __future__ import annotations

import ipaddress

import pytest

from agent.model import NodeContext, desired_state
from agent.model.objects import parse_node
from agent.model.types import (
    FrontendKind,
    Node,
)
from tests.helpers import (
    TEST_EXTERNAL_IP,
    TEST_NODE_IP,
    TEST_NODE_IP_ALT,
    TEST_NODE_IPS,
    TEST_NODE_IPV6,
    TEST_NODE_IPV6_ALT,
    TEST_NODE_NAME,
    at,
    fake_node,
    frontends,
    ip,
    make_service,
    make_slice,
)

# --- frontends: servicechangetracker_test.go TestServiceToServiceMap -----------------------

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
