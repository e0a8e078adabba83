"""The sync step (agent/sync_step.py) with the change tracker (agent/changes.py): a sync
of the changed Services only, over any sequence of changes, leaves the kernel, the desired
state, each Service's parts and the health parts as a full recompute of everything would."""
from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.changes import ChangeTracker
from agent.model.health import service_health_parts
from agent.model.objects import parse_object
from agent.model.types import NodeContext, ObjectKey
from agent.planner import plan
from agent.sources.events import ObjectChange
from agent.sync_step import SyncStep
from tests.fakes import FakeServiceMaps

NODE = "n1"
SERVICES = [f"s{i}" for i in range(5)]
SLICES = [f"e{i}" for i in range(7)]
ADDRESSES = [f"10.1.0.{i}" for i in range(1, 7)]


def service_raw(name: str, variant: int) -> dict:
    index = SERVICES.index(name)
    spec: dict = {"clusterIP": f"10.96.0.{index + 1}", "clusterIPs": [f"10.96.0.{index + 1}"],
                  "ports": [{"name": "p", "port": 80 + variant % 2, "targetPort": 8080,
                             "protocol": "UDP" if variant == 3 else "TCP"}]}
    if variant == 2:
        spec["type"] = "LoadBalancer"     # a health check node port (eTP Local)
        spec["ports"][0]["nodePort"] = 30000 + index
        spec["externalTrafficPolicy"] = "Local"
        spec["healthCheckNodePort"] = 31000 + index
    if variant == 4:
        spec["internalTrafficPolicy"] = "Local"
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def slice_raw(name: str, owner: str, endpoints: list[tuple[str, bool, str]]) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": owner}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": 8080}],
            "endpoints": [{"addresses": [address], "conditions": {"ready": ready},
                           "nodeName": node, "zone": "zone-a" if node == NODE else "zone-b"}
                          for address, ready, node in endpoints]}


def node_raw(zone: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": zone}}}


def upsert(raw: dict) -> ObjectChange:
    obj = parse_object(raw)
    return ObjectChange(obj.key, obj)


endpoint_st = st.tuples(st.sampled_from(ADDRESSES), st.booleans(), st.sampled_from([NODE, "n2"]))
change_st = st.one_of(
    st.builds(lambda n, v: upsert(service_raw(n, v)), st.sampled_from(SERVICES),
              st.integers(0, 4)),
    st.builds(lambda n: ObjectChange(ObjectKey("Service", "default", n), None),
              st.sampled_from(SERVICES)),
    st.builds(lambda n, o, e: upsert(slice_raw(n, o, e)), st.sampled_from(SLICES),
              st.sampled_from(SERVICES), st.lists(endpoint_st, max_size=3)),
    st.builds(lambda n: ObjectChange(ObjectKey("EndpointSlice", "default", n), None),
              st.sampled_from(SLICES)),
    st.builds(lambda z: upsert(node_raw(z)), st.sampled_from(["zone-a", "zone-b"])),
)
batches_st = st.lists(st.lists(change_st, min_size=1, max_size=8), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(batches_st)
def test_syncing_the_changed_services_gives_what_a_full_recompute_gives(batches):
    context = NodeContext(NODE, (ipaddress.ip_address("192.0.2.5"),))
    tracker = ChangeTracker(NODE)
    step = SyncStep(lambda family, protocol: True, 0, with_health=True)
    maps = FakeServiceMaps()
    previous = None
    for batch in batches:
        tracker.record_batch(batch)
        taken = tracker.checkout()
        # as the agent decides: the first sync and a node change recompute everything
        full = previous is None or taken.node_changed
        computed = step.compute(full, tracker.snapshot(full, taken.services, context),
                                frozenset(), maps.read_back(), previous, None)
        maps.apply(computed.plan.ops)
        previous, _ = step.commit(computed)

        node, services, slices = tracker.snapshot(True, set(), context)
        reference = SyncStep(lambda family, protocol: True, 0, with_health=True)
        everything = reference.compute(True, (node, services, slices), frozenset(), {},
                                       None, None)
        reference.commit(everything)
        assert dict(step.desired) == dict(reference.desired)
        assert dict(step.parts) == dict(reference.parts)
        assert step.health_parts == service_health_parts(services, slices, node)
        assert maps.read_back() == previous.result
        assert plan(reference.desired, maps.read_back()).ops == (), \
            "the kernel holds what a full recompute wants"
