"""The API server's defaults for what a Service manifest leaves out, on raw dicts
(pkg/apis/core/v1/defaults.go SetDefaults_Service; the service REST's IP family fields).
Pure; a field of the wrong type is left as it is, for parse_object to name."""
from __future__ import annotations

import functools
import ipaddress
from typing import Any

from agent.model.types import IPAddress

# kinds read from files that live in a namespace: `kubectl apply` puts them in "default"
NAMESPACED_KINDS = frozenset({"Service", "Endpoints", "EndpointSlice"})
DEFAULT_AFFINITY_TIMEOUT = 10800           # sessionAffinityConfig.clientIP.timeoutSeconds
FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}
FAMILIES = {"IPv4": 4, "IPv6": 6}
POLICIES = ("SingleStack", "PreferDualStack", "RequireDualStack")


@functools.lru_cache(maxsize=256)
def parse_ip(text: str) -> IPAddress:
    """ipaddress.ip_address, remembered for the last few: each step of one Service's
    admission reads its addresses again (ValueError is raised again, never remembered)."""
    return ipaddress.ip_address(text)


class AdmissionError(ValueError):
    """What the API server would have refused the object for; names the object and field."""


def with_namespace(raw: Any) -> Any:
    """A namespaced object without metadata.namespace is in "default", as kubectl applies it."""
    if not isinstance(raw, dict) or not isinstance(raw.get("kind"), str) or \
            raw["kind"] not in NAMESPACED_KINDS:
        return raw
    metadata = raw.get("metadata")
    if not isinstance(metadata, dict) or metadata.get("namespace") not in (None, ""):
        return raw
    return {**raw, "metadata": {**metadata, "namespace": "default"}}


def _unset(value: Any) -> bool:
    return value is None or value == ""


def default_service(raw: dict) -> dict:
    """A copy with SetDefaults_Service's fields filled in (raw is not changed): type,
    sessionAffinity and its timeout, port protocol, targetPort = port, the traffic
    policies, allocateLoadBalancerNodePorts."""
    spec = raw.get("spec")
    if not isinstance(spec, dict):
        return raw
    spec = dict(spec)
    if _unset(spec.get("type")):
        spec["type"] = "ClusterIP"
    if _unset(spec.get("sessionAffinity")):
        spec["sessionAffinity"] = "None"
    if spec["sessionAffinity"] == "ClientIP":
        config = spec.get("sessionAffinityConfig")
        config = dict(config) if isinstance(config, dict) else {} if config is None else config
        if isinstance(config, dict):
            client_ip = config.get("clientIP")
            client_ip = dict(client_ip) if isinstance(client_ip, dict) else \
                {} if client_ip is None else client_ip
            if isinstance(client_ip, dict) and client_ip.get("timeoutSeconds") is None:
                client_ip["timeoutSeconds"] = DEFAULT_AFFINITY_TIMEOUT
            config["clientIP"] = client_ip
        spec["sessionAffinityConfig"] = config
    if isinstance(spec.get("ports"), list):
        spec["ports"] = [_default_port(port) for port in spec["ports"]]
    kind = spec["type"]
    if kind in ("NodePort", "LoadBalancer") and _unset(spec.get("externalTrafficPolicy")):
        spec["externalTrafficPolicy"] = "Cluster"
    if kind != "ExternalName" and _unset(spec.get("internalTrafficPolicy")):
        spec["internalTrafficPolicy"] = "Cluster"
    if kind == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts") is None:
        spec["allocateLoadBalancerNodePorts"] = True
    return {**raw, "spec": spec}


def _default_port(port: Any) -> Any:
    if not isinstance(port, dict):
        return port
    port = dict(port)
    if _unset(port.get("protocol")):
        port["protocol"] = "TCP"
    target = port.get("targetPort")
    if (_unset(target) or (target == 0 and not isinstance(target, bool))) and \
            port.get("port") is not None:
        port["targetPort"] = port["port"]
    return port


def explicit_ips(spec: dict) -> list[str] | None:
    """The cluster IPs a manifest gives (clusterIPs, else clusterIP), or None when one is
    malformed (parse_object names it; nothing is allocated for it)."""
    listed = spec.get("clusterIPs")
    if isinstance(listed, list) and listed:
        values = listed
    else:
        single = spec.get("clusterIP")
        values = [] if _unset(single) else [single]
    for value in values:
        if not isinstance(value, str):
            return None
        try:
            parse_ip(value)
        except ValueError:
            return None
    return list(values)


def ip_families(where: str, spec: dict, given: list[str], cluster: tuple[int, ...]
                ) -> tuple[list[int], str]:
    """(families in order, ipFamilyPolicy) as the API server settles them: ipFamilies,
    else the given cluster IPs' families, else the cluster's primary; two families when the
    policy is RequireDualStack, or PreferDualStack on a dual-stack cluster. A policy left
    out is SingleStack, or RequireDualStack when two families are asked for."""
    requested = spec.get("ipFamilies")
    requested = requested if isinstance(requested, list) else []
    families = [FAMILIES[f] for f in requested if isinstance(f, str) and f in FAMILIES]
    for ip in given:
        version = parse_ip(ip).version
        if version not in families:
            families.append(version)
    policy = spec.get("ipFamilyPolicy")
    if _unset(policy):
        policy = "RequireDualStack" if len(families) == 2 else "SingleStack"
    if policy not in POLICIES:
        raise AdmissionError(f"Service {where}: spec.ipFamilyPolicy: {policy!r} is not one "
                             f"of {', '.join(POLICIES)}; service not served")
    if not families:
        families = [cluster[0]]
    if policy == "SingleStack" and len(families) > 1:
        raise AdmissionError(f"Service {where}: spec.ipFamilyPolicy: SingleStack with two "
                             "IP families; service not served")
    if len(families) == 1 and (policy == "RequireDualStack"
                               or (policy == "PreferDualStack" and len(cluster) > 1)):
        other = 6 if families[0] == 4 else 4
        if other not in cluster and policy == "RequireDualStack":
            raise AdmissionError(
                f"Service {where}: spec.ipFamilyPolicy: RequireDualStack, but "
                f"--service-cluster-ip-range has no {FAMILY_NAMES[other]} range; "
                "service not served")
        if other in cluster:
            families.append(other)
    return families[:2], policy
