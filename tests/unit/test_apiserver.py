"""The manifest source's stand-in for a cluster's control plane (agent/sources/apiserver):
the API server's defaults, IP family rules, cluster IP and node port allocation, Endpoints
mirroring, as tables named after the Kubernetes rule they mirror."""
from __future__ import annotations

import ipaddress
import json
import logging
from dataclasses import dataclass, field

import pytest

from agent.model.objects import parse_object
from agent.sources.apiserver.allocator import RangeAllocator, static_band
from agent.sources.apiserver.control_plane import ControlPlane
from agent.sources.apiserver.defaults import (
    AdmissionError,
    default_service,
    ip_families,
    with_namespace,
)
from agent.sources.apiserver.mirroring import mirror
from agent.sources.manifests import ManifestSource


def svc(name, namespace="default", **spec):
    spec.setdefault("ports", [{"port": 80}])
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def endpoints(name, ready=(), not_ready=(), ports=({"name": "http", "port": 8080},),
              labels=None):
    subset = {"addresses": [{"ip": a} for a in ready],
              "notReadyAddresses": [{"ip": a} for a in not_ready], "ports": list(ports)}
    return {"apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": name, "labels": labels or {}}, "subsets": [subset]}


def admitted(control_plane, file, *objects):
    """One file's objects as admitted; the pass then settled with every file read so far
    (the stale files it names are left for the test to look at)."""
    out = control_plane.admit(file, [(f"document[{i}]", o) for i, o in enumerate(objects)])
    control_plane.files_read = getattr(control_plane, "files_read", set()) | {file}
    control_plane.stale = control_plane.settle(control_plane.files_read)
    return [raw for _, raw in out]


# --- SetDefaults_Service -------------------------------------------------------------

@dataclass
class Default:
    name: str
    spec: dict
    want: dict
    ports: list = field(default_factory=list)


DEFAULTS = [
    Default("type ClusterIP, sessionAffinity None, internalTrafficPolicy Cluster",
            {"ports": [{"port": 80}]},
            {"type": "ClusterIP", "sessionAffinity": "None", "internalTrafficPolicy": "Cluster"},
            [{"port": 80, "protocol": "TCP", "targetPort": 80}]),
    Default("targetPort 0 and empty default to port", {"ports": [
        {"port": 80, "targetPort": 0}, {"port": 81, "targetPort": ""}]}, {},
        [{"port": 80, "protocol": "TCP", "targetPort": 80},
         {"port": 81, "protocol": "TCP", "targetPort": 81}]),
    Default("a named targetPort stays", {"ports": [{"port": 80, "targetPort": "http",
                                                     "protocol": "UDP"}]}, {},
            [{"port": 80, "targetPort": "http", "protocol": "UDP"}]),
    Default("ClientIP affinity gets the 10800 s timeout", {"sessionAffinity": "ClientIP"},
            {"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10800}}}),
    Default("NodePort: externalTrafficPolicy Cluster", {"type": "NodePort"},
            {"externalTrafficPolicy": "Cluster"}),
    Default("LoadBalancer: allocateLoadBalancerNodePorts true", {"type": "LoadBalancer"},
            {"externalTrafficPolicy": "Cluster", "allocateLoadBalancerNodePorts": True}),
    Default("ExternalName: no internalTrafficPolicy", {"type": "ExternalName"},
            {"type": "ExternalName"}),
    Default("given values win", {"type": "NodePort", "externalTrafficPolicy": "Local",
                                 "internalTrafficPolicy": "Local"},
            {"externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local"}),
]


@pytest.mark.parametrize("case", DEFAULTS, ids=lambda c: c.name)
def test_set_defaults_service(case):
    raw = svc("web", **case.spec)
    before = json.dumps(raw, sort_keys=True)
    spec = default_service(raw)["spec"]
    assert json.dumps(raw, sort_keys=True) == before          # the input is not changed
    for key, value in case.want.items():
        assert spec[key] == value, key
    if case.ports:
        assert spec["ports"] == case.ports
    if case.spec.get("type") == "ExternalName":
        assert "internalTrafficPolicy" not in spec


def test_a_missing_namespace_is_default_as_kubectl_applies_it():
    raw = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}}
    assert with_namespace(raw)["metadata"]["namespace"] == "default"
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}}
    assert with_namespace(deployment) is deployment            # only kinds read


# --- IP families (the service REST's initIPFamilyFields) -----------------------------

@dataclass
class Families:
    name: str
    spec: dict
    cluster: tuple
    want: tuple | None            # (families, policy); None: refused
    given: list = field(default_factory=list)


FAMILY_CASES = [
    Families("SingleStack by default, the primary family", {}, (4, 6), ([4], "SingleStack")),
    Families("ipFamilies picks the family", {"ipFamilies": ["IPv6"]}, (4, 6),
             ([6], "SingleStack")),
    Families("PreferDualStack on a dual-stack cluster: both, primary first",
             {"ipFamilyPolicy": "PreferDualStack"}, (4, 6), ([4, 6], "PreferDualStack")),
    Families("PreferDualStack on a single-stack cluster: one",
             {"ipFamilyPolicy": "PreferDualStack"}, (4,), ([4], "PreferDualStack")),
    Families("RequireDualStack keeps the requested order",
             {"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv6"]}, (4, 6),
             ([6, 4], "RequireDualStack")),
    Families("RequireDualStack on a single-stack cluster is refused",
             {"ipFamilyPolicy": "RequireDualStack"}, (4,), None),
    Families("two ipFamilies without a policy: RequireDualStack",
             {"ipFamilies": ["IPv4", "IPv6"]}, (4, 6), ([4, 6], "RequireDualStack")),
    Families("a given IPv6 clusterIP sets the family", {}, (4, 6), ([6], "SingleStack"),
             ["fd00:10:96::5"]),
    Families("SingleStack with two families is refused",
             {"ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv4", "IPv6"]}, (4, 6), None),
    Families("an unknown policy is refused", {"ipFamilyPolicy": "Dual"}, (4, 6), None),
]


@pytest.mark.parametrize("case", FAMILY_CASES, ids=lambda c: c.name)
def test_ip_families(case):
    if case.want is None:
        with pytest.raises(AdmissionError):
            ip_families("default/web", case.spec, case.given, case.cluster)
    else:
        assert ip_families("default/web", case.spec, case.given, case.cluster) == case.want


# --- allocators (ipallocator, portallocator) -----------------------------------------

@pytest.mark.parametrize("size,band,want", [
    (8, (16, 256, 16), 0),            # calculateRangeOffset: below the minimum, no band
    (254, (16, 256, 16), 16),         # a /24: the minimum
    (1048574, (16, 256, 16), 256),    # kubeadm's /12: the maximum
    (2768, (16, 128, 32), 86),        # 30000-32767: size / 32
])
def test_static_band(size, band, want):
    assert static_band(size, band) == want


def test_the_network_and_broadcast_addresses_are_never_allocated():
    allocator = RangeAllocator.for_network(ipaddress.ip_network("10.0.0.0/30"))
    got = {allocator.allocate(f"s{i}", f"ns/s{i}") for i in range(3)}
    assert got == {int(ipaddress.ip_address("10.0.0.1")), int(ipaddress.ip_address("10.0.0.2")),
                   None}


def test_allocation_prefers_the_dynamic_band_then_fills_the_static_one():
    allocator = RangeAllocator.for_ports(30000, 30099)          # band: 16 ports
    got = [allocator.allocate(f"s{i}", f"ns/s{i}") for i in range(100)]
    assert all(p >= 30016 for p in got[:84]) and sorted(got) == list(range(30000, 30100))
    assert allocator.full and allocator.allocate("more", "ns/more") is None


# --- cluster IPs ----------------------------------------------------------------------

def test_a_service_without_a_cluster_ip_is_allocated_one_in_range_not_headless():
    out = admitted(ControlPlane("10.96.0.0/12"), "web.yaml", svc("web"))
    service = parse_object(out[0])
    assert not service.headless and len(service.cluster_ips) == 1
    assert service.cluster_ips[0] in ipaddress.ip_network("10.96.0.0/12")
    assert int(service.cluster_ips[0]) - int(ipaddress.ip_address("10.96.0.0")) > 256
    assert parse_object(admitted(ControlPlane(), "h.yaml", svc("h", clusterIP="None"))[0]
                        ).headless


def test_allocation_is_the_same_on_every_node_whatever_the_file_order():
    one, two = ControlPlane(), ControlPlane()
    a = admitted(one, "a.yaml", svc("a"), svc("b"))
    b = list(reversed(admitted(two, "a.yaml", svc("b"), svc("a"))))
    assert [x["spec"]["clusterIPs"] for x in a] == [x["spec"]["clusterIPs"] for x in b]


def test_dual_stack_allocation_gives_one_address_per_family():
    out = admitted(ControlPlane("10.96.0.0/12,fd00:10:96::/112"), "web.yaml",
                   svc("web", ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv6", "IPv4"]))
    service = parse_object(out[0])
    assert [ip.version for ip in service.cluster_ips] == [6, 4]
    assert out[0]["spec"]["ipFamilies"] == ["IPv6", "IPv4"]


def test_a_given_address_wins_and_the_service_allocated_it_moves():
    control_plane = ControlPlane("10.96.0.0/28")   # 14 addresses, no static band
    first = admitted(control_plane, "a.yaml", svc("a"))[0]["spec"]["clusterIP"]
    admitted(control_plane, "b.yaml", svc("b", clusterIP=first))
    assert control_plane.stale == {"a.yaml"}                           # read a again
    moved = admitted(control_plane, "a.yaml", svc("a"))[0]["spec"]["clusterIP"]
    assert moved != first
    assert control_plane.allocations["default", "a"].cluster_ips == {moved}


def test_an_explicit_address_is_never_allocated_to_another():
    control_plane = ControlPlane("10.96.0.0/29")   # 6 addresses
    given = [f"10.96.0.{i}" for i in range(1, 6)]
    admitted(control_plane, "fixed.yaml", *[svc(f"f{i}", clusterIP=ip)
                                             for i, ip in enumerate(given)])
    out = admitted(control_plane, "new.yaml", svc("new"))
    assert out[0]["spec"]["clusterIP"] == "10.96.0.6"


def test_exhaustion_is_reported_once_per_version_and_the_previous_version_kept(caplog):
    control_plane = ControlPlane("10.96.0.0/30")   # 2 addresses
    admitted(control_plane, "a.yaml", svc("a"), svc("b"))
    caplog.set_level(logging.WARNING)
    for _ in range(3):                              # the same version read again
        assert admitted(control_plane, "c.yaml", svc("c")) == []
    lines = [r for r in caplog.records if "service_not_admitted" in r.getMessage()]
    assert len(lines) == 1 and "range exhausted" in lines[0].getMessage()
    assert control_plane.failures == 1
    assert [p[:2] + (p[3],) for p in control_plane.problems] == [("default", "c", False)]
    admitted(control_plane, "c.yaml", svc("c", ports=[{"port": 81}]))   # a new version
    assert control_plane.failures == 2
    # room freed: the refused Service's file is read again, and then admitted
    admitted(control_plane, "a.yaml", svc("a"))
    assert control_plane.stale == {"c.yaml"}
    assert admitted(control_plane, "c.yaml", svc("c"))[0]["spec"]["clusterIP"]
    assert control_plane.problems == ()


def test_room_freed_by_a_change_retries_the_refused_like_a_deletion():
    """A node port or cluster IP let go by an edit (NodePort -> ClusterIP, an explicit
    address) frees room as a deleted Service does: the refused Services' files are named."""
    control_plane = ControlPlane(node_port_range="30000-30001")
    admitted(control_plane, "a.yaml", svc("a", type="NodePort"), svc("b", type="NodePort"))
    assert admitted(control_plane, "c.yaml", svc("c", type="NodePort")) == []
    assert control_plane.stale == set()
    admitted(control_plane, "a.yaml", svc("a"), svc("b", type="NodePort"))
    assert control_plane.stale == {"c.yaml"}
    assert admitted(control_plane, "c.yaml", svc("c", type="NodePort"))[0]["spec"]["ports"]
    assert control_plane.problems == ()


def test_allocations_are_remembered_across_a_restart(tmp_path):
    state = tmp_path / "bpfp.allocations.json"
    first = ControlPlane("10.96.0.0/28", state_file=state)
    # b collides with a's deterministic address only through order: remember, not recompute
    got = {raw["metadata"]["name"]: raw["spec"]["clusterIP"] for raw in
           admitted(first, "a.yaml", *[svc(f"s{i}") for i in range(10)])}
    again = ControlPlane("10.96.0.0/28", state_file=state)
    got_again = {raw["metadata"]["name"]: raw["spec"]["clusterIP"] for raw in
                 admitted(again, "a.yaml", *[svc(f"s{i}") for i in reversed(range(10))])}
    assert got_again == got
    fresh = ControlPlane("10.96.0.0/28")           # without the state: order matters
    got_fresh = {raw["metadata"]["name"]: raw["spec"]["clusterIP"] for raw in
                 admitted(fresh, "a.yaml", *[svc(f"s{i}") for i in reversed(range(10))])}
    assert got_fresh != got     # so the remembering is what kept them


def test_two_files_giving_one_address_are_served_as_written_and_said(caplog):
    control_plane = ControlPlane()
    admitted(control_plane, "a.yaml", svc("a", clusterIP="10.96.0.10"))
    caplog.set_level(logging.WARNING)
    out = admitted(control_plane, "b.yaml", svc("b", clusterIP="10.96.0.10"))
    assert out[0]["spec"]["clusterIP"] == "10.96.0.10"
    assert [p[3] for p in control_plane.problems] == [True]
    assert "service_address_shared" in caplog.text


def test_a_template_placeholder_is_left_for_the_parser_to_name():
    out = admitted(ControlPlane(), "dns.yaml", svc("kube-dns", clusterIP="__DNS__SERVER__"))
    with pytest.raises(ValueError, match="__DNS__SERVER__"):
        parse_object(out[0])


# --- node ports -----------------------------------------------------------------------

def test_node_ports_allocated_shared_by_protocol_and_stable_across_an_edit():
    control_plane = ControlPlane(node_port_range="30000-32767")
    ports = [{"name": "tcp", "port": 53, "protocol": "TCP"},
             {"name": "udp", "port": 53, "protocol": "UDP"},
             {"name": "web", "port": 80, "nodePort": 30080}]
    spec = admitted(control_plane, "a.yaml", svc("dns", type="NodePort", ports=ports))[0]["spec"]
    node_ports = [p["nodePort"] for p in spec["ports"]]
    assert node_ports[0] == node_ports[1] and 30086 <= node_ports[0] <= 32767
    assert node_ports[2] == 30080
    assert control_plane.allocations["default", "dns"].node_ports == {node_ports[0]}
    edited = admitted(control_plane, "a.yaml", svc("dns", type="NodePort",
                                                   ports=list(reversed(ports))))[0]["spec"]
    assert {p["name"]: p["nodePort"] for p in edited["ports"]} == \
        {p["name"]: p["nodePort"] for p in spec["ports"]}


def test_load_balancer_node_ports_and_health_check_port():
    control_plane = ControlPlane()
    spec = admitted(control_plane, "lb.yaml", svc("lb", type="LoadBalancer",
                                                  externalTrafficPolicy="Local"))[0]["spec"]
    assert spec["ports"][0]["nodePort"] and spec["healthCheckNodePort"]
    assert spec["healthCheckNodePort"] != spec["ports"][0]["nodePort"]
    none = admitted(control_plane, "lb2.yaml", svc("lb2", type="LoadBalancer",
                                                   allocateLoadBalancerNodePorts=False))
    assert "nodePort" not in none[0]["spec"]["ports"][0]
    assert parse_object(none[0]).ports[0].node_port == 0


# --- Endpoints mirroring (endpointslicemirroring) -------------------------------------

def test_mirror_ready_and_not_ready_addresses_per_family():
    slices = mirror(with_namespace(endpoints("ext", ready=["10.1.0.1", "fd00::1"],
                                             not_ready=["10.1.0.2"])))
    parsed = [parse_object(s) for s in slices]
    assert [(s.address_type, s.service_name, s.namespace) for s in parsed] == \
        [("IPv4", "ext", "default"), ("IPv6", "ext", "default")]
    assert [(str(e.addresses[0]), e.ready) for e in parsed[0].endpoints] == \
        [("10.1.0.1", True), ("10.1.0.2", False)]
    assert parsed[0].ports[0].name == "http" and parsed[0].ports[0].port == 8080


def test_skip_mirror_label():
    labels = {"endpointslice.kubernetes.io/skip-mirror": "true"}
    assert mirror(endpoints("ext", ready=["10.1.0.1"], labels=labels)) == []


def test_endpoints_are_mirrored_only_for_a_service_without_a_selector():
    control_plane = ControlPlane()
    out = admitted(control_plane, "ext.yaml", svc("ext"), endpoints("ext", ready=["10.1.0.1"]))
    assert [o["kind"] for o in out] == ["Service", "EndpointSlice"]
    out = admitted(control_plane, "web.yaml", svc("web", selector={"app": "web"}),
                   endpoints("web", ready=["10.1.0.1"]))
    assert [o["kind"] for o in out] == ["Service"]      # kube-proxy ignores Endpoints


def test_endpoints_read_before_their_service_in_another_file(tmp_path):
    (tmp_path / "a-endpoints.yaml").write_text(json.dumps(endpoints("ext", ready=["10.1.0.1"])))
    (tmp_path / "b-service.yaml").write_text(json.dumps(svc("ext")))
    changes = ManifestSource(tmp_path).rescan()
    assert sorted(str(c.key) for c in changes) == [
        "EndpointSlice default/ext-mirrored-0-ipv4", "Service default/ext"]


# --- ordinary YAML, as published -------------------------------------------------------

GUESTBOOK = """
apiVersion: v1
kind: Service
metadata:
  name: redis-leader
  labels: {app: redis, role: leader, tier: backend}
spec:
  ports:
  - port: 6379
    targetPort: 6379
  selector: {app: redis, role: leader, tier: backend}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: redis-leader
spec:
  replicas: 1
  selector:
    matchLabels: &labels {app: redis, role: leader}
  template:
    metadata: {labels: *labels}
    spec:
      containers:
      - name: leader
        image: docker.io/redis:6.0.5
---
# comment-only document
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {a: b}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: frontend}
  spec:
    type: NodePort
    ports: [{port: 80}]
    selector: {app: guestbook}
"""


def crd(size: int) -> str:
    """A CustomResourceDefinition of about size bytes, as install manifests carry them."""
    properties = "\n".join(f"              field{i}:\n                type: string\n"
                           f"                description: {'x' * 60}"
                           for i in range(size // 120))
    return ("apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n"
            "metadata: {name: things.example.com}\nspec:\n  group: example.com\n"
            "  names: {kind: Thing, plural: things}\n  scope: Namespaced\n  versions:\n"
            "  - name: v1\n    served: true\n    storage: true\n    schema:\n"
            "      openAPIV3Schema:\n        type: object\n        properties:\n"
            "          spec:\n            type: object\n            properties:\n"
            f"{properties}\n")


def test_published_manifests_are_served_and_everything_else_stays_quiet(tmp_path, caplog):
    (tmp_path / "guestbook.yaml").write_text(GUESTBOOK)
    (tmp_path / "crds.yaml").write_text(crd(1_400_000))
    assert (tmp_path / "crds.yaml").stat().st_size > 1_300_000
    caplog.set_level(logging.INFO)
    source = ManifestSource(tmp_path)
    services = {c.obj.name: c.obj for c in source.rescan() if c.obj is not None}
    assert set(services) == {"redis-leader", "frontend"}
    assert all(not s.headless and s.cluster_ips for s in services.values())
    assert 30000 <= services["frontend"].ports[0].node_port <= 32767
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert source.invalid_objects == source.parse_errors == source.refused_files == 0


# --- a pass costs what it read (issue 16) ---------------------------------------------

def test_a_pass_publishes_only_the_services_it_changed(tmp_path, monkeypatch):
    """allocations and the state file follow every change, but a one-file pass rebuilds
    only its own Services' entries, not every Service's."""
    from agent.sources.apiserver import control_plane as module
    state = tmp_path / "bpfp.allocations.json"
    control_plane = ControlPlane("10.96.0.0/24", state_file=state)
    for i in range(20):
        admitted(control_plane, f"s{i}.yaml", svc(f"s{i}"))
    assert len(control_plane.allocations) == 20
    formatted = []        # addresses written out: what rebuilding a Service's entry costs
    monkeypatch.setattr(module, "address_text",
                        lambda *a, real=module.address_text: formatted.append(a) or real(*a))
    # s3 gives explicitly the address s5 was allocated: s5 moves, both are published
    taken = next(iter(control_plane.allocations["default", "s5"].cluster_ips))
    admitted(control_plane, "s3.yaml", svc("s3", clusterIP=taken))
    # once, in s3's admission; publishing s3 and s5 (now holding nothing allocated) writes
    # none, and the 18 Services the pass did not change are not rebuilt (it was 19 calls)
    assert len(formatted) == 1
    assert ("default", "s3") not in control_plane.allocations   # nothing allocated to it
    assert control_plane.stale == {"s5.yaml"}
    moved = admitted(control_plane, "s5.yaml", svc("s5"))[0]["spec"]["clusterIP"]
    assert moved != taken and control_plane.allocations["default", "s5"].cluster_ips == {moved}
    saved = json.loads(state.read_text())["services"]
    assert "default/s3" not in saved and saved["default/s5"]["ips"] == [moved]
    assert len(saved) == 19
    formatted.clear()
    control_plane.files_read.discard("s7.yaml")     # s7's file is gone
    control_plane.settle(control_plane.files_read)
    assert formatted == [] and ("default", "s7") not in control_plane.allocations
    assert "default/s7" not in json.loads(state.read_text())["services"]
    assert len(control_plane.allocations) == 18


def test_one_services_addresses_are_parsed_once_per_admission():
    from agent.sources.apiserver.defaults import parse_ip
    control_plane = ControlPlane()
    parse_ip.cache_clear()
    admitted(control_plane, "a.yaml", svc("a", clusterIPs=["10.96.0.10", "fd00:10:96::10"],
                                          ipFamilyPolicy="RequireDualStack"))
    assert parse_ip.cache_info().misses == 2 and parse_ip.cache_info().hits >= 4
