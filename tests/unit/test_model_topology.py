"""Traffic policies and topology hints through the model (agent/model/topology.py via
desired_state): kube-proxy's internal/external traffic policy and terminating endpoint flows,
and zone and node hints with this node's zone and name."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.model import NodeContext, desired_state
from agent.model.objects import parse_node, parse_service
from tests.helpers import (
    OUTSIDE,
    POD,
    TEST_NODE_IP,
    TEST_NODE_NAME,
    at,
    fake_node,
    flow,
    ip,
    make_service,
    make_slice,
)

# --- traffic policies: kube-proxy's per-subtest flows ---------------------------------------

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
