"""CategorizeEndpoints ported: which endpoints serve Cluster and Local traffic policy on this
node, with zone and node hints. Cases mirror kube-proxy's pkg/proxy/topology_test.go."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import pytest

from agent.model.endpoints import EndpointInfo
from agent.model.service import ServicePortInfo
from agent.model.topology import (
    NO_TOPOLOGY,
    PREFER_SAME_NODE,
    PREFER_SAME_ZONE,
    categorize_endpoints,
    topology_mode,
)
from agent.model.types import Backend, BackendState, Protocol, ServicePortName

NODE = "test-node"


def ep(endpoint: str, ready=False, serving=False, terminating=False, is_local=False,
       zone_hints=(), node_hints=()) -> EndpointInfo:
    """BaseEndpointInfo as the Go tests write it: unset conditions are false there."""
    address, port = endpoint.rsplit(":", 1)
    state = BackendState.READY if ready else BackendState.TERMINATING
    return EndpointInfo(Backend(ipaddress.ip_address(address), int(port), state,
                                NODE if is_local else ""),
                        ready, serving, terminating, frozenset(zone_hints),
                        frozenset(node_hints))


def port_info(internal_local=False, external_local=False, node_port=0) -> ServicePortInfo:
    """BaseServicePortInfo{internalPolicyLocal, externalPolicyLocal, nodePort}."""
    return ServicePortInfo(ServicePortName("ns", "svc", "", Protocol.TCP), 4, (),
                           externally_accessible=node_port != 0,
                           internal_policy_local=internal_local,
                           external_policy_local=external_local,
                           session_affinity_timeout=0)


@dataclass
class Case:
    name: str
    service: ServicePortInfo
    endpoints: list[EndpointInfo]
    cluster: set[str] | None      # None: the port never uses this kind of endpoints
    local: set[str] | None
    all: set[str] | None = None   # only when both are set and differ from either
    only_remote: bool = False     # hasAnyEndpoints despite no reachable endpoint
    zone: str | None = "zone-a"   # the node's topology.kubernetes.io/zone; None: no label
    node_name: str = NODE
    extra: dict = field(default_factory=dict)


def zoned(zone_of: dict[str, str], ready=True, local=()):
    return [ep(e, ready=ready, zone_hints=[z] if z else [], is_local=e in local)
            for e, z in zone_of.items()]


FOUR = {"10.1.2.3:80": "zone-a", "10.1.2.4:80": "zone-b", "10.1.2.5:80": "zone-c",
        "10.1.2.6:80": "zone-a"}

CASES = [
    Case("should use topology since all endpoints have hints, node has a zone label and and "
         "there are endpoints for the node's zone",
         port_info(), zoned(FOUR), cluster={"10.1.2.3:80", "10.1.2.6:80"}, local=None),
    Case("externalTrafficPolicy: Local, topology ignored for Local endpoints",
         port_info(external_local=True, node_port=8080),
         zoned(FOUR, local={"10.1.2.3:80", "10.1.2.4:80"}),
         cluster={"10.1.2.3:80", "10.1.2.6:80"}, local={"10.1.2.3:80", "10.1.2.4:80"},
         all={"10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"}),
    Case("internalTrafficPolicy: Local, topology ignored for Local endpoints",
         port_info(internal_local=True, node_port=8080),
         zoned(FOUR, local={"10.1.2.3:80", "10.1.2.4:80"}),
         cluster={"10.1.2.3:80", "10.1.2.6:80"}, local={"10.1.2.3:80", "10.1.2.4:80"},
         all={"10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"}),
    Case("empty node labels",
         port_info(), zoned({"10.1.2.3:80": "zone-a"}), cluster={"10.1.2.3:80"}, local=None,
         zone=None),
    Case("empty zone label",
         port_info(), zoned({"10.1.2.3:80": "zone-a"}), cluster={"10.1.2.3:80"}, local=None,
         zone=""),
    Case("node in different zone, no endpoint filtering",
         port_info(), zoned({"10.1.2.3:80": "zone-a"}), cluster={"10.1.2.3:80"}, local=None,
         zone="zone-b"),
    Case("unready endpoint",
         port_info(),
         zoned({e: z for e, z in FOUR.items() if e != "10.1.2.6:80"})
         + [ep("10.1.2.6:80", zone_hints=["zone-a"])],
         cluster={"10.1.2.3:80"}, local=None),
    Case("only unready endpoints in same zone (should not filter)",
         port_info(),
         [ep("10.1.2.3:80", zone_hints=["zone-a"]),
          ep("10.1.2.4:80", ready=True, zone_hints=["zone-b"]),
          ep("10.1.2.5:80", ready=True, zone_hints=["zone-c"]),
          ep("10.1.2.6:80", zone_hints=["zone-a"])],
         cluster={"10.1.2.4:80", "10.1.2.5:80"}, local=None),
    Case("missing hints, no filtering applied",
         port_info(), zoned({**FOUR, "10.1.2.5:80": ""}),
         cluster=set(FOUR), local=None),
    Case("multiple hints per endpoint, filtering includes any endpoint with zone included",
         port_info(),
         [ep("10.1.2.3:80", ready=True, zone_hints=["zone-a", "zone-b", "zone-c"]),
          ep("10.1.2.4:80", ready=True, zone_hints=["zone-b", "zone-c"]),
          ep("10.1.2.5:80", ready=True, zone_hints=["zone-b", "zone-d"]),
          ep("10.1.2.6:80", ready=True, zone_hints=["zone-c"])],
         cluster={"10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"}, local=None, zone="zone-c"),
    Case("conflicting topology and localness require merging allEndpoints",
         port_info(external_local=True, node_port=8080),
         zoned({"10.0.0.0:80": "zone-a", "10.0.0.1:80": "zone-b", "10.0.0.2:80": "zone-a",
                "10.0.0.3:80": "zone-b"}, local={"10.0.0.0:80", "10.0.0.1:80"}),
         cluster={"10.0.0.0:80", "10.0.0.2:80"}, local={"10.0.0.0:80", "10.0.0.1:80"},
         all={"10.0.0.0:80", "10.0.0.1:80", "10.0.0.2:80"}),
    Case("internalTrafficPolicy: Local, with empty endpoints",
         port_info(internal_local=True), [], cluster=None, local=set()),
    Case("internalTrafficPolicy: Local, but all endpoints are remote",
         port_info(internal_local=True),
         [ep("10.0.0.0:80", ready=True), ep("10.0.0.1:80", ready=True)],
         cluster=None, local=set(), only_remote=True),
    Case("internalTrafficPolicy: Local, all endpoints are local",
         port_info(internal_local=True),
         [ep("10.0.0.0:80", ready=True, is_local=True),
          ep("10.0.0.1:80", ready=True, is_local=True)],
         cluster=None, local={"10.0.0.0:80", "10.0.0.1:80"}),
    Case("internalTrafficPolicy: Local, some endpoints are local",
         port_info(internal_local=True),
         [ep("10.0.0.0:80", ready=True, is_local=True), ep("10.0.0.1:80", ready=True)],
         cluster=None, local={"10.0.0.0:80"}),
    Case("Cluster traffic policy, endpoints not Ready",
         port_info(), [ep("10.0.0.0:80"), ep("10.0.0.1:80")], cluster=set(), local=None),
    Case("Cluster traffic policy, some endpoints are Ready",
         port_info(), [ep("10.0.0.0:80"), ep("10.0.0.1:80", ready=True)],
         cluster={"10.0.0.1:80"}, local=None),
    Case("Cluster traffic policy, all endpoints are terminating",
         port_info(),
         [ep("10.0.0.0:80", serving=True, terminating=True, is_local=True),
          ep("10.0.0.1:80", serving=True, terminating=True)],
         cluster={"10.0.0.0:80", "10.0.0.1:80"}, local=None),
    Case("iTP: Local, eTP: Cluster, some endpoints local",
         port_info(internal_local=True, node_port=8080),
         [ep("10.0.0.0:80", ready=True, is_local=True), ep("10.0.0.1:80", ready=True)],
         cluster={"10.0.0.0:80", "10.0.0.1:80"}, local={"10.0.0.0:80"},
         all={"10.0.0.0:80", "10.0.0.1:80"}),
    Case("iTP: Cluster, eTP: Local, some endpoints local",
         port_info(external_local=True, node_port=8080),
         [ep("10.0.0.0:80", ready=True, is_local=True), ep("10.0.0.1:80", ready=True)],
         cluster={"10.0.0.0:80", "10.0.0.1:80"}, local={"10.0.0.0:80"},
         all={"10.0.0.0:80", "10.0.0.1:80"}),
    Case("iTP: Local, eTP: Local, some endpoints local",
         port_info(internal_local=True, external_local=True, node_port=8080),
         [ep("10.0.0.0:80", ready=True, is_local=True), ep("10.0.0.1:80", ready=True)],
         cluster={"10.0.0.0:80", "10.0.0.1:80"}, local={"10.0.0.0:80"},
         all={"10.0.0.0:80", "10.0.0.1:80"}),
    Case("iTP: Local, eTP: Local, all endpoints remote",
         port_info(internal_local=True, external_local=True, node_port=8080),
         [ep("10.0.0.0:80", ready=True), ep("10.0.0.1:80", ready=True)],
         cluster={"10.0.0.0:80", "10.0.0.1:80"}, local=set(),
         all={"10.0.0.0:80", "10.0.0.1:80"}),
    Case("iTP: Local, eTP: Local, all endpoints remote and terminating",
         port_info(internal_local=True, external_local=True, node_port=8080),
         [ep("10.0.0.0:80", serving=True, terminating=True),
          ep("10.0.0.1:80", serving=True, terminating=True)],
         cluster={"10.0.0.0:80", "10.0.0.1:80"}, local=set(),
         all={"10.0.0.0:80", "10.0.0.1:80"}, only_remote=True),
    Case("iTP: Cluster, eTP: Local, with terminating endpoints",
         port_info(external_local=True, node_port=8080),
         [ep("10.0.0.0:80", ready=True),
          ep("10.0.0.1:80", is_local=True),
          ep("10.0.0.2:80", serving=True, terminating=True, is_local=True),
          ep("10.0.0.3:80", serving=True, terminating=True)],
         cluster={"10.0.0.0:80"}, local={"10.0.0.2:80"}, all={"10.0.0.0:80", "10.0.0.2:80"}),
    Case("externalTrafficPolicy ignored if not externally accessible",
         port_info(external_local=True),
         [ep("10.0.0.0:80", ready=True), ep("10.0.0.1:80", ready=True, is_local=True)],
         cluster={"10.0.0.0:80", "10.0.0.1:80"}, local=None,
         all={"10.0.0.0:80", "10.0.0.1:80"}),
    Case("no cluster endpoints for iTP:Local internal-only service",
         port_info(internal_local=True),
         [ep("10.0.0.0:80", ready=True), ep("10.0.0.1:80", ready=True, is_local=True)],
         cluster=None, local={"10.0.0.1:80"}, all={"10.0.0.1:80"}),

    # Node hints. The stored topology_test.go predates them; these follow the branches of
    # topology.go topologyModeFromHints and availableForTopology line by line.
    Case("topologyModeFromHints: every ready endpoint has a node hint and one names this "
         "node: PreferSameNode",
         port_info(),
         [ep("10.0.0.1:80", ready=True, node_hints=[NODE], zone_hints=["zone-a"]),
          ep("10.0.0.2:80", ready=True, node_hints=["node-2"], zone_hints=["zone-a"]),
          ep("10.0.0.3:80", node_hints=[], zone_hints=[])],   # unready: not consulted
         cluster={"10.0.0.1:80"}, local=None),
    Case("topologyModeFromHints: a ready endpoint without a node hint: same-zone instead",
         port_info(),
         [ep("10.0.0.1:80", ready=True, node_hints=[NODE], zone_hints=["zone-a"]),
          ep("10.0.0.2:80", ready=True, zone_hints=["zone-a"]),
          ep("10.0.0.3:80", ready=True, node_hints=["node-3"], zone_hints=["zone-b"])],
         cluster={"10.0.0.1:80", "10.0.0.2:80"}, local=None),
    Case("topologyModeFromHints: node hints, none for this node: same-zone instead",
         port_info(),
         [ep("10.0.0.1:80", ready=True, node_hints=["node-1"], zone_hints=["zone-a"]),
          ep("10.0.0.2:80", ready=True, node_hints=["node-2"], zone_hints=["zone-b"])],
         cluster={"10.0.0.1:80"}, local=None),
    Case("topologyModeFromHints: node hints, none for this node, no zone hints: no topology",
         port_info(),
         [ep("10.0.0.1:80", ready=True, node_hints=["node-1"]),
          ep("10.0.0.2:80", ready=True, node_hints=["node-2"])],
         cluster={"10.0.0.1:80", "10.0.0.2:80"}, local=None),
    Case("topologyModeFromHints: no ready endpoints: no topology, terminating fallback",
         port_info(),
         [ep("10.0.0.1:80", serving=True, terminating=True, node_hints=["node-1"]),
          ep("10.0.0.2:80", serving=True, terminating=True, node_hints=[NODE])],
         cluster={"10.0.0.1:80", "10.0.0.2:80"}, local=None),
    Case("PreferSameNode applies to Cluster endpoints only; Local ones ignore it",
         port_info(internal_local=True, node_port=30080),
         [ep("10.0.0.1:80", ready=True, node_hints=["node-1"], is_local=True),
          ep("10.0.0.2:80", ready=True, node_hints=[NODE])],
         cluster={"10.0.0.2:80"}, local={"10.0.0.1:80"},
         all={"10.0.0.1:80", "10.0.0.2:80"}),
    Case("node hints without a node name never match",
         port_info(),
         [ep("10.0.0.1:80", ready=True, node_hints=[NODE]),
          ep("10.0.0.2:80", ready=True, node_hints=["node-2"])],
         cluster={"10.0.0.1:80", "10.0.0.2:80"}, local=None, node_name=""),
]


def strings(backends) -> set[str] | None:
    return None if backends is None else {f"{b.address}:{b.port}" for b in backends}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_categorize_endpoints(case):
    info = case.service
    cluster, local, has_any = categorize_endpoints(
        case.endpoints, info.uses_cluster_endpoints, info.uses_local_endpoints,
        case.node_name, case.zone or "")
    assert strings(cluster) == case.cluster
    assert strings(local) == case.local
    # topology_test.go: allEndpoints is whichever list is set, or the given union.
    if case.cluster is not None and case.local is None:
        expected_all = case.cluster
    elif case.local is not None and case.cluster is None:
        expected_all = case.local
    else:
        expected_all = case.all
    assert (strings(cluster) or set()) | (strings(local) or set()) == expected_all
    assert has_any == (len(expected_all) > 0 or case.only_remote)
    # The hinted=False shortcut may only be taken when nothing is hinted.
    if not any(e.zone_hints or e.node_hints for e in case.endpoints):
        assert categorize_endpoints(case.endpoints, info.uses_cluster_endpoints,
                                    info.uses_local_endpoints, case.node_name,
                                    case.zone or "", hinted=False) == (cluster, local, has_any)


MODES = [
    ("no endpoints", [], NO_TOPOLOGY),
    ("all zone-hinted, one for us", zoned(FOUR), PREFER_SAME_ZONE),
    ("all node-hinted, one for us",
     [ep("10.0.0.1:80", ready=True, node_hints=[NODE]),
      ep("10.0.0.2:80", ready=True, node_hints=["x"])], PREFER_SAME_NODE),
    ("node hints win over zone hints",
     [ep("10.0.0.1:80", ready=True, node_hints=[NODE], zone_hints=["zone-b"]),
      ep("10.0.0.2:80", ready=True, node_hints=["x"], zone_hints=["zone-a"])],
     PREFER_SAME_NODE),
    ("zone hints for other zones only", zoned({"10.0.0.1:80": "zone-b"}), NO_TOPOLOGY),
]


@pytest.mark.parametrize("name,endpoints,want", MODES, ids=[m[0] for m in MODES])
def test_topology_mode(name, endpoints, want):
    assert topology_mode(endpoints, NODE, "zone-a") == want


def test_cluster_and_local_keep_the_endpoint_order():
    endpoints = [ep(f"10.0.0.{i}:80", ready=True, is_local=i % 2 == 0) for i in range(1, 7)]
    cluster, local, _ = categorize_endpoints(endpoints, True, True, NODE, "")
    assert [str(b.address) for b in cluster] == [f"10.0.0.{i}" for i in range(1, 7)]
    assert [str(b.address) for b in local] == ["10.0.0.2", "10.0.0.4", "10.0.0.6"]
