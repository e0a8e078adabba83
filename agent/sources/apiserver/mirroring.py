"""v1 Endpoints to EndpointSlices, as the endpointslicemirroring controller writes them for a
Service without a selector (pkg/controller/endpointslicemirroring): one slice per subset
and address family, ready and not-ready addresses, named ports. Pure, on raw dicts."""
from __future__ import annotations

import ipaddress
from typing import Any

SKIP_MIRROR_LABEL = "endpointslice.kubernetes.io/skip-mirror"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MIRROR_CONTROLLER = "endpointslicemirroring-controller.k8s.io"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# the controller's --mirroring-max-endpoints-per-subset: addresses beyond are not mirrored
MAX_ENDPOINTS_PER_SUBSET = 1000


def skips_mirroring(endpoints: dict) -> bool:
    labels = (endpoints.get("metadata") or {}).get("labels")
    return isinstance(labels, dict) and labels.get(SKIP_MIRROR_LABEL) == "true"


def mirror(endpoints: dict) -> list[dict]:
    """The EndpointSlices mirrored from one Endpoints object (skip-mirror: none). Addresses
    that are not IPs are left out, as the controller leaves them out."""
    if skips_mirroring(endpoints):
        return []
    metadata = endpoints.get("metadata") or {}
    name, namespace = metadata.get("name"), metadata.get("namespace") or "default"
    subsets = endpoints.get("subsets")
    if not isinstance(name, str) or not isinstance(subsets, list):
        return []
    slices = []
    for i, subset in enumerate(subsets):
        if not isinstance(subset, dict):
            continue
        ports = [_port(p) for p in subset.get("ports") or () if isinstance(p, dict)]
        by_family: dict[int, list[dict]] = {4: [], 6: []}
        for field, ready in (("addresses", True), ("notReadyAddresses", False)):
            for address in subset.get(field) or ():
                endpoint = _endpoint(address, ready)
                if endpoint is not None:
                    by_family[endpoint[0]].append(endpoint[1])
        for family, listed in by_family.items():
            if not listed:
                continue
            slices.append({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": f"{name}-mirrored-{i}-ipv{family}",
                             "namespace": namespace,
                             "labels": {SERVICE_NAME_LABEL: name,
                                        MANAGED_BY_LABEL: MIRROR_CONTROLLER}},
                "addressType": f"IPv{family}", "ports": ports,
                "endpoints": listed[:MAX_ENDPOINTS_PER_SUBSET]})
    return slices


def _port(port: dict) -> dict:
    return {"name": port.get("name") or "", "port": port.get("port"),
            "protocol": port.get("protocol") or "TCP"}


def _endpoint(address: Any, ready: bool) -> tuple[int, dict] | None:
    if not isinstance(address, dict) or not isinstance(address.get("ip"), str):
        return None
    try:
        version = ipaddress.ip_address(address["ip"]).version
    except ValueError:
        return None
    endpoint: dict[str, Any] = {"addresses": [address["ip"]], "conditions": {"ready": ready}}
    for field in ("nodeName", "hostname"):
        if isinstance(address.get(field), str) and address[field]:
            endpoint[field] = address[field]
    return version, endpoint
