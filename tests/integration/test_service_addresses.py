"""Every address of a Service through the socket LB, with real traffic from a pod: the
ClusterIP, the NodePort on the node's address, ExternalIPs and LoadBalancer ingress IPs
(not those with ipMode Proxy), and kube-proxy's traffic policies for traffic that starts
on the node."""
from __future__ import annotations

import time

import pytest

from lab import manifests
from lab.agent_runner import AgentRunner

pytestmark = pytest.mark.integration

VIP, EXTERNAL_IP, LB_IP, PROXY_LB_IP = "10.96.0.50", "10.244.1.250", "10.244.1.251", \
    "10.244.1.252"


def web_service(**spec) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "lab"},
            "spec": {"type": "LoadBalancer", "clusterIP": VIP, "clusterIPs": [VIP],
                     "externalIPs": [EXTERNAL_IP],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                "nodePort": 30080, "protocol": "TCP"},
                               {"name": "dns", "port": 53, "targetPort": 8080,
                                "nodePort": 30053, "protocol": "UDP"}],
                     **spec},
            "status": {"loadBalancer": {"ingress": [{"ip": LB_IP},
                                                    {"ip": PROXY_LB_IP, "ipMode": "Proxy"}]}}}


@pytest.fixture
def node(make_lab, tmp_path):
    lab = make_lab()
    backends = [lab.add_pod(f"backend-{c}") for c in "ab"]
    for pod in backends:
        pod.start_server([8080], udp=True)
    client = lab.add_pod("client")
    # the external and load-balancer addresses live on the node, as MetalLB would put
    # them: traffic to them never leaves the lab even if it were not rewritten
    for address in (EXTERNAL_IP, LB_IP, PROXY_LB_IP):
        lab.node_run(["ip", "addr", "add", f"{address}/32", "dev", "bpfp-br0"], check=True)
    directory = tmp_path / "manifests"
    agent = AgentRunner(lab, directory, extra_args=("--node-ip", lab.node_ip))
    try:
        yield lab, agent, backends, client, directory
    finally:
        agent.close()


def publish(directory, service: dict, backends, node_name: str = "bpfp-node") -> None:
    manifests.write(directory, "web.yaml", service, manifests.endpoint_slice(
        "web", [p.ip for p in backends],
        [{"name": "http", "port": 8080, "protocol": "TCP"},
         {"name": "dns", "port": 8080, "protocol": "UDP"}], node_name=node_name))


def names(result) -> set[str]:
    return {answer.split(":")[0] for answer in result.answers}


def test_every_service_address_reaches_the_backends(node):
    lab, agent, backends, client, directory = node
    publish(directory, web_service(), backends)
    agent.start()
    want = {p.name for p in backends}
    for address, port in ((VIP, 80), (lab.node_ip, 30080), (EXTERNAL_IP, 80), (LB_IP, 80)):
        tcp = client.tcp(address, port, count=40)
        assert tcp.errors == {} and tcp.wrong_peer == 0, (address, tcp.errors)
        assert names(tcp) == want, address
    for address, port in ((VIP, 53), (lab.node_ip, 30053), (LB_IP, 53)):
        udp = client.udp(address, port, count=40)
        assert udp.errors == {} and udp.wrong_source == 0, (address, udp.errors)
        assert names(udp) == want, address

    # ipMode Proxy: the load balancer proxies itself, kube-proxy leaves the address alone
    proxied = client.tcp(PROXY_LB_IP, 80, count=2, timeout=0.5)
    assert proxied.answers == {}, "an ipMode: Proxy ingress IP must not be load balanced"

    [entry] = [e for e in agent.services() if e["port_name"] == "http"]
    kinds = {(f["address"], f["port"]): f["kind"] for f in entry["frontends"]}
    assert kinds == {(VIP, 80): "ClusterIP", (lab.node_ip, 30080): "NodePort",
                     (EXTERNAL_IP, 80): "ExternalIP", (LB_IP, 80): "LoadBalancer"}


def test_no_node_ports_when_allocation_is_off(node):
    lab, agent, backends, client, directory = node
    service = web_service(allocateLoadBalancerNodePorts=False)
    for port in service["spec"]["ports"]:
        del port["nodePort"]
    publish(directory, service, backends)
    agent.start()
    assert names(client.tcp(LB_IP, 80, count=10)) == {p.name for p in backends}
    kinds = {f["kind"] for e in agent.services() for f in e["frontends"]}
    assert "NodePort" not in kinds


def test_internal_traffic_policy_local_without_a_local_endpoint(node):
    """kube-proxy: ClusterIP traffic gets only this node's endpoints (none: refused), while
    traffic from the node to its external addresses is short-circuited to all of them."""
    lab, agent, backends, client, directory = node
    publish(directory, web_service(internalTrafficPolicy="Local"), backends,
            node_name="another-node")
    agent.start()
    refused = client.tcp(VIP, 80, count=5)
    assert refused.errors == {"ECONNREFUSED": 5}
    for address, port in ((lab.node_ip, 30080), (LB_IP, 80)):
        assert names(client.tcp(address, port, count=20)) == {p.name for p in backends}

    publish(directory, web_service(internalTrafficPolicy="Local"), backends)   # local now
    time.sleep(1.0)
    assert names(client.tcp(VIP, 80, count=20)) == {p.name for p in backends}


def test_external_traffic_policy_local_from_inside_uses_every_endpoint(node):
    lab, agent, backends, client, directory = node
    publish(directory, web_service(externalTrafficPolicy="Local"), backends,
            node_name="another-node")
    agent.start()
    for address, port in ((VIP, 80), (lab.node_ip, 30080), (LB_IP, 80)):
        assert names(client.tcp(address, port, count=20)) == {p.name for p in backends}
