"""Writes ordinary Kubernetes YAML (Service, EndpointSlice) for the lab's pods into a directory.

What tests, the demo and benchmarks give the agent's --manifests source."""
from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml


def service(name: str, cluster_ip: str | Sequence[str], ports: Sequence[dict],
            namespace: str = "lab", *, service_type: str = "ClusterIP",
            external_ips: Sequence[str] = (),
            load_balancer_ingress: Sequence[str | dict] = (),
            external_traffic_policy: str | None = None,
            internal_traffic_policy: str | None = None,
            health_check_node_port: int | None = None,
            load_balancer_source_ranges: Sequence[str] = (),
            session_affinity_timeout: int | None = None) -> dict:
    """ports: [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}, ...],
    with "nodePort" for NodePort and LoadBalancer services (no allocator fills it in here).
    cluster_ip: one address of either family, or two (one per family) for a dual-stack
    Service; ipFamilies and ipFamilyPolicy follow, as the API server fills them in.
    load_balancer_ingress: IPs, or status entries such as {"ip": IP, "ipMode": "Proxy"}.
    session_affinity_timeout: ClientIP affinity with that many seconds. Fields left at their
    default are not written, as a user's YAML would leave them out."""
    cluster_ips = [cluster_ip] if isinstance(cluster_ip, str) else list(cluster_ip)
    spec = {"type": service_type, "clusterIP": cluster_ips[0],
            "clusterIPs": cluster_ips,
            "ipFamilies": [_family(ip) for ip in cluster_ips],
            "ipFamilyPolicy": "RequireDualStack" if len(cluster_ips) > 1 else "SingleStack",
            "ports": list(ports)}
    optional = {"externalIPs": list(external_ips) or None,
                "externalTrafficPolicy": external_traffic_policy,
                "internalTrafficPolicy": internal_traffic_policy,
                "healthCheckNodePort": health_check_node_port,
                "loadBalancerSourceRanges": list(load_balancer_source_ranges) or None}
    if session_affinity_timeout is not None:
        optional["sessionAffinity"] = "ClientIP"
        optional["sessionAffinityConfig"] = {
            "clientIP": {"timeoutSeconds": session_affinity_timeout}}
    spec.update((key, value) for key, value in optional.items() if value is not None)
    out = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    if load_balancer_ingress:
        ingress = [{"ip": entry} if isinstance(entry, str) else dict(entry)
                   for entry in load_balancer_ingress]
        out["status"] = {"loadBalancer": {"ingress": ingress}}
    return out


def endpoint_slice(service_name: str, addresses: Sequence[str], ports: Sequence[dict],
                   namespace: str = "lab", name: str | None = None,
                   not_ready: Sequence[str] = (), node_name: str | None = "bpfp-node",
                   address_type: str | None = None,
                   nodes: Mapping[str, str] | None = None) -> dict:
    """ports: [{"name": "http", "port": 8080, "protocol": "TCP"}, ...]. A slice holds one
    family: address_type defaults to that of the addresses (IPv4 when there are none). A
    dual-stack Service has one slice per family: give them distinct names. nodes maps an
    address to its endpoint's nodeName (a cluster's backends on several nodes); addresses
    not in it are on node_name (None: no nodeName, as kube-proxy's tests often write it)."""
    nodes = nodes or {}
    if address_type is None:
        address_type = _family(addresses[0]) if addresses else "IPv4"
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{service_name}-slice", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": address_type,
            "ports": list(ports),
            "endpoints": [_endpoint(a, a not in not_ready, nodes.get(a, node_name))
                          for a in addresses]}


def _endpoint(address: str, ready: bool, node_name: str | None) -> dict:
    endpoint = {"addresses": [address], "conditions": {"ready": ready}}
    if node_name is not None:
        endpoint["nodeName"] = node_name
    return endpoint


def _family(address: str) -> str:
    return f"IPv{ipaddress.ip_address(address).version}"


def write(directory: Path, filename: str, *objects: dict) -> Path:
    """Atomic replace (write then rename), as a ConfigMap volume or careful operator does."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    tmp = directory / f".{filename}.tmp"
    tmp.write_text(yaml.safe_dump_all(list(objects), sort_keys=False))
    os.replace(tmp, path)
    return path
