"""kube-proxy's packet flow tests run against the whole model (agent.model: service.py,
endpoints.py and topology.py together): which endpoints a packet from a pod, the node or an
outside client reaches through each frontend."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.model import desired_state
from tests.helpers import (
    NODE_IP,
    OUTSIDE,
    POD,
    TEST_EXTERNAL_CLIENT_BLOCKED,
    TEST_NODE_IP,
    TEST_NODE_IP_ALT,
    TEST_NODE_IPV6,
    TEST_NODE_IPV6_ALT,
    TEST_NODE_NAME,
    at,
    fake_node,
    flow,
    frontends,
    make_service,
    make_slice,
)

# pkg/proxy/nftables/proxier_test.go sends packets from a pod, the node or an outside client
# through the rules and reports which endpoints they can reach. Here the same question goes
# to the desired state: the frontend the packet hits, and backends_for(kind, from_outside)
# (tests.helpers.flow). Names, addresses and expected outputs are kube-proxy's
# (NewFakeProxier's conventions, tests.helpers).


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
