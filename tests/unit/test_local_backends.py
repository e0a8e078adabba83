"""Where a backend runs, from the model to its slot: Backend.local (an endpoint's nodeName is
this node's, or its address is one of the node's) becomes BPFP_BE_LOCAL in the slot, which
the TC path reads to keep the client's address (no SNAT). Issue 14.3."""
from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from agent.model import NodeContext, desired_state
from agent.model.types import (
    Backend,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Frontend,
    FrontendKind,
    Protocol,
    Service,
    ServicePort,
    ServicePortName,
    ServicePortState,
)
from agent.planner import (
    BE_LOCAL,
    BackendAddr,
    FrontendKey,
    PutSlot,
    by_scope,
    kernel_state,
    plan,
    plan_changes,
)
from tests.fakes import FakeServiceMaps

ip = ipaddress.ip_address
MAPS_H = Path(__file__).resolve().parents[2] / "bpf" / "maps.h"
NODE = NodeContext("n1", (ip("192.168.0.1"), ip("fd00:192:168::1")))
NAME = ServicePortName("default", "web", "", Protocol.TCP)


def nodeport(policy: str = "Cluster") -> Service:
    return Service("default", "web", "NodePort", (ip("10.96.0.10"), ip("fd00:10:96::10")),
                   (ServicePort("", Protocol.TCP, 80, 8080, 30080),),
                   external_traffic_policy=policy)


def endpoints(family: int, *endpoints: tuple[str, str]) -> EndpointSlice:
    return EndpointSlice("default", f"web-v{family}", "web", f"IPv{family}",
                         (EndpointPort("", Protocol.TCP, 8080),),
                         tuple(Endpoint((ip(a),), True, True, False, node)
                               for a, node in endpoints))


def local_of(backends) -> dict[str, bool]:
    return {str(b.address): b.local for b in backends}


# --- the model ------------------------------------------------------------------------

def test_a_backend_is_local_by_its_endpoints_node_name_or_by_a_node_address():
    slices = [endpoints(4, ("10.244.1.2", "n1"), ("10.244.2.2", "n2"), ("10.244.3.2", ""),
                        ("192.168.0.1", ""),        # hostNetwork, slice without nodeName
                        ("192.168.0.2", "n2")),     # another node's hostNetwork endpoint
              endpoints(6, ("fd00:10:244:1::2", "n1"), ("fd00:10:244:2::2", "n2"),
                        ("fd00:192:168::1", "n9"))]
    state = desired_state([nodeport()], slices, NODE)
    by_family = {family: sps for (_, family), sps in state.items()}
    assert local_of(by_family[4].outside_backends) == {
        "10.244.1.2": True, "10.244.2.2": False, "10.244.3.2": False,
        "192.168.0.1": True, "192.168.0.2": False}
    assert local_of(by_family[6].outside_backends) == {
        "fd00:10:244:1::2": True, "fd00:10:244:2::2": False, "fd00:192:168::1": True}
    # every set a backend is in says the same of it
    for sps in by_family.values():
        for backends in (sps.backends, sps.external_backends):
            assert local_of(backends) == local_of(sps.outside_backends)


def test_without_a_node_no_backend_is_local():
    state = desired_state([nodeport()], [endpoints(4, ("10.244.1.2", "n1"))])
    assert not any(b.local for sps in state.values() for b in sps.backends)
    # a name alone: no address to match, the name still counts
    named = desired_state([nodeport()], [endpoints(4, ("10.244.1.2", "n1"))],
                          NodeContext("n1"))
    assert [b.local for sps in named.values() for b in sps.backends] == [True]


def test_local_policy_sends_traffic_from_outside_to_local_backends_only():
    slices = [endpoints(4, ("10.244.1.2", "n1"), ("10.244.2.2", "n2"))]
    sps = desired_state([nodeport("Local")], slices, NODE)[NAME, 4]
    assert local_of(sps.outside_backends) == {"10.244.1.2": True}
    assert local_of(sps.external_backends) == {"10.244.1.2": True, "10.244.2.2": False}


# --- the planner ----------------------------------------------------------------------


def world(local: set[str], backends=("10.244.1.2", "10.244.2.2", "10.244.1.3")) -> dict:
    bes = tuple(sorted((Backend(ip(b), 8080, local=b in local) for b in backends),
                       key=Backend.sort_key))
    frontends = (Frontend(ip("10.96.0.10"), 80, Protocol.TCP),
                 Frontend(ip("192.168.0.1"), 30080, Protocol.TCP, FrontendKind.NODE_PORT))
    return by_scope({(NAME, 4): ServicePortState(NAME, 4, frontends, bes, bes, bes)})


def slot_flags(fake: FakeServiceMaps) -> dict[str, int]:
    return {str(b.address): flags for _, b, flags in fake.slots.values()}


def test_local_backends_slots_carry_the_flag_and_read_back_with_it():
    fake = FakeServiceMaps()
    p = plan(world({"10.244.1.2", "10.244.1.3"}), {})
    puts = {str(op.backend.address): op.flags for op in p.ops if isinstance(op, PutSlot)}
    assert puts == {"10.244.1.2": BE_LOCAL, "10.244.2.2": 0, "10.244.1.3": BE_LOCAL}
    fake.apply(p.ops)
    assert fake.read_back() == p.result
    assert {str(b.address) for s in p.result.values() for b in s.local} == \
        {"10.244.1.2", "10.244.1.3"}
    assert plan(world({"10.244.1.2", "10.244.1.3"}), fake.read_back()).ops == ()


def test_slots_an_older_agent_wrote_without_flags_are_rewritten_and_nothing_else():
    """An agent that knew no flags left 0 in every slot (the field was padding): the new
    one adopts them, sees which are wrong, and rewrites exactly those, in place."""
    desired = world({"10.244.1.2"})
    fake = FakeServiceMaps()
    fake.apply(plan(desired, {}).ops)
    fake.slots = {key: (family, backend, 0) for key, (family, backend, _) in fake.slots.items()}
    adopted = fake.read_back()
    assert not any(s.local for s in adopted.values())
    p = plan(desired, adopted)
    assert all(isinstance(op, PutSlot) for op in p.ops)
    assert {(str(op.backend.address), op.flags) for op in p.ops} == {("10.244.1.2", BE_LOCAL)}
    fake.apply(p.ops)
    assert slot_flags(fake)["10.244.1.2"] == BE_LOCAL and fake.read_back() == p.result


def test_a_backend_that_becomes_local_or_remote_is_rewritten_in_its_slot():
    fake = FakeServiceMaps()
    first = plan(world(set()), {})
    fake.apply(first.ops)
    # the node learned its name (a Node object, --node-name): one backend is now its own
    second = plan(world({"10.244.2.2"}), fake.read_back())
    assert {(str(op.backend.address), op.flags) for op in second.ops} == \
        {("10.244.2.2", BE_LOCAL)}
    fake.apply(second.ops)
    # incrementally too, and back
    third = plan_changes(world(set()), second, list(world(set())))
    assert {(str(op.backend.address), op.flags) for op in third.ops} == {("10.244.2.2", 0)}
    fake.apply(third.ops)
    assert set(slot_flags(fake).values()) == {0}
    assert fake.read_back() == plan(world(set()), {}).result


def test_kernel_state_keeps_flags_of_live_slots_only():
    here, there = BackendAddr(ip("10.244.1.2"), 8080), BackendAddr(ip("10.244.1.3"), 8080)
    frontend = FrontendKey(ip("10.96.0.10"), 80, Protocol.TCP)
    # count 1: slot 1 is a stray an interrupted write left, whatever its flag
    held = kernel_state([(frontend, 1, 1, 7)], [(1, 0, 4, here, BE_LOCAL),
                                                (1, 1, 4, there, BE_LOCAL)])
    assert held[1].local == frozenset({here}) and held[1].stray_slots == (1,)
    # entries without flags (four fields) read as remote
    assert kernel_state([(frontend, 1, 1, 7)], [(1, 0, 4, here)])[1].local == frozenset()


# --- one definition each side ---------------------------------------------------------

def test_the_backend_flag_is_the_one_maps_h_defines():
    text = MAPS_H.read_text()
    assert re.search(r"#define BPFP_BE_LOCAL (\d+)", text).group(1) == str(BE_LOCAL)
    for struct in ("backend4", "backend6"):
        body = re.search(rf"struct {struct} {{(.*?)}};", text, re.S).group(1)
        assert re.search(r"__u16\s+flags;", body), f"struct {struct} has its u16 flags"
