"""Border conversion: valid Kubernetes dicts become frozen objects with API defaults applied;
each invalid field raises InvalidObject naming the object, the field and the consequence."""
from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.model.objects import (
    fast_ipv4,
    object_key,
    parse_endpoint_slice,
    parse_node,
    parse_object,
    parse_service,
)
from agent.model.types import (
    HEADLESS_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    InvalidObject,
    LoadBalancerIngress,
    Node,
    NodeAddress,
    ObjectKey,
    Protocol,
    Service,
    ServicePort,
)

TCP, UDP = Protocol.TCP, Protocol.UDP


def ip(text: str):
    return ipaddress.ip_address(text)


def service_dict(**spec: Any) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}], **spec}}


def slice_dict(**fields: Any) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.1.0.1"]}], **fields}


def node_dict(**status: Any) -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "zone-a",
                                                  "kubernetes.io/hostname": "n1"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"},
                                     {"type": "Hostname", "address": "n1"}], **status}}


def edit(d: dict, path: str, value: Any) -> dict:
    """A deep copy of d with path ("a.b.0.c") set to value, or deleted when value is DELETE."""
    d = copy.deepcopy(d)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    target = d
    for part in parents:
        target = target[part]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return d


DELETE = object()


# --- Services ---------------------------------------------------------------------------

@dataclass
class Valid:
    name: str
    given: dict
    want: Any


SERVICE_CASES = [
    Valid("defaults: namespace, type, protocol, targetPort = port",
          {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}},
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80),))),
    Valid("named targetPort kept as a name",
          service_dict(ports=[{"port": 80, "targetPort": "http"}]),
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, "http"),))),
    Valid("TCP and UDP on the same port number",
          service_dict(ports=[{"name": "dns", "port": 53, "protocol": "UDP"},
                              {"name": "dns-tcp", "port": 53, "protocol": "TCP",
                               "targetPort": 5353}]),
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"),),
                  (ServicePort("dns", UDP, 53, 53), ServicePort("dns-tcp", TCP, 53, 5353)))),
    Valid("headless: clusterIP None",
          service_dict(clusterIP="None", clusterIPs=["None"]),
          Service("default", "web", "ClusterIP", (), (ServicePort("", TCP, 80, 80),),
                  headless=True)),
    Valid("headless: clusterIP empty",
          service_dict(clusterIP=""),
          Service("default", "web", "ClusterIP", (), (ServicePort("", TCP, 80, 80),),
                  headless=True)),
    Valid("headless: no cluster IP at all",
          edit(service_dict(), "spec.clusterIP", DELETE),
          Service("default", "web", "ClusterIP", (), (ServicePort("", TCP, 80, 80),),
                  headless=True)),
    Valid("dual-stack clusterIPs",
          service_dict(clusterIP="10.96.0.10", clusterIPs=["10.96.0.10", "fd00::10"],
                       ipFamilyPolicy="PreferDualStack"),
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"), ip("fd00::10")),
                  (ServicePort("", TCP, 80, 80),))),
    Valid("clusterIPs alone",
          edit(service_dict(clusterIPs=["fd00::10"]), "spec.clusterIP", DELETE),
          Service("default", "web", "ClusterIP", (ip("fd00::10"),),
                  (ServicePort("", TCP, 80, 80),))),
    Valid("ExternalName records the type and no cluster IP",
          service_dict(type="ExternalName", externalName="db.example.com", clusterIP=""),
          Service("default", "web", "ExternalName", (), (ServicePort("", TCP, 80, 80),))),
    Valid("NodePort keeps its cluster IP and its nodePort",
          service_dict(type="NodePort", ports=[{"port": 80, "nodePort": 30080}]),
          Service("default", "web", "NodePort", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80, 30080),))),
    Valid("targetPort 0 or empty defaults to port, as the API server does",
          service_dict(ports=[{"name": "a", "port": 80, "targetPort": 0},
                              {"name": "b", "port": 81, "targetPort": ""}]),
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"),),
                  (ServicePort("a", TCP, 80, 80), ServicePort("b", TCP, 81, 81)))),
    Valid("no ports",
          service_dict(ports=None),
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"),), ())),
    Valid("allocateLoadBalancerNodePorts false: no nodePort, none served",
          service_dict(type="LoadBalancer", allocateLoadBalancerNodePorts=False,
                       ports=[{"port": 80}]),
          Service("default", "web", "LoadBalancer", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80, 0),))),
    Valid("nodePort 0 means not allocated",
          service_dict(type="NodePort", ports=[{"port": 80, "nodePort": 0}]),
          Service("default", "web", "NodePort", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80, 0),))),
    Valid("one nodePort for TCP and UDP",
          service_dict(type="NodePort",
                       ports=[{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
                              {"name": "dns-tcp", "port": 53, "nodePort": 30053}]),
          Service("default", "web", "NodePort", (ip("10.96.0.10"),),
                  (ServicePort("dns", UDP, 53, 53, 30053),
                   ServicePort("dns-tcp", TCP, 53, 53, 30053)))),
    Valid("ExternalName: nodePort ignored",
          service_dict(type="ExternalName", clusterIP="", ports=[{"port": 80, "nodePort": 3}]),
          Service("default", "web", "ExternalName", (), (ServicePort("", TCP, 80, 80, 0),))),
    Valid("externalIPs of both families, duplicates dropped",
          service_dict(externalIPs=["192.168.99.11", "2001:db8::99", "192.168.99.11"]),
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80),),
                  external_ips=(ip("192.168.99.11"), ip("2001:db8::99")))),
    Valid("load balancer ingress: ipMode defaults to VIP, hostname-only entries dropped",
          edit(service_dict(type="LoadBalancer"), "status", {"loadBalancer": {"ingress": [
              {"ip": "1.2.3.4"}, {"hostname": "lb.example.com"},
              {"ip": "5.6.7.8", "ipMode": "Proxy"}, {"ip": "fd00::1:2", "ipMode": "VIP"}]}}),
          Service("default", "web", "LoadBalancer", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80),),
                  load_balancer_ingress=(LoadBalancerIngress(ip("1.2.3.4"), "VIP"),
                                         LoadBalancerIngress(ip("5.6.7.8"), "Proxy"),
                                         LoadBalancerIngress(ip("fd00::1:2"), "VIP")))),
    Valid("traffic policies",
          service_dict(type="NodePort", internalTrafficPolicy="Local",
                       externalTrafficPolicy="Local"),
          Service("default", "web", "NodePort", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80),), internal_traffic_policy="Local",
                  external_traffic_policy="Local")),
    Valid("empty traffic policies default to Cluster",
          service_dict(internalTrafficPolicy="", externalTrafficPolicy=None),
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80),))),
    Valid("ClientIP affinity without a config: the API default of 10800 s",
          service_dict(sessionAffinity="ClientIP"),
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80),), session_affinity_timeout=10800)),
    Valid("ClientIP affinity with the maximum timeout",
          service_dict(sessionAffinity="ClientIP",
                       sessionAffinityConfig={"clientIP": {"timeoutSeconds": 86400}}),
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80),), session_affinity_timeout=86400)),
    Valid("sessionAffinity None",
          service_dict(sessionAffinity="None"),
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80),))),
    Valid("ipFamilies matching clusterIPs",
          service_dict(clusterIPs=["10.96.0.10", "fd00::10"], ipFamilies=["IPv4", "IPv6"]),
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"), ip("fd00::10")),
                  (ServicePort("", TCP, 80, 80),))),
    Valid("headless with ipFamilies",
          service_dict(clusterIP="None", ipFamilies=["IPv6", "IPv4"]),
          Service("default", "web", "ClusterIP", (), (ServicePort("", TCP, 80, 80),),
                  headless=True)),
    Valid("labelled service-proxy-name: kept, marked as another proxy's",  # server.go
          edit(service_dict(), "metadata.labels", {SERVICE_PROXY_NAME_LABEL: "other"}),
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80),),
                  excluded_by_label=SERVICE_PROXY_NAME_LABEL)),
    Valid("labelled headless with an empty value",  # server.go: DoesNotExist, any value
          edit(service_dict(), "metadata.labels", {HEADLESS_LABEL: None, "app": "web"}),
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80),), excluded_by_label=HEADLESS_LABEL)),
    # serviceport.go: trimmed (validation lets padding through), parsed as Go's sloppy
    # ParseCIDR does; both families kept here, the model picks each state's own.
    Valid("loadBalancerSourceRanges: trimmed, host bits cleared, duplicates dropped",
          service_dict(type="LoadBalancer", loadBalancerSourceRanges=[
              " 203.0.113.0/25", "192.168.0.7/24\t", "2001:db8::1/32", "203.0.113.0/25",
              "010.000.0.0/8"]),
          Service("default", "web", "LoadBalancer", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80),),
                  load_balancer_source_ranges=tuple(map(ipaddress.ip_network, [
                      "203.0.113.0/25", "192.168.0.0/24", "2001:db8::/32", "10.0.0.0/8"])))),
    Valid("loadBalancerSourceRanges kept on any type, as kube-proxy keeps them",
          service_dict(loadBalancerSourceRanges=["0.0.0.0/1"]),
          Service("default", "web", "ClusterIP", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80),),
                  load_balancer_source_ranges=(ipaddress.ip_network("0.0.0.0/1"),))),
    Valid("the deprecated source-ranges annotation is not read (cloud providers only)",
          edit(service_dict(type="LoadBalancer"), "metadata.annotations",
               {"service.beta.kubernetes.io/load-balancer-source-ranges": "10.0.0.0/8"}),
          Service("default", "web", "LoadBalancer", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80),))),
    Valid("healthCheckNodePort",
          service_dict(type="LoadBalancer", externalTrafficPolicy="Local",
                       healthCheckNodePort=32000),
          Service("default", "web", "LoadBalancer", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80),), external_traffic_policy="Local",
                  health_check_node_port=32000)),
    Valid("healthCheckNodePort 0: none allocated",
          service_dict(type="LoadBalancer", externalTrafficPolicy="Local",
                       healthCheckNodePort=0),
          Service("default", "web", "LoadBalancer", (ip("10.96.0.10"),),
                  (ServicePort("", TCP, 80, 80),), external_traffic_policy="Local")),
]


@pytest.mark.parametrize("case", SERVICE_CASES, ids=lambda c: c.name)
def test_parse_service(case):
    assert parse_service(case.given) == case.want
    assert parse_object(case.given) == case.want


@dataclass
class Invalid:
    name: str
    given: dict
    field: str                    # the message must name this field
    detail: str = ""              # and contain this
    extra: dict = field(default_factory=dict)


TWO_PORTS = [{"name": "http", "port": 80}, {"name": "https", "port": 443}]

SERVICE_INVALID = [
    Invalid("no metadata.name", edit(service_dict(), "metadata.name", DELETE),
            "metadata.name", "required"),
    Invalid("metadata.namespace not a string", edit(service_dict(), "metadata.namespace", 7),
            "metadata.namespace"),
    Invalid("spec not a mapping", edit(service_dict(), "spec", ["x"]), "spec"),
    Invalid("unknown type", service_dict(type="Ingress"), "spec.type", "'Ingress'"),
    Invalid("ports not a list", service_dict(ports={"port": 80}), "spec.ports"),
    Invalid("port entry not a mapping", service_dict(ports=[80]), "spec.ports[0]"),
    Invalid("port missing", service_dict(ports=[{"name": "http"}]), "spec.ports[0].port"),
    Invalid("port zero", service_dict(ports=[{"port": 0}]), "spec.ports[0].port",
            "0 out of range (1-65535)"),
    Invalid("port as a string", service_dict(ports=[{"port": "80"}]), "spec.ports[0].port"),
    Invalid("port as a boolean", service_dict(ports=[{"port": True}]), "spec.ports[0].port"),
    Invalid("port as a float", service_dict(ports=[{"port": 80.0}]), "spec.ports[0].port"),
    Invalid("unknown protocol", service_dict(ports=[{"port": 80, "protocol": "HTTP"}]),
            "spec.ports[0].protocol", "'HTTP'"),
    Invalid("lower-case protocol", service_dict(ports=[{"port": 80, "protocol": "tcp"}]),
            "spec.ports[0].protocol"),
    Invalid("targetPort out of range",
            service_dict(ports=[{"port": 80, "targetPort": 70000}]),
            "spec.ports[0].targetPort", "70000 out of range"),
    Invalid("targetPort negative", service_dict(ports=[{"port": 80, "targetPort": -1}]),
            "spec.ports[0].targetPort"),
    Invalid("targetPort as a boolean", service_dict(ports=[{"port": 80, "targetPort": False}]),
            "spec.ports[0].targetPort"),
    Invalid("second port unnamed", service_dict(ports=[{"name": "http", "port": 80},
                                                       {"port": 443}]),
            "spec.ports[1].name", "required"),
    Invalid("duplicate port names", service_dict(ports=[{"name": "http", "port": 80},
                                                        {"name": "http", "port": 81}]),
            "spec.ports[1].name", "duplicate"),
    Invalid("duplicate port and protocol",
            service_dict(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 80}]),
            "spec.ports[1]", "duplicate port 80/TCP"),
    Invalid("clusterIP not an address", service_dict(clusterIP="10.96.0.300"),
            "spec.clusterIP", "not a valid IP address"),
    Invalid("clusterIP not a string", service_dict(clusterIP=167772160), "spec.clusterIP"),
    Invalid("clusterIP with a zone index", service_dict(clusterIP="fe80::1%eth0"),
            "spec.clusterIP", "zone"),
    Invalid("clusterIP differs from clusterIPs[0]",
            service_dict(clusterIP="10.96.0.10", clusterIPs=["10.96.0.11"]), "spec.clusterIP"),
    Invalid("two IPv4 clusterIPs",
            service_dict(clusterIP="10.96.0.10", clusterIPs=["10.96.0.10", "10.96.0.11"]),
            "spec.clusterIPs", "one IPv4 and one IPv6"),
    Invalid("three clusterIPs",
            service_dict(clusterIP="10.96.0.10",
                         clusterIPs=["10.96.0.10", "fd00::1", "10.96.0.12"]),
            "spec.clusterIPs"),
    Invalid("headless with another cluster IP",
            service_dict(clusterIP="None", clusterIPs=["None", "10.96.0.10"]),
            "spec.clusterIPs", "headless"),
    Invalid("bad second clusterIP",
            service_dict(clusterIPs=["10.96.0.10", "fd00::zz"]), "spec.clusterIPs[1]"),
    Invalid("nodePort out of range",
            service_dict(type="NodePort", ports=[{"port": 80, "nodePort": 70000}]),
            "spec.ports[0].nodePort", "70000 out of range"),
    Invalid("nodePort negative",
            service_dict(type="NodePort", ports=[{"port": 80, "nodePort": -1}]),
            "spec.ports[0].nodePort"),
    Invalid("nodePort as a string",
            service_dict(type="NodePort", ports=[{"port": 80, "nodePort": "30080"}]),
            "spec.ports[0].nodePort"),
    Invalid("nodePort as a boolean",
            service_dict(type="NodePort", ports=[{"port": 80, "nodePort": False}]),
            "spec.ports[0].nodePort"),
    Invalid("nodePort on a ClusterIP service",
            service_dict(ports=[{"port": 80, "nodePort": 30080}]),
            "spec.ports[0].nodePort", "ClusterIP"),
    Invalid("duplicate nodePort",
            service_dict(type="NodePort", ports=[{"name": "a", "port": 80, "nodePort": 30080},
                                                 {"name": "b", "port": 81, "nodePort": 30080}]),
            "spec.ports[1].nodePort", "duplicate nodePort 30080/TCP"),
    Invalid("externalIPs not a list", service_dict(externalIPs="1.2.3.4"), "spec.externalIPs"),
    Invalid("bad externalIP", service_dict(externalIPs=["1.2.3.4", "1.2.3"]),
            "spec.externalIPs[1]", "not a valid IP address"),
    Invalid("loopback externalIP", service_dict(externalIPs=["127.0.0.1"]),
            "spec.externalIPs[0]", "loopback"),
    Invalid("unspecified externalIP", service_dict(externalIPs=["::"]), "spec.externalIPs[0]"),
    Invalid("link-local externalIP", service_dict(externalIPs=["169.254.1.1"]),
            "spec.externalIPs[0]"),
    Invalid("load balancer ingress not a list",
            edit(service_dict(), "status", {"loadBalancer": {"ingress": {"ip": "1.2.3.4"}}}),
            "status.loadBalancer.ingress"),
    Invalid("bad load balancer ingress ip",
            edit(service_dict(), "status", {"loadBalancer": {"ingress": [{"ip": "1.2.3.x"}]}}),
            "status.loadBalancer.ingress[0].ip", "not a valid IP address"),
    Invalid("unknown ipMode",
            edit(service_dict(), "status", {"loadBalancer": {"ingress": [
                {"ip": "1.2.3.4", "ipMode": "Tunnel"}]}}),
            "status.loadBalancer.ingress[0].ipMode", "'Tunnel'"),
    Invalid("ipMode without ip",
            edit(service_dict(), "status", {"loadBalancer": {"ingress": [
                {"hostname": "lb.example.com", "ipMode": "VIP"}]}}),
            "status.loadBalancer.ingress[0].ipMode"),
    Invalid("unknown internalTrafficPolicy", service_dict(internalTrafficPolicy="Node"),
            "spec.internalTrafficPolicy", "'Node'"),
    Invalid("unknown externalTrafficPolicy", service_dict(externalTrafficPolicy="local"),
            "spec.externalTrafficPolicy"),
    Invalid("unknown sessionAffinity", service_dict(sessionAffinity="Cookie"),
            "spec.sessionAffinity", "'Cookie'"),
    Invalid("affinity timeout zero",
            service_dict(sessionAffinity="ClientIP",
                         sessionAffinityConfig={"clientIP": {"timeoutSeconds": 0}}),
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "out of range (1-86400)"),
    Invalid("affinity timeout over a day",
            service_dict(sessionAffinity="ClientIP",
                         sessionAffinityConfig={"clientIP": {"timeoutSeconds": 86401}}),
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "86401"),
    Invalid("affinity timeout as a string",
            service_dict(sessionAffinity="ClientIP",
                         sessionAffinityConfig={"clientIP": {"timeoutSeconds": "10800"}}),
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
    Invalid("affinity config with sessionAffinity None",
            service_dict(sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}),
            "spec.sessionAffinityConfig", "None"),
    Invalid("ipFamilies not matching clusterIPs",
            service_dict(clusterIPs=["10.96.0.10", "fd00::10"], ipFamilies=["IPv6", "IPv4"]),
            "spec.ipFamilies[0]", "does not match"),
    Invalid("unknown ipFamily", service_dict(ipFamilies=["IPv5"]), "spec.ipFamilies[0]"),
    Invalid("three ipFamilies", service_dict(ipFamilies=["IPv4", "IPv6", "IPv4"]),
            "spec.ipFamilies"),
    Invalid("two IPv4 ipFamilies", service_dict(ipFamilies=["IPv4", "IPv4"]),
            "spec.ipFamilies", "one IPv4 and one IPv6"),
    Invalid("allocateLoadBalancerNodePorts not a boolean",
            service_dict(type="LoadBalancer", allocateLoadBalancerNodePorts="no"),
            "spec.allocateLoadBalancerNodePorts"),
    Invalid("labels not a mapping", edit(service_dict(), "metadata.labels", ["a"]),
            "metadata.labels"),
    Invalid("service-proxy-name label not a string",
            edit(service_dict(), "metadata.labels", {SERVICE_PROXY_NAME_LABEL: 3}),
            f"metadata.labels[{SERVICE_PROXY_NAME_LABEL}]"),
    # kube-proxy skips a range it cannot parse (the API server never lets one in); skipping
    # the only range would open the service to everyone, so the service is refused.
    *[Invalid(f"loadBalancerSourceRanges entry {value!r}",
              service_dict(type="LoadBalancer",
                           loadBalancerSourceRanges=["10.0.0.0/8", value]),
              "spec.loadBalancerSourceRanges[1]")
      for value in ["10.0.0.1", "10.0.0.0/33", "10.0.0.0/255.0.0.0", "fe80::1%eth0/64",
                    "::/129", "", "web", 10, None]],
    Invalid("loadBalancerSourceRanges not a list",
            service_dict(loadBalancerSourceRanges="10.0.0.0/8"),
            "spec.loadBalancerSourceRanges", "must be a list"),
    *[Invalid(f"healthCheckNodePort {value!r}",
              service_dict(type="LoadBalancer", externalTrafficPolicy="Local",
                           healthCheckNodePort=value), "spec.healthCheckNodePort")
      for value in [65536, -1, True, "32000"]],
]


@pytest.mark.parametrize("case", SERVICE_INVALID, ids=lambda c: c.name)
def test_parse_service_invalid(case):
    with pytest.raises(InvalidObject) as raised:
        parse_object(case.given)
    message = str(raised.value)
    assert message.startswith("Service "), message
    assert f"{case.field}: " in message, message
    assert case.detail in message, message
    assert message.endswith("; service skipped"), message


def test_invalid_message_names_object_field_and_consequence():
    bad = service_dict(ports=[{"name": "http", "port": 80}, {"name": "x", "port": 70000}])
    with pytest.raises(InvalidObject, match="^Service default/web: spec.ports\\[1\\].port: "
                       "70000 out of range \\(1-65535\\); service skipped$"):
        parse_service(bad)


def test_huge_or_deep_values_do_not_break_the_message():
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(InvalidObject, match="spec.ports\\[0\\].port: must be a port number"):
        parse_service(service_dict(ports=[{"port": deep}]))
    with pytest.raises(InvalidObject, match="spec.ports\\[0\\].port: must be a port number"):
        parse_service(service_dict(ports=[{"port": "x" * 10**6}]))


# --- EndpointSlices ---------------------------------------------------------------------

def endpoint(address: str, ready=True, serving=True, terminating=False, node="", zone=""):
    return Endpoint((ip(address),), ready, serving, terminating, node, zone)


SLICE_CASES = [
    Valid("one endpoint, defaults",
          slice_dict(),
          EndpointSlice("default", "web-abc", "web", "IPv4", (EndpointPort("", TCP, 8080),),
                        (endpoint("10.1.0.1"),))),
    Valid("namespace defaults to default; port name and protocol default",
          edit(edit(slice_dict(ports=[{"port": 8080}]), "metadata.namespace", DELETE),
               "metadata.name", "web-1"),
          EndpointSlice("default", "web-1", "web", "IPv4", (EndpointPort("", TCP, 8080),),
                        (endpoint("10.1.0.1"),))),
    Valid("a port without a number means all ports: skipped",
          slice_dict(ports=[{"name": "all", "port": None}, {"name": "absent"},
                            {"name": "http", "port": 8080, "protocol": "UDP"}]),
          EndpointSlice("default", "web-abc", "web", "IPv4", (EndpointPort("http", UDP, 8080),),
                        (endpoint("10.1.0.1"),))),
    Valid("node, zone and several addresses",
          slice_dict(endpoints=[{"addresses": ["10.1.0.1", "10.1.0.2"], "nodeName": "n1",
                                 "zone": "z1"}]),
          EndpointSlice("default", "web-abc", "web", "IPv4", (EndpointPort("", TCP, 8080),),
                        (Endpoint((ip("10.1.0.1"), ip("10.1.0.2")), True, True, False,
                                  "n1", "z1"),))),
    Valid("IPv6 slice",
          slice_dict(addressType="IPv6", endpoints=[{"addresses": ["fd00::1"]}]),
          EndpointSlice("default", "web-abc", "web", "IPv6", (EndpointPort("", TCP, 8080),),
                        (endpoint("fd00::1"),))),
    Valid("FQDN slice keeps no endpoints: kube-proxy ignores them",
          slice_dict(addressType="FQDN", endpoints=[{"addresses": ["db.example.com"]}]),
          EndpointSlice("default", "web-abc", "web", "FQDN", (EndpointPort("", TCP, 8080),),
                        ())),
    Valid("no endpoints, no ports",
          slice_dict(endpoints=None, ports=None),
          EndpointSlice("default", "web-abc", "web", "IPv4", (), ())),
    Valid("zone and node hints",
          slice_dict(endpoints=[{"addresses": ["10.1.0.1"], "hints": {
              "forZones": [{"name": "zone-a"}, {"name": "zone-b"}],
              "forNodes": [{"name": "n1"}]}}]),
          EndpointSlice("default", "web-abc", "web", "IPv4", (EndpointPort("", TCP, 8080),),
                        (Endpoint((ip("10.1.0.1"),), True, True, False,
                                  zone_hints=frozenset({"zone-a", "zone-b"}),
                                  node_hints=frozenset({"n1"})),))),
    Valid("empty hints are no hints",
          slice_dict(endpoints=[{"addresses": ["10.1.0.1"], "hints": {"forZones": []}}]),
          EndpointSlice("default", "web-abc", "web", "IPv4", (EndpointPort("", TCP, 8080),),
                        (endpoint("10.1.0.1"),))),
    Valid("labelled headless: kept, marked",   # the controller labels a headless service's
          edit(slice_dict(), "metadata.labels",   # slices; kube-proxy's informers skip them
               {"kubernetes.io/service-name": "web", HEADLESS_LABEL: ""}),
          EndpointSlice("default", "web-abc", "web", "IPv4", (EndpointPort("", TCP, 8080),),
                        (endpoint("10.1.0.1"),), excluded_by_label=HEADLESS_LABEL)),
    Valid("IPv6 addresses in full and compressed form",
          slice_dict(addressType="IPv6", endpoints=[{"addresses": ["fd00:0:0:0:0:0:0:1"]}]),
          EndpointSlice("default", "web-abc", "web", "IPv6", (EndpointPort("", TCP, 8080),),
                        (endpoint("fd00::1"),))),
]


@pytest.mark.parametrize("case", SLICE_CASES, ids=lambda c: c.name)
def test_parse_endpoint_slice(case):
    assert parse_endpoint_slice(case.given) == case.want
    assert parse_object(case.given) == case.want


CONDITION_CASES = [
    # (conditions, want (ready, serving, terminating))  -- EndpointConditions API defaults
    ("all absent: unknown counts as ready", None, (True, True, False)),
    ("empty mapping", {}, (True, True, False)),
    ("not ready, serving unset counts as serving (kube-proxy)", {"ready": False},
     (False, True, False)),
    ("terminating and still serving", {"ready": False, "serving": True, "terminating": True},
     (False, True, True)),
    ("terminating, not serving", {"ready": False, "serving": False, "terminating": True},
     (False, False, True)),
    ("explicit nulls", {"ready": None, "serving": None, "terminating": None},
     (True, True, False)),
]


@pytest.mark.parametrize("name,conditions,want", CONDITION_CASES,
                         ids=[c[0] for c in CONDITION_CASES])
def test_endpoint_conditions(name, conditions, want):
    raw = {"addresses": ["10.1.0.1"]} | ({} if conditions is None else {"conditions": conditions})
    (parsed,) = parse_endpoint_slice(slice_dict(endpoints=[raw])).endpoints
    assert (parsed.ready, parsed.serving, parsed.terminating) == want


SLICE_INVALID = [
    Invalid("no service-name label", edit(slice_dict(), "metadata.labels", {}),
            "metadata.labels[kubernetes.io/service-name]", "required"),
    Invalid("no labels at all", edit(slice_dict(), "metadata.labels", DELETE),
            "metadata.labels[kubernetes.io/service-name]"),
    Invalid("no metadata.name", edit(slice_dict(), "metadata.name", DELETE), "metadata.name"),
    Invalid("no addressType", edit(slice_dict(), "addressType", DELETE), "addressType"),
    Invalid("unknown addressType", slice_dict(addressType="IPv5"), "addressType"),
    Invalid("addressType not a string", slice_dict(addressType=["IPv4"]), "addressType"),
    Invalid("bad endpoint address",
            slice_dict(endpoints=[{"addresses": ["10.1.0.1"]}, {"addresses": ["10.1.0.x"]}]),
            "endpoints[1].addresses[0]", "not a valid IP address"),
    Invalid("IPv6 address in an IPv4 slice",
            slice_dict(endpoints=[{"addresses": ["fd00::1"]}]),
            "endpoints[0].addresses[0]", "not an IPv4 address"),
    Invalid("IPv4 address in an IPv6 slice",
            slice_dict(addressType="IPv6", endpoints=[{"addresses": ["10.1.0.1"]}]),
            "endpoints[0].addresses[0]", "not an IPv6 address"),
    Invalid("endpoint without addresses", slice_dict(endpoints=[{"addresses": []}]),
            "endpoints[0].addresses", "at least one"),
    Invalid("endpoint not a mapping", slice_dict(endpoints=["10.1.0.1"]), "endpoints[0]"),
    Invalid("port out of range", slice_dict(ports=[{"name": "", "port": 70000}]),
            "ports[0].port", "70000 out of range"),
    Invalid("port as a string", slice_dict(ports=[{"name": "", "port": "8080"}]),
            "ports[0].port"),
    Invalid("unknown protocol", slice_dict(ports=[{"port": 8080, "protocol": "QUIC"}]),
            "ports[0].protocol"),
    Invalid("duplicate port names",
            slice_dict(ports=[{"name": "http", "port": 80}, {"name": "http", "port": 81}]),
            "ports[1].name", "duplicate"),
    Invalid("ready not a boolean",
            slice_dict(endpoints=[{"addresses": ["10.1.0.1"], "conditions": {"ready": "yes"}}]),
            "endpoints[0].conditions.ready"),
    Invalid("nodeName not a string",
            slice_dict(endpoints=[{"addresses": ["10.1.0.1"], "nodeName": 3}]),
            "endpoints[0].nodeName"),
    Invalid("more endpoints than the API allows",
            slice_dict(endpoints=[{"addresses": ["10.1.0.1"]}] * 1001), "endpoints", "1001"),
    Invalid("addresses not a list", slice_dict(endpoints=[{"addresses": "10.1.0.1"}]),
            "endpoints[0].addresses"),
    Invalid("IPv4 address with a leading zero",
            slice_dict(endpoints=[{"addresses": ["10.1.0.01"]}]), "endpoints[0].addresses[0]"),
    Invalid("conditions not a mapping",
            slice_dict(endpoints=[{"addresses": ["10.1.0.1"], "conditions": [True]}]),
            "endpoints[0].conditions"),
    Invalid("terminating not a boolean",
            slice_dict(endpoints=[{"addresses": ["10.1.0.1"],
                                   "conditions": {"terminating": 1}}]),
            "endpoints[0].conditions.terminating"),
    Invalid("zone not a string",
            slice_dict(endpoints=[{"addresses": ["10.1.0.1"], "zone": ["a"]}]),
            "endpoints[0].zone"),
    Invalid("hints not a mapping",
            slice_dict(endpoints=[{"addresses": ["10.1.0.1"], "hints": ["zone-a"]}]),
            "endpoints[0].hints"),
    Invalid("zone hint without a name",
            slice_dict(endpoints=[{"addresses": ["10.1.0.1"],
                                   "hints": {"forZones": [{"zone": "a"}]}}]),
            "endpoints[0].hints.forZones[0].name", "required"),
    Invalid("node hint not a mapping",
            slice_dict(endpoints=[{"addresses": ["10.1.0.1"], "hints": {"forNodes": ["n1"]}}]),
            "endpoints[0].hints.forNodes[0]"),
    Invalid("more zone hints than the API allows",
            slice_dict(endpoints=[{"addresses": ["10.1.0.1"], "hints": {
                "forZones": [{"name": f"z{i}"} for i in range(9)]}}]),
            "endpoints[0].hints.forZones", "limit of 8"),
]


@pytest.mark.parametrize("case", SLICE_INVALID, ids=lambda c: c.name)
def test_parse_endpoint_slice_invalid(case):
    with pytest.raises(InvalidObject) as raised:
        parse_object(case.given)
    message = str(raised.value)
    assert message.startswith("EndpointSlice "), message
    assert f"{case.field}: " in message, message
    assert case.detail in message, message
    assert message.endswith("; endpoint slice skipped"), message


# --- dispatch and keys ------------------------------------------------------------------

NOT_HANDLED = [
    ("Deployment", {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}}),
    ("Node of another API group", {"apiVersion": "example.com/v1", "kind": "Node",
                                   "metadata": {"name": "n1"}}),
    ("old EndpointSlice API", edit(slice_dict(), "apiVersion", "discovery.k8s.io/v1beta1")),
    ("Service without apiVersion", edit(service_dict(), "apiVersion", DELETE)),
    ("v1 Endpoints", {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "web"}}),
    ("unhashable kind", {"apiVersion": "v1", "kind": ["Service"]}),
]


@pytest.mark.parametrize("name,given", NOT_HANDLED, ids=[c[0] for c in NOT_HANDLED])
def test_parse_object_ignores_other_kinds(name, given):
    assert parse_object(given) is None
    assert object_key(given) is None


@pytest.mark.parametrize("given", [None, [], "Service", 3])
def test_parse_object_rejects_non_mappings(given):
    with pytest.raises(InvalidObject, match="not a mapping"):
        parse_object(given)


KEY_CASES = [
    ("service", service_dict(ports="broken"), ObjectKey("Service", "default", "web")),
    ("slice in another namespace", edit(slice_dict(addressType="bad"), "metadata.namespace",
                                        "shop"), ObjectKey("EndpointSlice", "shop", "web-abc")),
    ("namespace defaults", edit(service_dict(), "metadata.namespace", DELETE),
     ObjectKey("Service", "default", "web")),
    ("no name: no key", edit(service_dict(), "metadata.name", DELETE), None),
    ("metadata not a mapping", edit(service_dict(), "metadata", "web"), None),
    ("node: cluster-scoped, a namespace is ignored",
     edit(node_dict(), "metadata.namespace", "default"), ObjectKey("Node", "", "n1")),
]


@pytest.mark.parametrize("name,given,want", KEY_CASES, ids=[c[0] for c in KEY_CASES])
def test_object_key_of_a_possibly_invalid_object(name, given, want):
    assert object_key(given) == want


# --- Nodes ------------------------------------------------------------------------------

NODE_CASES = [
    Valid("labels sorted, name addresses dropped",
          node_dict(),
          Node("n1", (("kubernetes.io/hostname", "n1"), ("topology.kubernetes.io/zone", "zone-a")),
               (NodeAddress("InternalIP", ip("192.168.0.2")),))),
    Valid("no labels, no status",
          {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"}},
          Node("n2")),
    Valid("dual-stack, internal and external",
          node_dict(addresses=[{"type": "ExternalIP", "address": "203.0.113.5"},
                               {"type": "InternalIP", "address": "2001:db8::1"},
                               {"type": "InternalIP", "address": "192.168.0.2"}]),
          Node("n1", (("kubernetes.io/hostname", "n1"), ("topology.kubernetes.io/zone", "zone-a")),
               (NodeAddress("ExternalIP", ip("203.0.113.5")),
                NodeAddress("InternalIP", ip("2001:db8::1")),
                NodeAddress("InternalIP", ip("192.168.0.2"))))),
]


@pytest.mark.parametrize("case", NODE_CASES, ids=lambda c: c.name)
def test_parse_node(case):
    assert parse_node(case.given) == case.want
    assert parse_object(case.given) == case.want


def test_node_zone_and_host_ips():   # component-helpers nodeutil.GetNodeHostIPs
    node = parse_node(node_dict(addresses=[
        {"type": "ExternalIP", "address": "203.0.113.5"},
        {"type": "InternalIP", "address": "192.168.0.2"},
        {"type": "InternalIP", "address": "192.168.1.2"},
        {"type": "ExternalIP", "address": "2001:db8::5"}]))
    assert node.zone == "zone-a"
    assert node.key == ObjectKey("Node", "", "n1")
    assert node.host_ips() == (ip("192.168.0.2"), ip("2001:db8::5"))
    assert Node("n2").zone == "" and Node("n2").host_ips() == ()


NODE_INVALID = [
    Invalid("no name", edit(node_dict(), "metadata.name", DELETE), "metadata.name", "required"),
    Invalid("bad InternalIP",
            node_dict(addresses=[{"type": "InternalIP", "address": "192.168.0.300"}]),
            "status.addresses[0].address", "not a valid IP address"),
    Invalid("address type missing", node_dict(addresses=[{"address": "192.168.0.2"}]),
            "status.addresses[0].type", "required"),
    Invalid("addresses not a list", node_dict(addresses={"type": "InternalIP"}),
            "status.addresses"),
    Invalid("label value not a string",
            edit(node_dict(), "metadata.labels", {"topology.kubernetes.io/zone": 1}),
            "metadata.labels[topology.kubernetes.io/zone]"),
    Invalid("status not a mapping", edit(node_dict(), "status", "Ready"), "status"),
]


@pytest.mark.parametrize("case", NODE_INVALID, ids=lambda c: c.name)
def test_parse_node_invalid(case):
    with pytest.raises(InvalidObject) as raised:
        parse_object(case.given)
    message = str(raised.value)
    assert message.startswith("Node "), message
    assert f"{case.field}: " in message, message
    assert case.detail in message, message
    assert message.endswith("; node skipped"), message


# --- the IPv4 fast path accepts exactly what ipaddress accepts ---------------------------

def _ipaddress_v4(text: str):
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        return None


dotted = st.lists(st.one_of(st.integers(0, 300).map(str), st.sampled_from(
    ["", "00", "01", "010", "0x1", "+1", "-1", " 1", "1 ", "\u0661", "1\u0660", "256", "999",
     "0000", "1e2"])), min_size=3, max_size=5).map(".".join)


@given(st.one_of(dotted, st.text(max_size=16)))
def test_fast_ipv4_agrees_with_ipaddress(text):
    fast = fast_ipv4(text)
    assert fast is None or fast == _ipaddress_v4(text)
    if fast is None and text.count(".") == 3 and text.isascii():
        # The fallback then decides; the fast path only declines odd-looking text.
        assert _ipaddress_v4(text) is None or not all(
            p.isdigit() and len(p) <= 3 and (p[0] != "0" or len(p) == 1)
            for p in text.split("."))


def test_endpoint_is_a_value_whatever_its_stored_form():
    """types.Endpoint keeps one IPv4 address as its integer and its other fields in a
    shared tuple: it must still compare, hash, copy, pickle and refuse assignment as the
    frozen dataclass did, and read back every field as given."""
    import pickle
    v4, v6 = ipaddress.ip_address("10.1.0.7"), ipaddress.ip_address("fd00::7")
    hints = frozenset({"zone-a"})
    parsed = parse_endpoint_slice(slice_dict(endpoints=[{
        "addresses": ["10.1.0.7"], "conditions": {"ready": False, "terminating": True},
        "nodeName": "node-1", "zone": "zone-a", "hints": {"forZones": [{"name": "zone-a"}]}}]
    )).endpoints[0]
    built = Endpoint((v4,), False, True, True, "node-1", "zone-a", hints)
    assert parsed == built and hash(parsed) == hash(built)
    assert (built.addresses, built.ready, built.serving, built.terminating, built.node_name,
            built.zone, built.zone_hints, built.node_hints) == \
        ((v4,), False, True, True, "node-1", "zone-a", hints, frozenset())
    for other in (Endpoint((v4,), True, True, True, "node-1", "zone-a", hints),
                  Endpoint((v4, v4), False, True, True, "node-1", "zone-a", hints),
                  Endpoint((ipaddress.ip_address("10.1.0.8"),), False, True, True,
                           "node-1", "zone-a", hints)):
        assert other != built
    two = Endpoint((v4, ipaddress.ip_address("10.1.0.8")), True, True, False)
    six = Endpoint((v6,), True, True, False)
    for endpoint in (built, two, six):
        assert pickle.loads(pickle.dumps(endpoint)) == endpoint
        assert copy.deepcopy(endpoint) == endpoint
        assert eval(repr(endpoint), {"Endpoint": Endpoint, "IPv4Address": ipaddress.IPv4Address,
                                     "IPv6Address": ipaddress.IPv6Address}) == endpoint
    assert two.addresses[1] == ipaddress.ip_address("10.1.0.8") and six.addresses == (v6,)
    with pytest.raises(AttributeError):
        built.ready = True
    assert len({built, parsed, two, six}) == 3
