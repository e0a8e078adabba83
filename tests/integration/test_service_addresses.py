"""Every address of a Service through the socket LB, with real traffic from a pod, over
IPv4 and IPv6: the ClusterIP, the NodePort on the node's address, ExternalIPs and
LoadBalancer ingress IPs (not those with ipMode Proxy), and kube-proxy's traffic policies
for traffic that starts on the node."""
from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from lab import manifests
from lab.agent_runner import AgentRunner

pytestmark = pytest.mark.integration


@dataclass
class Addresses:
    """One family's service addresses (the external ones live on the node's bridge)."""
    family: int
    vip: str
    external: str
    lb: str
    proxy_lb: str
    node: str = ""                    # the node's address: where NodePorts are served

    def pod(self, pod) -> str:
        return pod.ip if self.family == 4 else pod.ip6


FAMILIES = {4: Addresses(4, "10.96.0.50", "10.244.1.250", "10.244.1.251", "10.244.1.252"),
            6: Addresses(6, "fd00:10:96::50", "fd00:10:244:1::fa", "fd00:10:244:1::fb",
                         "fd00:10:244:1::fc")}


def web_service(a: Addresses, **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "lab"},
            "spec": {"type": "LoadBalancer", "clusterIP": a.vip, "clusterIPs": [a.vip],
                     "ipFamilies": [f"IPv{a.family}"], "ipFamilyPolicy": "SingleStack",
                     "externalIPs": [a.external],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                "nodePort": 30080, "protocol": "TCP"},
                               {"name": "dns", "port": 53, "targetPort": 8080,
                                "nodePort": 30053, "protocol": "UDP"}],
                     **spec},
            "status": {"loadBalancer": {"ingress": [{"ip": a.lb},
                                                    {"ip": a.proxy_lb, "ipMode": "Proxy"}]}}}


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def node(make_lab, tmp_path, request):
    lab = make_lab()
    backends = [lab.add_pod(f"backend-{c}") for c in "ab"]
    for pod in backends:
        pod.start_server([8080], udp=True)
    client = lab.add_pod("client")
    a = replace(FAMILIES[request.param],
                node=lab.node_ip if request.param == 4 else lab.node_ip6)
    # the external and load-balancer addresses live on the node, as MetalLB would put
    # them: traffic to them never leaves the lab even if it were not rewritten
    prefix = 32 if a.family == 4 else 128
    for address in (a.external, a.lb, a.proxy_lb):
        lab.node_run(["ip", "addr", "add", f"{address}/{prefix}", "dev", "bpfp-br0", "nodad"]
                     if a.family == 6 else
                     ["ip", "addr", "add", f"{address}/{prefix}", "dev", "bpfp-br0"], check=True)
    directory = tmp_path / "manifests"
    agent = AgentRunner(lab, directory,
                        extra_args=("--node-ip", f"{lab.node_ip},{lab.node_ip6}"))
    try:
        yield a, agent, backends, client, directory
    finally:
        agent.close()


def publish(directory, a: Addresses, service: dict, backends,
            node_name: str = "bpfp-node") -> None:
    manifests.write(directory, "web.yaml", service, manifests.endpoint_slice(
        "web", [a.pod(p) for p in backends],
        [{"name": "http", "port": 8080, "protocol": "TCP"},
         {"name": "dns", "port": 8080, "protocol": "UDP"}], node_name=node_name))


def test_every_service_address_reaches_the_backends(node):
    a, agent, backends, client, directory = node
    publish(directory, a, web_service(a), backends)
    agent.start()
    want = {p.name for p in backends}
    for address, port in ((a.vip, 80), (a.node, 30080), (a.external, 80), (a.lb, 80)):
        tcp = client.tcp(address, port, count=40)
        assert tcp.errors == {} and tcp.wrong_peer == 0, (address, tcp.errors)
        assert tcp.backends() == want, address
    for address, port in ((a.vip, 53), (a.node, 30053), (a.lb, 53)):
        udp = client.udp(address, port, count=40)
        assert udp.errors == {} and udp.wrong_source == 0, (address, udp.errors)
        assert udp.backends() == want, address

    # ipMode Proxy: the load balancer proxies itself, kube-proxy leaves the address alone
    proxied = client.tcp(a.proxy_lb, 80, count=2, timeout=0.5)
    assert proxied.answers == {}, "an ipMode: Proxy ingress IP must not be load balanced"

    [entry] = [e for e in agent.services() if e["port_name"] == "http"]
    kinds = {(f["address"], f["port"]): f["kind"] for f in entry["frontends"]}
    assert kinds == {(a.vip, 80): "ClusterIP", (a.node, 30080): "NodePort",
                     (a.external, 80): "ExternalIP", (a.lb, 80): "LoadBalancer"}


def test_no_node_ports_when_allocation_is_off(node):
    a, agent, backends, client, directory = node
    service = web_service(a, allocateLoadBalancerNodePorts=False)
    for port in service["spec"]["ports"]:
        del port["nodePort"]
    publish(directory, a, service, backends)
    agent.start()
    assert client.tcp(a.lb, 80, count=10).backends() == {p.name for p in backends}
    kinds = {f["kind"] for e in agent.services() for f in e["frontends"]}
    assert "NodePort" not in kinds


def test_internal_traffic_policy_local_without_a_local_endpoint(node):
    """kube-proxy: ClusterIP traffic gets only this node's endpoints (none: refused), while
    traffic from the node to its external addresses is short-circuited to all of them."""
    a, agent, backends, client, directory = node
    publish(directory, a, web_service(a, internalTrafficPolicy="Local"), backends,
            node_name="another-node")
    agent.start()
    refused = client.tcp(a.vip, 80, count=5)
    assert refused.errors == {"ECONNREFUSED": 5}
    for address, port in ((a.node, 30080), (a.lb, 80)):
        assert client.tcp(address, port, count=20).backends() == {p.name for p in backends}

    publish(directory, a, web_service(a, internalTrafficPolicy="Local"), backends)   # local
    agent.wait_until(lambda: agent.kernel_backends(a.vip, 80) == {a.pod(p) for p in backends},
                     "the local endpoints behind the cluster IP in the kernel")
    assert client.tcp(a.vip, 80, count=20).backends() == {p.name for p in backends}


def test_external_traffic_policy_local_from_inside_uses_every_endpoint(node):
    a, agent, backends, client, directory = node
    publish(directory, a, web_service(a, externalTrafficPolicy="Local"), backends,
            node_name="another-node")
    agent.start()
    for address, port in ((a.vip, 80), (a.node, 30080), (a.lb, 80)):
        assert client.tcp(address, port, count=20).backends() == {p.name for p in backends}
