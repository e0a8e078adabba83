"""The lab writes Services and EndpointSlices the model accepts: single-stack of either family
and dual-stack, with ipFamilies and the slices' addressType as the API server has them."""
from __future__ import annotations

from agent.model import desired_state
from agent.model.objects import parse_object
from agent.model.types import EndpointSlice, Service
from lab import manifests

PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
SLICE_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"}]


def states(*objects: dict) -> dict:
    parsed = [parse_object(o) for o in objects]
    services = [o for o in parsed if isinstance(o, Service)]
    slices = [o for o in parsed if isinstance(o, EndpointSlice)]
    return {family: state for (_, family), state in desired_state(services, slices).items()}


def addresses(state) -> tuple[set[str], set[str]]:
    return ({str(f.address) for f in state.frontends},
            {str(b.address) for b in state.backends})


def test_an_ipv6_service_and_slice():
    service = manifests.service("web6", "fd00:10:96::10", PORTS)
    assert service["spec"]["ipFamilies"] == ["IPv6"]
    assert service["spec"]["ipFamilyPolicy"] == "SingleStack"
    endpoint_slice = manifests.endpoint_slice("web6", ["fd00:10:244:1::2"], SLICE_PORTS)
    assert endpoint_slice["addressType"] == "IPv6"
    by_family = states(service, endpoint_slice)
    assert set(by_family) == {6}
    assert addresses(by_family[6]) == ({"fd00:10:96::10"}, {"fd00:10:244:1::2"})


def test_a_dual_stack_service_with_one_slice_per_family():
    service = manifests.service("dual", ["10.96.0.20", "fd00:10:96::20"], PORTS)
    assert service["spec"]["clusterIP"] == "10.96.0.20"
    assert service["spec"]["ipFamilies"] == ["IPv4", "IPv6"]
    assert service["spec"]["ipFamilyPolicy"] == "RequireDualStack"
    by_family = states(
        service,
        manifests.endpoint_slice("dual", ["10.244.1.2"], SLICE_PORTS, name="dual-ipv4"),
        manifests.endpoint_slice("dual", ["fd00:10:244:1::2"], SLICE_PORTS, name="dual-ipv6"))
    assert addresses(by_family[4]) == ({"10.96.0.20"}, {"10.244.1.2"})
    assert addresses(by_family[6]) == ({"fd00:10:96::20"}, {"fd00:10:244:1::2"})


def test_an_ipv4_service_is_unchanged_apart_from_its_family():
    service = manifests.service("web", "10.96.0.10", PORTS)
    assert service["spec"]["clusterIPs"] == ["10.96.0.10"]
    assert service["spec"]["ipFamilies"] == ["IPv4"]
    assert manifests.endpoint_slice("web", [], SLICE_PORTS)["addressType"] == "IPv4"

