"""Writes ordinary Kubernetes YAML (Service, EndpointSlice) for the lab's pods into a directory.

What tests, the demo and benchmarks give the agent's --manifests source."""
from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

import yaml


def service(name: str, cluster_ip: str | Sequence[str], ports: Sequence[dict],
            namespace: str = "lab") -> dict:
    """ports: [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}, ...].
    cluster_ip: one address of either family, or two (one per family) for a dual-stack
    Service; ipFamilies and ipFamilyPolicy follow, as the API server fills them in."""
    cluster_ips = [cluster_ip] if isinstance(cluster_ip, str) else list(cluster_ip)
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"type": "ClusterIP", "clusterIP": cluster_ips[0],
                     "clusterIPs": cluster_ips,
                     "ipFamilies": [_family(ip) for ip in cluster_ips],
                     "ipFamilyPolicy": "RequireDualStack" if len(cluster_ips) > 1
                     else "SingleStack",
                     "ports": list(ports)}}


def endpoint_slice(service_name: str, addresses: Sequence[str], ports: Sequence[dict],
                   namespace: str = "lab", name: str | None = None,
                   not_ready: Sequence[str] = (), node_name: str = "bpfp-node",
                   address_type: str | None = None) -> dict:
    """ports: [{"name": "http", "port": 8080, "protocol": "TCP"}, ...]. A slice holds one
    family: address_type defaults to that of the addresses (IPv4 when there are none). A
    dual-stack Service has one slice per family: give them distinct names."""
    if address_type is None:
        address_type = _family(addresses[0]) if addresses else "IPv4"
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{service_name}-slice", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": address_type,
            "ports": list(ports),
            "endpoints": [{"addresses": [a],
                           "conditions": {"ready": a not in not_ready},
                           "nodeName": node_name} for a in addresses]}


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
