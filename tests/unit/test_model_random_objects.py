"""Properties of the border and the model together (agent/model/objects.py and
desired_state): random, partly broken objects never break the model, and arbitrary input
raises only InvalidObject."""
from __future__ import annotations

import copy
import functools
import ipaddress
import operator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model import NodeContext, desired_state
from agent.model.objects import parse_object
from agent.model.types import (
    HEADLESS_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    EndpointSlice,
    FrontendKind,
    InvalidObject,
    Node,
    Service,
)
from tests.helpers import (
    ip,
)

junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=4),
                 st.floats(), st.lists(st.integers(), max_size=2),
                 st.sampled_from(["None", "", "10.1.0.300", "fd00::1", "10.1.0.1", "UDP",
                                  "Local", "Proxy", "ClientIP", "127.0.0.1"]),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
ADDRESSES = {"IPv4": ["10.96.0.1", "10.1.0.1", "10.1.0.2", "10.1.0.3"],
             "IPv6": ["fd00::1", "fd00::2", "::ffff:10.1.0.1"]}
EXTERNAL = ["192.168.99.11", "192.168.0.2", "1.2.3.4", "2001:db8::99", "2001:db8::1"]
NODES = ["n1", "n2", ""]
ZONES = ["zone-a", "zone-b"]


def _paths(value, prefix=()):
    yield prefix
    children = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from _paths(child, (*prefix, key))


@st.composite
def corrupted(draw, value):
    """value with up to two fields deleted or replaced by junk; mostly left intact."""
    value = copy.deepcopy(value)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        *parents, last = draw(st.sampled_from(list(_paths(value))[1:]))
        parent = functools.reduce(operator.getitem, parents, value)
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[last]
        else:
            parent[last] = draw(junk)
    return value


def maybe(draw, strategy, absent=0.5):
    return draw(strategy) if draw(st.floats(0, 1)) >= absent else None


@st.composite
def service_dicts(draw):
    families = draw(st.sampled_from([["IPv4"], ["IPv6"], ["IPv4", "IPv6"], ["IPv6", "IPv4"],
                                     ["None"]]))
    ips = [f if f == "None" else draw(st.sampled_from(ADDRESSES[f])) for f in families]
    service_type = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer",
                                         "ExternalName"]))
    count = draw(st.integers(1, 3))
    port_names = draw(st.permutations(["http", "dns", "metrics"]))[:count]
    if count == 1:
        port_names = [draw(st.sampled_from(["", "http"]))]
    ports = [{"name": name, "protocol": draw(st.sampled_from(["TCP", "UDP", "SCTP"])),
              "port": draw(st.sampled_from([53, 80, 443, 65535])),
              "targetPort": draw(st.one_of(st.integers(1, 65535), st.just("http")))}
             for name in port_names]
    if service_type in ("NodePort", "LoadBalancer"):
        for i, port in enumerate(ports):
            port["nodePort"] = draw(st.sampled_from([0, 30000 + i, 30080 + i, 32767 - i]))
    spec = {"type": service_type, "clusterIP": ips[0], "clusterIPs": ips, "ports": ports}
    optional = {
        "externalIPs": st.lists(st.sampled_from(EXTERNAL), max_size=3),
        "internalTrafficPolicy": st.sampled_from(["Cluster", "Local"]),
        "externalTrafficPolicy": st.sampled_from(["Cluster", "Local"]),
        "sessionAffinity": st.sampled_from(["None", "ClientIP"]),
        "ipFamilies": st.just(["IPv6" if ":" in a else "IPv4" for a in ips if a != "None"]),
        "trafficDistribution": st.sampled_from(["PreferClose", "PreferSameNode"]),
        "loadBalancerSourceRanges": st.lists(st.sampled_from(
            ["10.0.0.0/8", " 192.168.0.0/16", "0.0.0.0/0", "2001:db8::/32", "::/0",
             "192.168.99.11/32"]), max_size=3),
        "healthCheckNodePort": st.sampled_from([0, 30000, 32767]),
    }
    for key, strategy in optional.items():
        value = maybe(draw, strategy)
        if value is not None:
            spec[key] = value
    if spec.get("sessionAffinity") == "ClientIP" and draw(st.booleans()):
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": draw(st.sampled_from(
            [1, 60, 10800, 86400]))}}
    metadata = {"name": draw(st.sampled_from(["web", "dns"])),
                "namespace": draw(st.sampled_from(["default", "shop"]))}
    label = maybe(draw, st.sampled_from([SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL]), 0.9)
    if label:
        metadata["labels"] = {label: ""}
    raw = {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec}
    ingress = maybe(draw, st.lists(st.fixed_dictionaries(
        {"ip": st.sampled_from(EXTERNAL)},
        optional={"ipMode": st.sampled_from(["VIP", "Proxy"])}), max_size=2))
    if ingress:
        raw["status"] = {"loadBalancer": {"ingress": ingress}}
    return raw


TERMINATING = {"ready": False, "serving": True, "terminating": True}
CONDITIONS = st.one_of(st.sampled_from([{}, {"ready": False}, TERMINATING, TERMINATING,
                                        {"ready": False, "serving": False, "terminating": True}]),
                       st.fixed_dictionaries({}, optional={
                           key: st.booleans() for key in ("ready", "serving", "terminating")}))
HINTS = st.fixed_dictionaries({}, optional={
    "forZones": st.lists(st.fixed_dictionaries({"name": st.sampled_from(ZONES)}), max_size=2),
    "forNodes": st.lists(st.fixed_dictionaries({"name": st.sampled_from(NODES[:2])}),
                         max_size=2)})


@st.composite
def slice_dicts_for(draw, service: dict, index: int):
    """A slice that mostly fits the service: its name, port names, protocols and families."""
    meta, spec = service["metadata"], service["spec"]
    own = [f for f in spec["clusterIPs"] if f != "None"]
    own = ["IPv6" if ":" in ip else "IPv4" for ip in own]
    family = draw(st.sampled_from(own * 4 + ["IPv4", "IPv6", "FQDN"]))
    ports = [{"name": p["name"],
              "protocol": draw(st.sampled_from([p["protocol"]] * 4 + ["TCP", "UDP"])),
              "port": draw(st.sampled_from([None] + [p["port"], 8080, 1, 65535] * 3))}
             for p in spec["ports"] if draw(st.integers(0, 4))]
    endpoints = []
    for _ in range(draw(st.integers(1, 4))):
        endpoint = {"addresses": [draw(st.sampled_from(ADDRESSES.get(family, ["db.local"])))],
                    "conditions": draw(CONDITIONS)}
        node = draw(st.sampled_from(NODES))
        if node:
            endpoint["nodeName"] = node
        hints = maybe(draw, HINTS)
        if hints is not None:
            endpoint["hints"] = hints
        endpoints.append(endpoint)
    labels = {"kubernetes.io/service-name": meta["name"]}
    if draw(st.integers(0, 9)) == 0:
        labels[HEADLESS_LABEL] = ""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{meta['name']}-{index}", "namespace": meta["namespace"],
                         "labels": labels},
            "addressType": family, "ports": ports, "endpoints": endpoints}


node_dicts = st.builds(
    lambda name, zone, addresses: {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"addresses": [{"type": t, "address": a} for t, a in addresses]}},
    st.sampled_from(NODES[:2]), st.sampled_from(ZONES),
    st.lists(st.tuples(st.sampled_from(["InternalIP", "ExternalIP", "Hostname"]),
                       st.sampled_from(["192.168.0.2", "192.168.1.2", "2001:db8::1", "n1"])),
             max_size=3))
node_port_cidrs = st.lists(st.sampled_from(["192.168.0.0/24", "192.168.0.2/32",
                                            "2001:db8::/64", "10.0.0.0/8"]), max_size=2)


@st.composite
def worlds(draw):
    """Raw services, slices and a node that mostly belong together, some fields broken."""
    services = draw(st.lists(service_dicts(), min_size=1, max_size=3))
    slices = [draw(slice_dicts_for(service, i))
              for service in services for i in range(draw(st.integers(0, 3)))]
    return ([draw(corrupted(raw)) for raw in services],
            [draw(corrupted(raw)) for raw in slices],
            draw(corrupted(draw(node_dicts))), draw(node_port_cidrs))


def parsed(raw_objects):
    out = []
    for raw in raw_objects:
        try:
            obj = parse_object(raw)
        except InvalidObject:
            continue
        if obj is not None:
            out.append(obj)
    return out


def check_backend_set(backends, family, node_name=None):
    for backend in backends:
        assert backend.address.version == family
        assert 1 <= backend.port <= 65535
        if node_name is not None:
            assert node_name and backend.node_name == node_name, "a Local set holds local ones"
    assert len({b.state for b in backends}) <= 1, "terminating only when none is ready"
    keys = [(b.address, b.port) for b in backends]
    assert len(keys) == len(set(keys)), "backends de-duplicated"
    assert list(backends) == sorted(backends, key=lambda b: b.sort_key())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_random_objects_never_break_the_model(world):
    raw_services, raw_slices, raw_node, cidrs = world
    # One object per key, the last one winning, as every source delivers them.
    services = list({s.key: s for s in parsed(raw_services)}.values())
    slices = list({s.key: s for s in parsed(raw_slices)}.values())
    nodes = parsed([raw_node])
    assert all(isinstance(s, Service) for s in services)
    assert all(isinstance(s, EndpointSlice) for s in slices)
    assert all(isinstance(n, Node) for n in nodes)
    node = NodeContext.from_node(nodes[0] if nodes else None, "n1",
                                 node_port_cidrs=tuple(map(ipaddress.ip_network, cidrs)))
    by_key = {(s.namespace, s.name): s for s in services}
    for (name, family), sps in desired_state(services, slices, node).items():
        assert family in (4, 6) and sps.family == family and sps.name == name
        service = by_key[name.namespace, name.name]
        assert not service.excluded_by_label and not service.headless
        assert service.type != "ExternalName"
        kinds = [f.kind for f in sps.frontends]
        assert kinds.count(FrontendKind.CLUSTER_IP) == 1
        claimed = [(f.address, f.port, f.protocol) for f in sps.frontends]
        assert len(claimed) == len(set(claimed)), "one frontend per address, port, protocol"
        assert list(sps.frontends) == sorted(sps.frontends, key=lambda f: f.sort_key())
        for frontend in sps.frontends:
            assert frontend.address.version == family
            assert 1 <= frontend.port <= 65535
            assert frontend.protocol == name.protocol
            if frontend.kind is FrontendKind.NODE_PORT:
                assert frontend.address in node.node_port_ips(family), "NodePort on node IPs"
            elif frontend.kind is FrontendKind.EXTERNAL_IP:
                assert frontend.address in service.external_ips
            elif frontend.kind is FrontendKind.LOAD_BALANCER:
                assert any(i.ip == frontend.address and i.ip_mode == "VIP"
                           for i in service.load_balancer_ingress)
            else:
                assert frontend.address in service.cluster_ips
        local = service.internal_traffic_policy == "Local"
        check_backend_set(sps.backends, family, node.node_name if local else None)
        check_backend_set(sps.external_backends, family)
        check_backend_set(sps.outside_backends, family)
        if not any(k.external for k in kinds):
            assert not sps.outside_backends
        if sps.backends or sps.external_backends or sps.outside_backends:
            assert sps.has_any_endpoints
        assert 0 <= sps.session_affinity_timeout <= 86400
        assert (sps.session_affinity_timeout > 0) == (service.session_affinity_timeout > 0)
        assert all(r.version == family for r in sps.source_ranges)
        assert list(sps.source_ranges) == sorted(set(sps.source_ranges), key=lambda r: (
            int(r.network_address), r.prefixlen)), "sorted, de-duplicated"
        assert all(r.prefixlen for r in sps.source_ranges), "a /0 means no restriction"
        assert set(sps.source_ranges) <= set(service.load_balancer_source_ranges) | {
            ipaddress.ip_network(i.ip) for i in service.load_balancer_ingress}


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                               max_size=3),
    max_leaves=20)
kinds = st.sampled_from([("v1", "Service"), ("discovery.k8s.io/v1", "EndpointSlice"),
                         ("v1", "Node")])


@settings(max_examples=300, deadline=None)
@given(kinds, st.dictionaries(st.sampled_from(["metadata", "spec", "ports", "endpoints",
                                               "addressType", "status"]), json_values))
def test_arbitrary_json_raises_only_invalid_object(kind, body):
    raw = {"apiVersion": kind[0], "kind": kind[1], **body}
    try:
        parse_object(raw)
    except InvalidObject:
        pass


spec_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-1, 70000), st.sampled_from(
        ["Local", "Cluster", "ClientIP", "VIP", "Proxy", "1.2.3.4", "fd00::1", "TCP", ""])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["ip", "ipMode", "clientIP", "timeoutSeconds", "name", "port",
                         "nodePort", "ingress", "loadBalancer", "forZones", "hints"]),
        inner, max_size=3),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(
    ["externalIPs", "sessionAffinity", "sessionAffinityConfig", "internalTrafficPolicy",
     "externalTrafficPolicy", "ipFamilies", "allocateLoadBalancerNodePorts", "type"]),
    spec_values), spec_values)
def test_arbitrary_service_fields_raise_only_invalid_object(spec, status):
    raw = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "nodePort": 30080}],
                    **spec}, "status": {"loadBalancer": status}}
    try:
        service = parse_object(raw)
    except InvalidObject:
        return
    desired_state([service], [], NodeContext("n1", (ip("10.96.0.99"),)))
