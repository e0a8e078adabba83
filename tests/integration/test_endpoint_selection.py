"""Which endpoints a connection from this node gets, with real traffic: kube-proxy's
terminating fallback, and topology hints for this node's zone (Node object in the
manifests) and for this node itself."""
from __future__ import annotations

import pytest

from lab import manifests
from lab.agent_runner import AgentRunner

pytestmark = pytest.mark.integration

VIP = "10.96.0.60"
VIP6 = "fd00:10:96::60"
NODE = "bpfp-node"       # the name AgentRunner gives the agent


def node_object(zone: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": zone}}}


def slice_of(endpoints: list[dict], family: int = 4) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "lab",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": f"IPv{family}",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints}


@pytest.fixture
def node(make_lab, tmp_path):
    lab = make_lab()
    backends = [lab.add_pod(f"backend-{c}") for c in "abc"]
    for pod in backends:
        pod.start_server([8080])
    client = lab.add_pod("client")
    directory = tmp_path / "manifests"
    agent = AgentRunner(lab, directory)
    try:
        yield agent, backends, client, directory
    finally:
        agent.close()


def publish(directory, *objects, vip: str = VIP) -> None:
    service = manifests.service("web", vip, [{"name": "http", "port": 80,
                                              "targetPort": 8080, "protocol": "TCP"}])
    manifests.write(directory, "web.yaml", service, *objects)


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_serving_terminating_endpoints_take_traffic_only_when_none_is_ready(node, family):
    agent, (a, b, c), client, directory = node
    vip = VIP if family == 4 else VIP6

    def ip(pod) -> str:
        return pod.ip if family == 4 else pod.ip6

    terminating = {"ready": False, "serving": True, "terminating": True}
    publish(directory, slice_of([
        {"addresses": [ip(a)], "conditions": terminating, "nodeName": NODE},
        {"addresses": [ip(b)], "conditions": {"ready": True}, "nodeName": NODE},
        {"addresses": [ip(c)], "conditions": {"ready": False, "serving": False,
                                              "terminating": True}, "nodeName": NODE}],
        family), vip=vip)
    agent.start()
    assert client.tcp(vip, 80, count=30).backends() == {b.name}
    publish(directory, slice_of([                           # the ready one goes away
        {"addresses": [ip(a)], "conditions": terminating, "nodeName": NODE},
        {"addresses": [ip(c)], "conditions": {"ready": False, "serving": False,
                                              "terminating": True}, "nodeName": NODE}],
        family), vip=vip)
    agent.wait_until(lambda: agent.kernel_backends(vip, 80) == {ip(a)},
                     "the serving-terminating endpoint in the kernel")
    assert client.tcp(vip, 80, count=30).backends() == {a.name}, \
        "fallback to serving-and-terminating, never to not-serving"


def test_zone_hints_keep_traffic_in_this_nodes_zone(node):
    agent, (a, b, c), client, directory = node

    def endpoint(pod, zone, hint):
        return {"addresses": [pod.ip], "conditions": {"ready": True}, "zone": zone,
                "nodeName": f"node-{zone}", "hints": {"forZones": [{"name": hint}]}}

    publish(directory, node_object("zone-a"), slice_of([
        endpoint(a, "zone-a", "zone-a"), endpoint(b, "zone-b", "zone-b"),
        endpoint(c, "zone-a", "zone-a")]))
    agent.start()
    assert client.tcp(VIP, 80, count=40).backends() == {a.name, c.name}

    # one endpoint without a hint: kube-proxy ignores the hints altogether
    publish(directory, node_object("zone-a"), slice_of([
        endpoint(a, "zone-a", "zone-a"), endpoint(b, "zone-b", "zone-b"),
        {"addresses": [c.ip], "conditions": {"ready": True}, "zone": "zone-a"}]))
    agent.wait_until(lambda: agent.kernel_backends(VIP, 80) == {a.ip, b.ip, c.ip},
                     "hints ignored in the kernel")
    assert client.tcp(VIP, 80, count=60).backends() == {a.name, b.name, c.name}

    # the node moves to zone-b (its Node object changes): traffic follows the hints
    publish(directory, node_object("zone-b"), slice_of([
        endpoint(a, "zone-a", "zone-a"), endpoint(b, "zone-b", "zone-b"),
        endpoint(c, "zone-a", "zone-a")]))
    agent.wait_until(lambda: agent.kernel_backends(VIP, 80) == {b.ip},
                     "zone-b's endpoint alone in the kernel")
    assert client.tcp(VIP, 80, count=30).backends() == {b.name}


def test_node_hints_prefer_this_node(node):
    agent, (a, b, c), client, directory = node

    def endpoint(pod, node_name):
        return {"addresses": [pod.ip], "conditions": {"ready": True}, "nodeName": node_name,
                "hints": {"forNodes": [{"name": node_name}]}}

    publish(directory, slice_of([endpoint(a, "elsewhere"), endpoint(b, NODE),
                                 endpoint(c, "elsewhere")]))
    agent.start()
    assert client.tcp(VIP, 80, count=30).backends() == {b.name}
