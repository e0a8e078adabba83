"""Service health checks against kube-proxy: which services get a healthCheckNodePort, and
LocalReadyEndpoints as endpoints_test.go TestUpdateEndpointsMap expects it, case by case."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings

from agent.model import NodeContext
from agent.model.health import ServiceHealth, by_port, service_health, service_health_parts
from agent.model.objects import parse_endpoint_slice, parse_service
from agent.model.types import HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL
from tests.unit.test_model_random_objects import parsed, worlds

TEST_HOSTNAME = "test-hostname"        # endpoints_test.go's testHostname
NODE = NodeContext(TEST_HOSTNAME)


def lb_local(ns: str, name: str, port: int, cluster_ips=("172.30.0.41",), **spec) -> dict:
    """A LoadBalancer service with externalTrafficPolicy Local and a healthCheckNodePort."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": ns, "name": name},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                     "healthCheckNodePort": port, "clusterIP": cluster_ips[0],
                     "clusterIPs": list(cluster_ips),
                     "ports": [{"name": "p", "port": 80, "nodePort": 30080}], **spec}}


def endpoint(address: str, local: bool = False, **conditions) -> dict:
    return {"addresses": [address], **({"nodeName": TEST_HOSTNAME} if local else {}),
            **({"conditions": conditions} if conditions else {})}


def slice_of(ns: str, service: str, index: int, endpoints: list[dict],
             ports=(("p11", 11),), address_type="IPv4", labels=None) -> dict:
    """makeTestEndpointSlice(ns, service, index, ...) with UDP ports, as the Go test has."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": ns, "name": f"{service}-{index}",
                         "labels": {"kubernetes.io/service-name": service, **(labels or {})}},
            "addressType": address_type,
            "ports": [{"name": n, "port": p, "protocol": "UDP"} for n, p in ports],
            "endpoints": endpoints}


@dataclass
class Case:
    name: str
    services: list[dict]
    slices: list[dict]
    want: dict[int, tuple[str, int]]           # port -> ("ns/name", local endpoints)
    node: NodeContext = field(default_factory=lambda: NODE)


EP1, EP2 = lb_local("ns1", "ep1", 30001), lb_local("ns2", "ep2", 30002)

CASES = [
    # --- endpoints_test.go TestUpdateEndpointsMap: expectedLocalEndpoints ---------------
    Case("empty", [EP1], [], {30001: ("ns1/ep1", 0)}),
    Case("no change, unnamed port",
         [EP1], [slice_of("ns1", "ep1", 1, [endpoint("1.1.1.1")], ports=[("", 11)])],
         {30001: ("ns1/ep1", 0)}),
    Case("no change, named port, local",
         [EP1], [slice_of("ns1", "ep1", 1, [endpoint("1.1.1.1", local=True)])],
         {30001: ("ns1/ep1", 1)}),
    Case("no change, multiple slices",
         [EP1], [slice_of("ns1", "ep1", 1, [endpoint("1.1.1.1")]),
                 slice_of("ns1", "ep1", 2, [endpoint("1.1.1.2")], ports=[("p12", 12)])],
         {30001: ("ns1/ep1", 0)}),
    # one local address on two ports is one endpoint ("10.0.0.1:80 and 10.0.0.1:443 ... 1")
    Case("no change, multiple slices, multiple ports, local",
         [EP1], [slice_of("ns1", "ep1", 1, [endpoint("1.1.1.1", local=True)],
                          ports=[("p11", 11), ("p12", 12)]),
                 slice_of("ns1", "ep1", 2, [endpoint("1.1.1.3")], ports=[("p13", 13)])],
         {30001: ("ns1/ep1", 1)}),
    Case("no change, multiple services, slices, IPs, and ports",
         [EP1, EP2],
         [slice_of("ns1", "ep1", 1, [endpoint("1.1.1.1"), endpoint("1.1.1.2", local=True)],
                   ports=[("p11", 11), ("p12", 12)]),
          slice_of("ns1", "ep1", 2, [endpoint("1.1.1.3"), endpoint("1.1.1.4", local=True)],
                   ports=[("p13", 13), ("p14", 14)]),
          slice_of("ns2", "ep2", 1, [endpoint("2.2.2.1"), endpoint("2.2.2.2", local=True)],
                   ports=[("p21", 21), ("p22", 22)])],
         {30001: ("ns1/ep1", 2), 30002: ("ns2/ep2", 1)}),

    # --- endpoints.go getLocalReadyEndpointIPs: which endpoints count -------------------
    Case("terminating local endpoints are not counted, even serving ones",
         [EP1], [slice_of("ns1", "ep1", 1, [
             endpoint("1.1.1.1", local=True, ready=False, serving=True, terminating=True),
             endpoint("1.1.1.2", local=True, ready=False)])],
         {30001: ("ns1/ep1", 0)}),
    Case("an absent ready condition counts as ready",
         [EP1], [slice_of("ns1", "ep1", 1, [endpoint("1.1.1.1", local=True, serving=True)])],
         {30001: ("ns1/ep1", 1)}),
    Case("endpoints counted per service, whatever port names the service has",
         [EP1], [slice_of("ns1", "ep1", 1, [endpoint("1.1.1.1", local=True)],
                          ports=[("not-a-service-port", 11)])],
         {30001: ("ns1/ep1", 1)}),
    Case("a slice without ports contributes nothing (no EndpointsMap entry)",
         [EP1], [slice_of("ns1", "ep1", 1, [endpoint("1.1.1.1", local=True)], ports=[])],
         {30001: ("ns1/ep1", 0)}),
    Case("the same local endpoint in two slices is counted once",
         [EP1], [slice_of("ns1", "ep1", 1, [endpoint("1.1.1.1", local=True)]),
                 slice_of("ns1", "ep1", 2, [endpoint("1.1.1.1", local=True)])],
         {30001: ("ns1/ep1", 1)}),
    Case("without a node name nothing is local",
         [EP1], [slice_of("ns1", "ep1", 1, [endpoint("1.1.1.1", local=True)])],
         {30001: ("ns1/ep1", 0)}, node=NodeContext()),
    Case("another service's slices do not count",
         [EP1], [slice_of("ns1", "other", 1, [endpoint("1.1.1.1", local=True)]),
                 slice_of("ns2", "ep1", 1, [endpoint("1.1.1.2", local=True)])],
         {30001: ("ns1/ep1", 0)}),
    Case("a slice labelled for another proxy is never seen",          # server.go selector
         [EP1], [slice_of("ns1", "ep1", 1, [endpoint("1.1.1.1", local=True)],
                          labels={SERVICE_PROXY_NAME_LABEL: "other"})],
         {30001: ("ns1/ep1", 0)}),

    # --- serviceport.go newBaseServiceInfo: apiservice.NeedsHealthCheck -----------------
    Case("externalTrafficPolicy Cluster: no health check",
         [lb_local("ns1", "ep1", 30001, externalTrafficPolicy="Cluster")], [], {}),
    Case("type NodePort with eTP Local: no health check",
         [lb_local("ns1", "ep1", 30001, type="NodePort")], [], {}),
    Case("\"Service has no healthcheck nodeport\": none served",
         [lb_local("ns1", "ep1", 0)], [], {}),
    Case("headless: not proxied, no health check",                    # ShouldSkipService
         [lb_local("ns1", "ep1", 30001, cluster_ips=("None",))], [], {}),
    Case("a service labelled for another proxy is never seen",
         [{**EP1, "metadata": {"namespace": "ns1", "name": "ep1",
                               "labels": {HEADLESS_LABEL: ""}}}], [], {}),
    Case("two services claiming one port: the first by namespace/name wins",
         [lb_local("ns2", "b", 30001), lb_local("ns1", "a", 30001)],
         [slice_of("ns2", "b", 1, [endpoint("1.1.1.1", local=True)])],
         {30001: ("ns1/a", 0)}),
]


def run(case: Case) -> dict[int, tuple[str, int]]:
    services = [parse_service(s) for s in case.services]
    slices = [parse_endpoint_slice(s) for s in case.slices]
    return {port: (f"{h.namespace}/{h.name}", h.local_endpoints)
            for port, h in service_health(services, slices, case.node).items()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_service_health(case):
    assert run(case) == case.want


DUAL = lb_local("ns1", "ep1", 30001, cluster_ips=("fd00:172:30::41", "172.30.0.41"))


def test_dual_stack_counts_each_family_apart():
    """One proxier (so one health server) per family in kube-proxy: since #137370 each
    answers on its own family's sockets with its own family's count."""
    slices = [slice_of("ns1", "ep1", 1, [endpoint("1.1.1.1", local=True),
                                         endpoint("1.1.1.2", local=True)]),
              slice_of("ns1", "ep1", 2, [endpoint("fd00::1", local=True)],
                       address_type="IPv6")]
    [(port, health)] = service_health([parse_service(DUAL)],
                                      [parse_endpoint_slice(s) for s in slices], NODE).items()
    assert port == 30001
    assert health.by_family == ((6, 1), (4, 2))       # the primary family first
    assert health.local_endpoints == 1                # the primary family's count
    assert (health.local_endpoints_for(4), health.local_endpoints_for(6)) == (2, 1)


def test_single_stack_answers_either_family_with_its_count():
    [health] = service_health([parse_service(EP1)], [parse_endpoint_slice(slice_of(
        "ns1", "ep1", 1, [endpoint("1.1.1.1", local=True)]))], NODE).values()
    assert (health.local_endpoints_for(4), health.local_endpoints_for(6)) == (1, 1)


def test_endpoints_of_a_family_the_service_lacks_do_not_count():
    slices = [slice_of("ns1", "ep1", 1, [endpoint("fd00::1", local=True)],
                       address_type="IPv6")]
    [health] = service_health([parse_service(EP1)],
                              [parse_endpoint_slice(s) for s in slices], NODE).values()
    assert health == ServiceHealth("ns1", "ep1", 0, ((4, 0),))


def test_parts_by_service_merge_to_the_same_answer():
    """What an incremental sync relies on: health of each service computed alone, with only
    its own slices, merges (by_port) into what the whole world gives."""
    case = next(c for c in CASES if c.name.startswith("no change, multiple services"))
    services = [parse_service(s) for s in case.services]
    slices = [parse_endpoint_slice(s) for s in case.slices]
    parts = {}
    for service in services:
        own = [s for s in slices if s.service_name == service.name]
        parts.update(service_health_parts([service], own, NODE))
    assert by_port(parts) == service_health(services, slices, NODE)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_random_worlds_give_sane_health_checks(world):
    raw_services, raw_slices, _, _ = world
    services = list({s.key: s for s in parsed(raw_services)}.values())
    slices = list({s.key: s for s in parsed(raw_slices)}.values())
    health = service_health(services, slices, NodeContext("n1"))
    by_name = {(s.namespace, s.name): s for s in services}
    for port, checked in health.items():
        service = by_name[checked.namespace, checked.name]
        assert port == service.health_check_node_port != 0
        assert (service.type, service.external_traffic_policy) == ("LoadBalancer", "Local")
        assert not service.headless and not service.excluded_by_label
        assert [f for f, _ in checked.by_family] == [ip.version for ip in service.cluster_ips]
        local = {e.addresses[0] for s in slices if (s.namespace, s.service_name) ==
                 (checked.namespace, checked.name) and s.ports and not s.excluded_by_label
                 for e in s.endpoints if e.ready and e.node_name == "n1"}
        for family, count in checked.by_family:
            # at most: one address in two slices may be kept as its other copy's node
            assert count <= len({a for a in local if a.version == family})
