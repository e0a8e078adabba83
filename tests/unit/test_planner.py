"""Planner: ordering so no packet sees half a service, no-op when unchanged, adoption."""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.model.types import Backend, Frontend, Protocol, ServicePortName, ServicePortState
from agent.planner import (
    DeleteFrontend,
    DeleteSlot,
    PutFrontend,
    PutSlot,
    plan,
    port_hash,
)
from tests.fakes import FakeServiceMaps

ip = ipaddress.ip_address


def sp(name: str, vip: str, backends: list[str], port: int = 80,
       protocol: Protocol = Protocol.TCP, extra_vips: tuple[str, ...] = ()):
    spn = ServicePortName("default", name, "", protocol)
    frontends = tuple(sorted((Frontend(ip(v), port, protocol) for v in (vip, *extra_vips)),
                             key=Frontend.sort_key))
    bes = tuple(sorted((Backend(ip(b), 8080) for b in backends), key=Backend.sort_key))
    return {(spn, 4): ServicePortState(spn, 4, frontends, bes)}


def kinds(ops):
    return [type(o).__name__ for o in ops]


def test_new_service_writes_backends_before_frontend():
    p = plan(sp("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2"]), {})
    assert kinds(p.ops) == ["PutSlot", "PutSlot", "PutFrontend"]
    assert p.ops[-1].count == 2


def test_removed_service_deletes_frontend_before_slots():
    before = plan(sp("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2"]), {}).result
    p = plan({}, before)
    assert kinds(p.ops) == ["DeleteFrontend", "DeleteSlot", "DeleteSlot"]
    assert p.result == {}


def test_unchanged_state_yields_no_operations():
    desired = {**sp("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2"]),
               **sp("dns", "10.96.0.10", ["10.0.0.3"], port=53, protocol=Protocol.UDP)}
    first = plan(desired, {})
    again = plan(desired, first.result)
    assert again.ops == ()
    assert again.ids == first.ids


def test_shrinking_lowers_count_before_deleting_the_last_slot():
    before = plan(sp("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2", "10.0.0.3"]), {}).result
    p = plan(sp("web", "10.96.0.1", ["10.0.0.1", "10.0.0.3"]), before)
    assert kinds(p.ops) == ["PutSlot", "PutFrontend", "DeleteSlot"]
    assert p.ops[1].count == 2 and p.ops[2].slot == 2


def test_growing_writes_new_slot_before_raising_count():
    before = plan(sp("web", "10.96.0.1", ["10.0.0.1"]), {}).result
    p = plan(sp("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2"]), before)
    name_hash = port_hash(next(iter(sp("web", "10.96.0.1", []))))
    assert p.ops == (PutSlot(4, 1, 1, p.result[1].backends[1]),
                     PutFrontend(p.ops[1].frontend, 1, 2, name_hash))


def test_surviving_backends_keep_their_slot():
    before = plan(sp("web", "10.96.0.1", [f"10.0.0.{i}" for i in range(1, 9)]), {}).result
    p = plan(sp("web", "10.96.0.1", [f"10.0.0.{i}" for i in range(1, 9) if i != 3]), before)
    # one slot refilled from the tail, the count lowered, the tail slot deleted
    assert kinds(p.ops) == ["PutSlot", "PutFrontend", "DeleteSlot"]


def test_empty_service_keeps_a_frontend_with_count_zero():
    p = plan(sp("web", "10.96.0.1", []), {})
    assert p.ops == (PutFrontend(p.ops[0].frontend, 1, 0,
                                 port_hash(next(iter(sp("web", "10.96.0.1", []))))),)


def test_restarted_agent_adopts_ids_from_the_kernel():
    desired = {**sp("a", "10.96.0.1", ["10.0.0.1"]), **sp("b", "10.96.0.2", ["10.0.0.2"])}
    first = plan(desired, {})
    fake = FakeServiceMaps()
    fake.apply(first.ops)
    adopted = plan(desired, fake.read_back())
    assert adopted.ops == ()
    assert adopted.ids == first.ids


def test_frontend_moving_to_another_service_is_never_deleted():
    before = plan(sp("old", "10.96.0.1", ["10.0.0.1"]), {}).result
    p = plan(sp("new", "10.96.0.1", ["10.0.0.2"]), before)
    assert not any(isinstance(o, DeleteFrontend) for o in p.ops)
    fake = FakeServiceMaps()
    fake.apply(plan(sp("old", "10.96.0.1", ["10.0.0.1"]), {}).ops)
    fake.apply(p.ops)
    assert fake.read_back() == p.result


def test_two_service_ports_claiming_one_frontend_first_wins():
    desired = {**sp("a", "10.96.0.1", ["10.0.0.1"]), **sp("b", "10.96.0.1", ["10.0.0.2"])}
    p = plan(desired, {})
    assert len(p.conflicts) == 1 and "default/b" in p.conflicts[0]
    owners = {o.frontend: o.svc_id for o in p.ops if isinstance(o, PutFrontend)}
    assert list(owners.values()) == [p.ids[next(k for k in desired if k[0].name == "a")]]


def test_the_kernel_holds_the_plan_result_after_its_ops():
    first = plan(sp("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2"]), {})
    fake = FakeServiceMaps()
    fake.apply(first.ops)
    p = plan({**sp("web", "10.96.0.1", ["10.0.0.2", "10.0.0.5"]),
              **sp("x", "10.96.0.9", ["10.0.0.7"])}, first.result)
    fake.apply(p.ops)
    assert fake.read_back() == p.result
    assert any(isinstance(o, DeleteSlot) for o in p.ops) is False


# --- property: any sequence of desired states keeps the invariant at every single op ---

VIPS = [f"10.96.0.{i}" for i in range(1, 6)]
PODS = [f"10.0.0.{i}" for i in range(1, 9)]

service_st = st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.sampled_from(VIPS),
                       st.lists(st.sampled_from(PODS), unique=True, max_size=6),
                       st.sampled_from([Protocol.TCP, Protocol.UDP]),
                       st.lists(st.sampled_from(VIPS), unique=True, max_size=2))
world_st = st.lists(service_st, max_size=4)


def build(world):
    desired = {}
    for name, vip, backends, proto, extra in world:
        desired.update(sp(name, vip, backends, protocol=proto,
                          extra_vips=tuple(v for v in extra if v != vip)))
    return desired


@settings(max_examples=300, deadline=None)
@given(st.lists(world_st, min_size=1, max_size=6))
def test_every_prefix_of_every_plan_is_a_whole_service(worlds):
    fake = FakeServiceMaps()
    for world in worlds:
        desired = build(world)
        p = plan(desired, fake.read_back())
        fake.apply(p.ops)                  # raises InvariantBroken on any bad prefix
        assert fake.read_back() == p.result
        assert plan(desired, fake.read_back()).ops == ()
        served = {f for s in p.result.values() for f in s.frontends}
        wanted = {(f.address, f.port, f.protocol)
                  for s in desired.values() for f in s.frontends}
        assert {(f.address, f.port, f.protocol) for f in served} == wanted


@pytest.mark.parametrize("n", [0, 1, 5])
def test_ids_are_small_and_unique(n):
    desired = {}
    for i in range(n):
        desired.update(sp(f"s{i}", f"10.96.1.{i + 1}", ["10.0.0.1"]))
    p = plan(desired, {})
    assert sorted(p.ids.values()) == list(range(1, n + 1))


# --- adoption after a crash: the kernel is the record ----------------------------------

def test_slots_past_the_count_are_found_and_deleted():
    fake = FakeServiceMaps()
    fake.apply(plan(sp("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2", "10.0.0.3"]), {}).ops)
    shrink = plan(sp("web", "10.96.0.1", ["10.0.0.1"]), fake.read_back())
    fake.apply([o for o in shrink.ops if not isinstance(o, DeleteSlot)])   # crash here
    adopted = fake.read_back()
    assert adopted[1].stray_slots == (1, 2) and len(adopted[1].backends) == 1
    repair = plan(sp("web", "10.96.0.1", ["10.0.0.1"]), adopted)
    assert kinds(repair.ops) == ["DeleteSlot", "DeleteSlot"]
    fake.apply(repair.ops)
    assert fake.slots.keys() == {(1, 0)}


def test_a_frontend_left_with_an_old_count_is_rewritten():
    two_vips = sp("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2"], extra_vips=("10.96.0.2",))
    fake = FakeServiceMaps()
    fake.apply(plan(two_vips, {}).ops)
    grow = plan(sp("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2", "10.0.0.3"],
                   extra_vips=("10.96.0.2",)), fake.read_back())
    fake.apply(grow.ops[:-1])          # crash between the two PutFrontend ops
    adopted = fake.read_back()
    assert len(adopted[1].stale_frontends) == 1
    repair = plan(sp("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2", "10.0.0.3"],
                     extra_vips=("10.96.0.2",)), adopted)
    fake.apply(repair.ops)
    assert {count for _, count, *_ in fake.frontends.values()} == {3}


def test_keep_unclaimed_keeps_what_an_incomplete_listing_does_not_mention():
    before = plan({**sp("a", "10.96.0.1", ["10.0.0.1"]), **sp("b", "10.96.0.2", ["10.0.0.2"])},
                  {}).result
    p = plan(sp("a", "10.96.0.1", ["10.0.0.3"]), before, keep_unclaimed=set(before))
    assert not any(isinstance(o, (DeleteFrontend, DeleteSlot)) for o in p.ops)
    assert len(p.result) == 2
    # only the ids given are kept: another unclaimed port goes as ever
    b = next(i for i, s in before.items() if str(next(iter(s.frontends))).startswith(
        "10.96.0.2"))
    others = plan(sp("a", "10.96.0.1", ["10.0.0.3"]), before, keep_unclaimed={b + 100})
    assert kinds(others.ops)[-2:] == ["DeleteFrontend", "DeleteSlot"] and \
        set(others.result) == set(before) - {b}
    assert kinds(plan(sp("a", "10.96.0.1", ["10.0.0.3"]), p.result).ops) == \
        ["DeleteFrontend", "DeleteSlot"]


@settings(max_examples=200, deadline=None)
@given(world_st, world_st, st.integers(min_value=0, max_value=40))
def test_a_crash_anywhere_in_a_plan_is_repaired_by_the_next_agent(first, second, cut):
    fake = FakeServiceMaps()
    fake.apply(plan(build(first), {}).ops)
    interrupted = plan(build(second), fake.read_back())
    fake.apply(interrupted.ops[:cut])                 # the agent dies after `cut` writes
    repair = plan(build(second), fake.read_back())    # a new agent adopts and reconciles
    fake.apply(repair.ops)
    assert fake.read_back() == repair.result
    assert plan(build(second), fake.read_back()).ops == ()
    served = {f for s in repair.result.values() for f in s.frontends}
    assert {(f.address, f.port, f.protocol) for f in served} == \
        {(f.address, f.port, f.protocol) for s in build(second).values() for f in s.frontends}
    assert all(not s.stray_slots and not s.stale_frontends for s in fake.read_back().values())


# --- incremental plans: the cost follows the change, the result is the full plan's ------

def served(result) -> dict:
    return {f: s.backends for s in result.values() for f in s.frontends}


@settings(max_examples=300, deadline=None)
@given(st.lists(world_st, min_size=1, max_size=6))
def test_incremental_plans_give_what_full_plans_give(worlds):
    from agent.planner import commit, plan_changes
    fake = FakeServiceMaps()
    previous = plan({}, {})
    desired_before: dict = {}
    for world in worlds:
        desired = build(world)
        changed = {k for k in desired.keys() | desired_before.keys()
                   if desired.get(k) != desired_before.get(k)}
        incremental = plan_changes(desired, previous, changed)
        fake.apply(incremental.ops)               # the invariant holds at every single op
        assert fake.read_back() == incremental.result
        full = plan(desired, fake.read_back())
        assert full.ops == (), "a full plan finds nothing left to do"
        assert served(full.result) == served(incremental.result)
        previous, desired_before = commit(incremental), desired


def test_an_unchanged_cluster_costs_nothing_incrementally():
    from agent.planner import plan_changes
    desired = {}
    for i in range(200):
        desired.update(sp(f"s{i:03d}", f"10.96.1.{i + 1}", ["10.0.0.1", "10.0.0.2"]))
    first = plan(desired, {})
    key = next(iter(desired))
    changed = dict(desired)
    changed.update(sp(key[0].name, "10.96.1.1", ["10.0.0.1", "10.0.0.2", "10.0.0.3"]))
    p = plan_changes(changed, first, {key})
    assert kinds(p.ops) == ["PutSlot", "PutFrontend"]
    assert len(p.result) == 200 and p.ids == first.ids


def test_backends_a_udp_port_loses_are_reported_for_socket_cleanup():
    udp = sp("dns", "10.96.0.10", ["10.0.0.1", "10.0.0.2"], port=53, protocol=Protocol.UDP)
    tcp = sp("web", "10.96.0.11", ["10.0.0.1", "10.0.0.2"])
    first = plan({**udp, **tcp}, {})
    shrunk = plan({**sp("dns", "10.96.0.10", ["10.0.0.2"], port=53, protocol=Protocol.UDP),
                   **sp("web", "10.96.0.11", ["10.0.0.2"])}, first.result)
    assert {str(b.address) for b in shrunk.removed_udp} == {"10.0.0.1"}
    gone = plan({}, shrunk.result)                  # the whole service goes
    assert {str(b.address) for b in gone.removed_udp} == {"10.0.0.2"}


def test_switching_affinity_on_and_off_rewrites_only_the_frontends():
    from dataclasses import replace
    base = sp("web", "10.96.0.1", ["10.0.0.1", "10.0.0.2"])
    key = next(iter(base))
    sticky = {key: replace(base[key], session_affinity_timeout=10800)}
    first = plan(base, {})
    on = plan(sticky, first.result)
    assert kinds(on.ops) == ["PutFrontend"] and on.ops[0].affinity == 10800
    fake = FakeServiceMaps()
    fake.apply(first.ops)
    fake.apply(on.ops)
    assert fake.read_back()[1].affinity == 10800
    assert plan(sticky, fake.read_back()).ops == ()
    off = plan(base, fake.read_back())
    assert kinds(off.ops) == ["PutFrontend"] and off.ops[0].affinity == 0


# --- the ids a restarted or upgraded agent finds its service ports by ---------------------

PORT_HASHES = [    # computed once (blake2b-64 of the name); never to be recomputed here
    (("default", "kubernetes", "https", Protocol.TCP, 4, None), 12512255576150685809),
    (("default", "kubernetes", "https", Protocol.TCP, 4, 1), 9613084247562958338),
    (("default", "kubernetes", "https", Protocol.TCP, 4, 2), 12225825239393691514),
    (("default", "kubernetes", "https", Protocol.TCP, 4, 3), 11701823677505754229),
    (("kube-system", "kube-dns", "dns", Protocol.UDP, 4, None), 7814929417520532835),
    (("kube-system", "kube-dns", "dns-tcp", Protocol.TCP, 6, None), 2124453382256254090),
    (("kube-system", "kube-dns", "dns-tcp", Protocol.TCP, 6, 1), 11899523804861442117),
    (("ns", "web", "", Protocol.SCTP, 4, None), 15090398379104020365),
    (("ns", "web", "", Protocol.SCTP, 4, 3), 53023172177809642),
]


@pytest.mark.parametrize(("name", "want"), PORT_HASHES, ids=lambda v: str(v))
def test_port_hash_is_what_the_pinned_maps_of_earlier_agents_hold(name, want):
    """svc_value.name_hash is how an agent adopts the slot tables it finds: a changed hash
    would make an upgraded agent take every service port for new (all slots rewritten,
    ids reshuffled under live traffic)."""
    namespace, service, port_name, protocol, family, scope = name
    key = (ServicePortName(namespace, service, port_name, protocol), family)
    assert port_hash(key if scope is None else (*key, scope)) == want
    if scope is None:            # the internal scope (0) is the name without a scope
        assert port_hash((*key, 0)) == want


# --- the hot paths a full sync takes (issue 16) ---------------------------------------------

def test_keys_hash_alike_when_equal_and_families_stay_apart():
    """FrontendKey and BackendAddr hash by the address's integer: equal keys (from
    different objects) meet in a set, and the same integer in two families does not."""
    from agent.planner import BackendAddr, FrontendKey
    v4, v6 = ipaddress.ip_address("0.0.0.7"), ipaddress.ip_address("::7")
    assert len({FrontendKey(v4, 80, Protocol.TCP), FrontendKey(ipaddress.ip_address(
        "0.0.0.7"), 80, Protocol.TCP), FrontendKey(v6, 80, Protocol.TCP),
        FrontendKey(v4, 80, Protocol.UDP), FrontendKey(v4, 80, Protocol.TCP, 1)}) == 4
    assert len({BackendAddr(v4, 80), BackendAddr(ipaddress.ip_address("0.0.0.7"), 80),
                BackendAddr(v6, 80)}) == 2


@given(st.lists(st.integers(0, 6), max_size=6), st.lists(st.integers(0, 6), max_size=6),
       st.booleans())
def test_stable_slots_shortcuts_agree_with_the_rule(old, wanted, same):
    """A new port (no old slots) and an unchanged one (equal backends in the same order,
    then the old tuple itself) skip the rule's hashing; the result is the rule's."""
    from agent.planner import BackendAddr
    from agent.planner.entries import placed_slots, stable_slots

    def addrs(numbers):         # new objects each time, as the planner makes them
        return [BackendAddr(ipaddress.ip_address(f"10.0.0.{i}"), 8080) for i in numbers]

    old_slots = tuple(addrs(wanted if same else old))
    assert stable_slots(old_slots, addrs(wanted)) == placed_slots(old_slots, addrs(wanted))
    assert stable_slots((), addrs(wanted)) == placed_slots((), addrs(wanted))
