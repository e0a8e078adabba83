"""Writes ordinary Kubernetes YAML (Service, EndpointSlice) for the lab's pods into a directory.

What tests, the demo and benchmarks give the agent's --manifests source."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import yaml


def service(name: str, cluster_ip: str, ports: Sequence[dict], namespace: str = "lab") -> dict:
    """ports: [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}, ...]"""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                     "ports": list(ports)}}


def endpoint_slice(service_name: str, addresses: Sequence[str], ports: Sequence[dict],
                   namespace: str = "lab", name: str | None = None,
                   not_ready: Sequence[str] = (), node_name: str = "bpfp-node") -> dict:
    """ports: [{"name": "http", "port": 8080, "protocol": "TCP"}, ...]"""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{service_name}-slice", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4",
            "ports": list(ports),
            "endpoints": [{"addresses": [a],
                           "conditions": {"ready": a not in not_ready},
                           "nodeName": node_name} for a in addresses]}


def write(directory: Path, filename: str, *objects: dict) -> Path:
    """Atomic replace (write then rename), as a ConfigMap volume or careful operator does."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    tmp = directory / f".{filename}.tmp"
    tmp.write_text(yaml.safe_dump_all(list(objects), sort_keys=False))
    os.replace(tmp, path)
    return path
