"""What several test files share: waiting on a condition, kube-proxy's test conventions
for the model (NewFakeProxier's node and addresses, makeTestService / makeTestEndpointSlice
through the border, runPacketFlowTests' answer), and a manifest-source lab of two HTTP
backends and a client. The lab's YAML builders are lab.manifests."""
from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import TypeVar

from agent.model import NodeContext
from agent.model.objects import parse_endpoint_slice, parse_service
from agent.model.types import EndpointSlice, FrontendKind, Service
from lab import manifests

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], what: str = "condition", timeout: float = 20.0,
             interval: float = 0.1) -> T:
    """Poll predicate() until it gives something true, and return that; AssertionError
    naming what after timeout seconds (the bound only ends a hung test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --- kube-proxy's test conventions (pkg/proxy/nftables/proxier_test.go NewFakeProxier) ---------

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
POD, NODE_IP, OUTSIDE = "10.0.0.2", TEST_NODE_IP, TEST_EXTERNAL_CLIENT


def frontends(state) -> dict[str, list[str]]:
    """{"ns/name:port/TCP v4": ["ClusterIP 10.0.0.1:80", ...]} in sort_key order."""
    return {f"{name} v{family}": [f"{f.kind.value} {join_host_port(f.address, f.port)}"
                                  for f in sps.frontends]
            for (name, family), sps in state.items()}


# One HTTP service port, 80 -> the pods' server on 8080 (Pod.start_server), and its slice port
HTTP_PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
HTTP_SLICE_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"}]


def http_world(make_lab, tmp_path, name: str):
    """(lab, [backend-a, backend-b] serving :8080, a client pod, the manifest directory an
    agent is to read): the world of the manifest source's fault tests."""
    lab = make_lab(name=name)
    backends = [lab.add_pod(f"backend-{c}") for c in "ab"]
    for pod in backends:
        pod.start_server([8080])
    return lab, backends, lab.add_pod("client"), tmp_path / "manifests"


def publish_http(directory, name: str, vip: str, backends: list,
                 filename: str | None = None) -> None:
    """Service `name` on vip:80 and its EndpointSlice to the backends' :8080, in one manifest
    file (default: <name>.yaml)."""
    manifests.write(directory, filename or f"{name}.yaml",
                    manifests.service(name, vip, HTTP_PORTS),
                    manifests.endpoint_slice(name, [p.ip for p in backends], HTTP_SLICE_PORTS))
