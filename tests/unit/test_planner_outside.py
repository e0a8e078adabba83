"""Planner parts for traffic from outside the node: which frontends the TC path sees with
their own backends (Local policy, source ranges), Maglev tables, and that a fake kernel
never holds a filtering frontend without its ranges or a Maglev table past its count."""
from __future__ import annotations

import ipaddress
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.model.types import (
    Backend,
    Frontend,
    FrontendKind,
    Protocol,
    ServicePortName,
    ServicePortState,
)
from agent.planner import (
    EXTERNAL,
    FIREWALLED,
    INTERNAL,
    OUTSIDE,
    SVC_F_MAGLEV,
    SVC_F_SOURCE_RANGES,
    DeleteRange,
    PutMaglev,
    by_scope,
    commit,
    plan,
    plan_changes,
)
from tests.fakes import FakeServiceMaps

ip = ipaddress.ip_address
NAME = ServicePortName("default", "web", "", Protocol.TCP)
NODE_PORT = Frontend(ip("172.30.0.11"), 30080, Protocol.TCP, FrontendKind.NODE_PORT)
LB = Frontend(ip("192.0.2.10"), 80, Protocol.TCP, FrontendKind.LOAD_BALANCER)
CLUSTER_IP = Frontend(ip("10.96.0.10"), 80, Protocol.TCP)


def backends(*last_octets: int) -> tuple[Backend, ...]:
    return tuple(Backend(ip(f"10.244.1.{i}"), 8080) for i in last_octets)


def state(outside=(1, 2), external=(1, 2), ranges=()) -> ServicePortState:
    return ServicePortState(NAME, 4, (CLUSTER_IP, NODE_PORT, LB), backends(1, 2),
                            external_backends=backends(*external),
                            outside_backends=backends(*outside),
                            source_ranges=tuple(ipaddress.ip_network(r) for r in ranges))


def test_cluster_policy_needs_no_part_of_its_own_for_outside():
    parts = by_scope({(NAME, 4): state()})
    assert set(parts) == {(NAME, 4, INTERNAL), (NAME, 4, EXTERNAL)}


def test_local_policy_gives_outside_traffic_its_own_backends_at_scope_1():
    parts = by_scope({(NAME, 4): state(outside=(1,))})
    assert parts[NAME, 4, OUTSIDE].backends == backends(1)
    result = plan(parts, {})
    outside = result.result[result.ids[NAME, 4, OUTSIDE]]
    assert {f.scope for f in outside.frontends} == {1}
    assert {f.address for f in outside.frontends} == {NODE_PORT.address, LB.address}


def test_source_ranges_keep_load_balancer_addresses_from_the_socket_path():
    parts = by_scope({(NAME, 4): state(ranges=("172.30.0.0/24",))})
    assert LB not in parts[NAME, 4, EXTERNAL].frontends        # socket LB: NodePort only
    assert parts[NAME, 4, FIREWALLED].frontends == (LB,)
    result = plan(parts, {})
    walled = result.result[result.ids[NAME, 4, FIREWALLED]]
    assert walled.flags & SVC_F_SOURCE_RANGES
    assert walled.source_ranges == (ipaddress.ip_network("172.30.0.0/24"),)
    # ranges are written before the frontend that uses them
    kinds = [type(op).__name__ for op in result.ops]
    assert kinds.index("PutRange") < max(i for i, k in enumerate(kinds) if k == "PutFrontend")


def test_maglev_tables_for_external_parts_only_and_rewritten_when_backends_change():
    parts = by_scope({(NAME, 4): state()})
    first = plan(parts, {}, maglev_m=13)
    tables = {op.svc_id: op.table for op in first.ops if isinstance(op, PutMaglev)}
    assert set(tables) == {first.ids[NAME, 4, EXTERNAL]}
    assert len(tables[first.ids[NAME, 4, EXTERNAL]]) == 13
    assert first.result[first.ids[NAME, 4, INTERNAL]].flags & SVC_F_MAGLEV == 0
    again = plan(parts, first.result, maglev_m=13)
    assert again.ops == ()
    grown = by_scope({(NAME, 4): replace(state(), external_backends=backends(1, 2, 3),
                                         outside_backends=backends(1, 2, 3))})
    changed = plan(grown, first.result, maglev_m=13)
    assert any(isinstance(op, PutMaglev) for op in changed.ops)


STATES = st.builds(
    lambda outside, ranges, external: state(outside=outside or (1,), external=external or (1,),
                                            ranges=ranges),
    st.lists(st.integers(1, 6), unique=True, max_size=5).map(tuple),
    st.lists(st.sampled_from(["172.30.0.0/24", "198.51.100.0/24", "0.0.0.0/0"]),
             unique=True, max_size=2).map(tuple),
    st.lists(st.integers(1, 6), unique=True, max_size=5).map(tuple))


@settings(max_examples=150, deadline=None)
@given(st.lists(STATES, min_size=1, max_size=5), st.sampled_from([0, 7, 13]))
def test_any_sequence_of_changes_keeps_the_tc_invariants(states, maglev_m):
    """FakeServiceMaps checks after every single op: a filtering frontend has ranges, a
    Maglev table names only slots below its frontend's count."""
    kernel = FakeServiceMaps()
    previous = None
    for s in states:
        desired = by_scope({(NAME, 4): s})
        if previous is None:
            p = plan(desired, kernel.read_back(), maglev_m=maglev_m)
        else:
            p = plan_changes(desired, previous, set(desired) | set(previous.ids),
                             maglev_m=maglev_m)
        kernel.apply(p.ops)
        previous = commit(p)
        again = plan(desired, kernel.read_back(), maglev_m=maglev_m)
        assert again.ops == ()


def test_ranges_left_by_an_interrupted_delete_are_read_back_and_deleted():
    parts = by_scope({(NAME, 4): state(ranges=("172.30.0.0/24",))})
    kernel = FakeServiceMaps()
    kernel.apply(plan(parts, {}).ops)
    walled = plan(parts, kernel.read_back()).ids[NAME, 4, FIREWALLED]
    removal = plan({}, kernel.read_back()).ops
    kernel.apply([op for op in removal if not isinstance(op, DeleteRange)])   # crash here
    left = kernel.read_back()
    assert left[walled].source_ranges and not left[walled].frontends
    kernel.apply(plan({}, left).ops)
    assert kernel.ranges == set()
