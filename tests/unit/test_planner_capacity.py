"""Planner capacity budget (issue 9, point 4): a Service whose change would overflow a map is
refused whole and keeps what the kernel has of it; every other Service is planned; the
refused go in once room returns. Checked against a fake kernel that refuses, like the
real one, an insert into a full map."""
from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.agent import Agent, AgentStatus
from agent.model.objects import parse_endpoint_slice, parse_service
from agent.model.types import (
    Backend,
    Frontend,
    FrontendKind,
    Protocol,
    ServicePortName,
    ServicePortState,
)
from agent.planner import (
    SVC_F_MAGLEV,
    MapFullError,
    by_scope,
    commit,
    plan,
    plan_changes,
    port_hash,
)
from agent.sources.events import ObjectChange
from tests.fakes import FakeServiceMaps

ip = ipaddress.ip_address
UNBOUNDED = 10 ** 9


def service(name: str, backends: int, ports: tuple[str, ...] = ("http",),
            node_port: bool = False, first_backend: int = 1, namespace: str = "default"
            ) -> dict:
    """One Service's desired keys (by_scope parts): `backends` pods, one ClusterIP per
    Service, a NodePort part when asked."""
    number = sum(map(ord, name)) % 200 + 1
    out = {}
    for i, port_name in enumerate(ports):
        spn = ServicePortName(namespace, name, port_name, Protocol.TCP)
        frontends = [Frontend(ip(f"10.96.{i}.{number}"), 80, Protocol.TCP)]
        if node_port:
            frontends.append(Frontend(ip("172.30.0.11"), 30000 + number * 4 + i,
                                      Protocol.TCP, FrontendKind.NODE_PORT))
        pods = tuple(Backend(ip(f"10.{number}.{i}.{b}"), 8080)
                     for b in range(first_backend, first_backend + backends))
        out[spn, 4] = ServicePortState(spn, 4, tuple(frontends), pods,
                                       external_backends=pods if node_port else (),
                                       outside_backends=pods if node_port else ())
    return out


def desired(*services: dict) -> dict:
    merged = {}
    for s in services:
        merged.update(s)
    return by_scope(merged)


def sizes(slots: int = UNBOUNDED, frontends: int = UNBOUNDED) -> dict[str, int]:
    return {"bpfp_svc4": frontends, "bpfp_svc6": UNBOUNDED, "bpfp_slot4": slots,
            "bpfp_slot6": UNBOUNDED, "bpfp_srcrange": UNBOUNDED, "bpfp_maglev": UNBOUNDED}


def sync(kernel: FakeServiceMaps, want: dict, previous=None, changed=None):
    """Plan (all, or the changes) against the fake kernel's sizes and apply it."""
    if previous is None:
        p = plan(want, kernel.read_back(), capacity=kernel.capacity())
    else:
        p = plan_changes(want, previous, changed or (), capacity=kernel.capacity())
    kernel.apply(p.ops)
    return commit(p)


def served(kernel: FakeServiceMaps, key) -> set[str] | None:
    """The backends the kernel gives one desired key, None when it has none of it."""
    for s in kernel.read_back().values():
        if s.name_hash == port_hash(key):
            return {str(b.address) for b in s.backends}
    return None


def backends_of(want: dict, key) -> set[str]:
    return {str(b.address) for b in want[key].backends}


def test_a_new_service_that_does_not_fit_is_refused_and_the_others_are_served():
    kernel = FakeServiceMaps(sizes=sizes(slots=10))
    want = desired(service("a", 4), service("b", 4), service("c", 4))
    p = sync(kernel, want)
    assert set(p.refused) == {("default", "c")}
    assert "bpfp_slot4 full: 2 of 10 entries free, the change needs 4" in p.refused[
        "default", "c"]
    for key in want:
        assert served(kernel, key) == (None if key[0].name == "c" else backends_of(want, key))
    assert all(key[0].name == "c" for key in p.refused_keys)


def test_a_service_that_grows_past_the_room_keeps_what_the_kernel_had():
    kernel = FakeServiceMaps(sizes=sizes(slots=10))
    before = desired(service("a", 4), service("b", 4))
    sync(kernel, before)
    grown = desired(service("a", 4), service("b", 8))
    p = sync(kernel, grown)
    assert set(p.refused) == {("default", "b")}
    assert not p.ops
    for key in before:
        assert served(kernel, key) == backends_of(before, key)


def test_no_part_of_a_refused_service_changes():
    """Two ports, each with a ClusterIP and a NodePort part: the room fits one part's
    growth, not the Service's: none of its four parts moves."""
    kernel = FakeServiceMaps(sizes=sizes(slots=18))
    before = desired(service("web", 2, ports=("http", "https"), node_port=True))
    sync(kernel, before)
    assert len(before) == 4 and kernel.entries()["bpfp_slot4"] == 8
    grown = desired(service("web", 5, ports=("http", "https"), node_port=True))
    p = sync(kernel, grown)
    assert set(p.refused) == {("default", "web")} and not p.ops
    assert p.refused_keys == set(grown)
    for key in before:
        assert served(kernel, key) == backends_of(before, key)


def test_between_services_that_do_not_both_fit_the_first_by_name_goes_in_every_time():
    want = desired(service("zeta", 6), service("alpha", 6))
    for _ in range(3):
        kernel = FakeServiceMaps(sizes=sizes(slots=10))
        p = sync(kernel, want)
        assert set(p.refused) == {("default", "zeta")}
        again = plan(want, kernel.read_back(), capacity=kernel.capacity())
        assert again.refused == p.refused and again.ops == ()


def test_room_freed_by_a_deletion_lets_the_refused_service_in_on_the_next_sync():
    """Deletions are written last, so their room counts from the sync after them."""
    kernel = FakeServiceMaps(sizes=sizes(slots=10))
    first = sync(kernel, desired(service("a", 6), service("b", 4)))
    assert not first.refused
    want = desired(service("a", 6), service("b", 4), service("c", 4))
    refused = sync(kernel, want, first, set(desired(service("c", 4))))
    assert set(refused.refused) == {("default", "c")}
    without_a = desired(service("b", 4), service("c", 4))
    freed = sync(kernel, without_a, refused, set(desired(service("a", 6))))
    assert set(freed.refused) == {("default", "c")}      # a's slots went last
    recovered = sync(kernel, without_a, freed, set())    # nothing changed: c is retried
    assert not recovered.refused
    for key in without_a:
        assert served(kernel, key) == backends_of(without_a, key)


def test_a_full_frontend_map_refuses_a_new_service_too():
    kernel = FakeServiceMaps(sizes=sizes(frontends=2))
    p = sync(kernel, desired(service("a", 1), service("b", 1), service("c", 1)))
    assert set(p.refused) == {("default", "c")}
    assert p.refused["default", "c"].startswith("bpfp_svc4 full: 0 of 2 entries free")


def test_a_removed_port_of_a_refused_service_is_removed():
    kernel = FakeServiceMaps(sizes=sizes(slots=12))
    before = desired(service("web", 3, ports=("http", "https", "admin")))
    previous = sync(kernel, before)
    grown = {k: v for k, v in desired(service("web", 5, ports=("http", "https"))).items()}
    admin = [k for k in before if k[0].port_name == "admin"]
    p = sync(kernel, grown, previous, set(grown) | set(admin))
    assert set(p.refused) == {("default", "web")}
    assert served(kernel, admin[0]) is None
    for key in grown:
        assert served(kernel, key) == backends_of(before, key)


def test_without_a_capacity_nothing_is_refused():
    want = desired(service("a", 50))
    assert not plan(want, {}).refused
    assert not plan(want, {}, capacity=sizes()).refused


def test_the_fake_kernel_refuses_an_insert_into_a_full_map():
    kernel = FakeServiceMaps(sizes=sizes(slots=3))
    with pytest.raises(MapFullError) as failure:
        kernel.apply(plan(desired(service("a", 4)), {}).ops)
    assert failure.value.map_name == "bpfp_slot4"


NAMES = ("alpha", "bravo", "charlie", "delta", "echo")


@st.composite
def clusters(draw) -> dict:
    """Services of 0..6 backends, one or two ports, some with a NodePort."""
    chosen = draw(st.sets(st.sampled_from(NAMES), max_size=len(NAMES)))
    return desired(*(service(name, draw(st.integers(0, 6)),
                             ports=("http", "https")[:draw(st.integers(1, 2))],
                             node_port=draw(st.booleans()),
                             first_backend=draw(st.integers(1, 3)))
                     for name in sorted(chosen)))


def kernel_by_service(kernel: FakeServiceMaps) -> dict[int, tuple]:
    return {s.name_hash: (s.frontends, s.backends) for s in kernel.read_back().values()}


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(st.tuples(clusters(), st.booleans()), min_size=1, max_size=6),
       slots=st.integers(0, 30), frontends=st.integers(0, 12))
def test_budgeted_plans_never_overflow_nor_half_write_a_service_and_recover(
        steps, slots, frontends):
    kernel = FakeServiceMaps(sizes=sizes(slots, frontends))
    previous, current = None, {}
    for want, incremental in steps:
        before = kernel_by_service(kernel)
        if incremental and previous is not None:
            p = plan_changes(want, previous, set(want) | set(current),
                             capacity=kernel.capacity())
            again = plan_changes(want, previous, set(want) | set(current),
                                 capacity=kernel.capacity())
        else:
            p = plan(want, kernel.read_back(), capacity=kernel.capacity())
            again = plan(want, kernel.read_back(), capacity=kernel.capacity())
        assert (again.ops, again.refused) == (p.ops, p.refused)       # deterministic
        kernel.apply(p.ops)                   # the fake raises on an overflowing insert
        previous, current = commit(p), want
        after = kernel_by_service(kernel)
        for key in want:
            name_hash = port_hash(key)
            if (key[0].namespace, key[0].name) in p.refused:
                # no growth: same frontends, and of its old backends those still wanted
                # (a removed pod gets no traffic even while the maps are full)
                old_frontends, old_backends = before.get(name_hash, (frozenset(), ()))
                new_frontends, new_backends = after.get(name_hash, (frozenset(), ()))
                wanted = backends_of(want, key)
                assert new_frontends == old_frontends, key
                assert set(new_backends) == {b for b in old_backends
                                             if str(b.address) in wanted}, key
            elif want[key].frontends and key[1] == 4:
                assert served(kernel, key) == backends_of(want, key), key
        assert all(kernel.peak.get(m, 0) <= n for m, n in kernel.capacity().items())
    # room returns: the same maps made large enough, the next sync serves them all
    kernel.sizes = sizes()
    final = sync(kernel, current, previous, set())
    assert not final.refused
    for key in current:
        assert served(kernel, key) == backends_of(current, key)


# --- the agent: refusals are logged, counted and told; a full map never blocks syncs ----

def agent_service(name: str, vip: str):
    return parse_service({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "ns"},
        "spec": {"clusterIP": vip, "clusterIPs": [vip],
                 "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}]}})


def agent_slice(name: str, backends: int, net: int):
    return parse_endpoint_slice({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "ns",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4", "ports": [{"port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [f"10.0.{net}.{i}"]} for i in range(1, backends + 1)]})


class Script:
    """Batches of object changes, each once the agent synced the one before; then, once
    the syncs a refusal or a failure brings on are done, stops the agent. Waits on the
    agent's events (woken), never for a fixed time."""

    def __init__(self, batches, agent_of) -> None:
        self.batches, self.agent_of, self.held_back = batches, agent_of, ()
        self.synced_after: list[AgentStatus] = []
        self.woken = asyncio.Event()           # set at each of the agent's events

    async def _until(self, condition) -> None:
        while not condition():
            self.woken.clear()
            await self.woken.wait()

    async def changes(self):
        agent = self.agent_of()
        for batch in self.batches:
            syncs = agent.status.syncs
            yield batch
            await self._until(lambda n=syncs: agent.status.syncs > n)
            status = agent.status
            self.synced_after.append(replace(status, refused=dict(status.refused)))
        # checked at each event: a sync sets _dirty (a refusal retried) or _kernel_stale
        # (a failure) before it tells its event, so no further sync is due once both clear
        await self._until(lambda: agent.status.syncs > 0 and not agent._dirty.is_set()
                          and not agent._kernel_stale)
        agent.stop()
        await asyncio.Event().wait()


def backends_served(maps: FakeServiceMaps) -> dict[str, set[str]]:
    vips = {}
    for s in maps.read_back().values():
        for f in s.frontends:
            vips[str(f.address)] = {str(b.address) for b in s.backends}
    return vips


def run_script(maps, batches, **agent_args):
    holder = {}
    script = Script(batches, lambda: holder["agent"])
    events = []

    def on_event(kind, fields):
        events.append((kind, fields))
        script.woken.set()

    agent = holder["agent"] = Agent(script, maps, min_sync_period=0.01, on_event=on_event,
                                    **agent_args)
    assert asyncio.run(asyncio.wait_for(agent.run(), 20)) == 0
    return agent, script.synced_after, events


def test_the_agent_refuses_a_service_that_does_not_fit_and_serves_it_once_room_returns(
        caplog):
    caplog.set_level("INFO")
    maps = FakeServiceMaps(sizes=sizes(slots=6))
    batches = [
        [ObjectChange(o.key, o) for o in (agent_service("a", "10.96.0.1"), agent_slice("a", 2, 1),
                                          agent_service("b", "10.96.0.2"), agent_slice("b", 2, 2))],
        [ObjectChange(o.key, o) for o in (agent_service("c", "10.96.0.3"), agent_slice("c", 4, 3))],
        [ObjectChange(agent_slice("a", 1, 1).key, agent_slice("a", 1, 1))],   # a shrinks
        [ObjectChange(agent_slice("b", 2, 2).key, None)],                      # b's pods go
    ]
    agent, after, events = run_script(maps, batches)
    assert after[0].refused == {}
    assert after[1].refused == {"ns/c": "bpfp_slot4 full: 2 of 6 entries free, the change "
                                         "needs 4"}
    assert "event=service_refused service=ns/c" in caplog.text
    assert [f["name"] for k, f in events if k == "service_refused"] == ["c"]
    # still refused (three slots free, four needed), while the change to a went in
    assert set(after[2].refused) == {"ns/c"} and after[2].sync_errors == 0
    # room returned: c is served, from the sync after the one that freed the room
    assert agent.status.refused == {} and agent.status.services_refused == 1
    assert backends_served(maps) == {"10.96.0.1": {"10.0.1.1"}, "10.96.0.2": set(),
                                     "10.96.0.3": {f"10.0.3.{i}" for i in range(1, 5)}}
    assert "event=service_accepted service=ns/c" in caplog.text
    assert agent.status.sync_errors == 0


class SmallerThanItSays(FakeServiceMaps):
    """A kernel whose map refuses inserts before the size it reports (a per-CPU counted
    hash map can): the budget is wrong, and the agent must not retry it forever."""

    def capacity(self) -> dict[str, int]:
        return sizes(slots=100)


def test_a_map_that_refuses_early_lowers_the_budget_instead_of_failing_every_sync(caplog):
    maps = SmallerThanItSays(sizes=sizes(slots=5))
    batches = [
        [ObjectChange(o.key, o) for o in (agent_service("a", "10.96.0.1"), agent_slice("a", 3, 1),
                                          agent_service("b", "10.96.0.2"), agent_slice("b", 3, 2))],
        [ObjectChange(o.key, o) for o in (agent_service("d", "10.96.0.4"), agent_slice("d", 1, 4))],
    ]
    agent, after, _ = run_script(maps, batches)
    assert agent.status.sync_errors >= 1
    assert "event=map_budget_lowered map=bpfp_slot4" in caplog.text
    # every Service that fits what the map took is served; the one that did not is refused
    served_now = backends_served(maps)
    assert set(agent.status.refused) == {"ns/b"}
    assert served_now["10.96.0.1"] == {"10.0.1.1", "10.0.1.2", "10.0.1.3"}
    assert served_now["10.96.0.4"] == {"10.0.4.1"}


class MemoryComesBack:
    """The source for a map that refuses below its size (memcg ENOMEM): a and b, then
    PERIODS periodic syncs with the map still short, then memory returns; waits on the
    agent's events, never for a fixed time."""
    PERIODS = 6
    complete, held_back = True, ()

    def __init__(self, maps, agent_of) -> None:
        self.maps, self.agent_of = maps, agent_of
        self.woken = asyncio.Event()
        self.errors_while_short: int | None = None

    async def _until(self, condition) -> None:
        while not condition():
            self.woken.clear()
            await self.woken.wait()

    async def changes(self):
        agent = self.agent_of()
        yield [ObjectChange(o.key, o) for o in (
            agent_service("a", "10.96.0.1"), agent_slice("a", 3, 1),
            agent_service("b", "10.96.0.2"), agent_slice("b", 3, 2))]
        await self._until(lambda: agent.status.syncs > 0 and agent.status.refused)
        first = agent.status.syncs
        await self._until(lambda: agent.status.syncs >= first + self.PERIODS)
        self.errors_while_short = agent.status.sync_errors
        self.maps.sizes["bpfp_slot4"] = 100                 # memory returns
        await self._until(lambda: not agent.status.refused)
        agent.stop()
        await asyncio.Event().wait()


def test_a_lowered_budget_stays_until_the_map_takes_more_again(caplog):
    """Issue 14.4: the map took 5 of the 100 entries it reports. The periodic syncs after
    keep the lowered budget (no failed sync each period); once the map takes more again,
    a periodic sync's probe raises the budget and b goes in without a failed sync."""
    caplog.set_level("INFO")
    maps = SmallerThanItSays(sizes=sizes(slots=5))
    holder = {}
    source = MemoryComesBack(maps, lambda: holder["agent"])
    agent = holder["agent"] = Agent(source, maps, min_sync_period=0.001, sync_period=0.01,
                                    on_event=lambda kind, fields: source.woken.set())
    assert asyncio.run(asyncio.wait_for(agent.run(), 20)) == 0
    assert source.errors_while_short == 1, "one failed sync per period"
    assert agent.status.sync_errors == 1
    assert "event=map_budget_raised map=bpfp_slot4" in caplog.text
    assert backends_served(maps) == {"10.96.0.1": {"10.0.1.1", "10.0.1.2", "10.0.1.3"},
                                     "10.96.0.2": {"10.0.2.1", "10.0.2.2", "10.0.2.3"}}


# --- sizes are configurable: flags, and the config file's maps section ---------------------

def test_map_sizes_come_from_flags_or_the_config_file(tmp_path):
    from agent import cli, config
    path = tmp_path / "config.yaml"
    path.write_text(f"apiVersion: {config.API_VERSION}\nkind: {config.KIND}\n"
                    "maps:\n  frontends: 512\n  backendSlots: 40\n")
    parser = cli.build_parser()
    argv = ["agent", "--config", str(path), "--max-frontends", "1024"]
    args = config.apply(parser, argv, parser.parse_args(argv))
    assert (args.max_frontends, args.max_backend_slots) == (1024, 40)   # the flag wins
    assert (args.max_source_ranges, args.max_maglev_rows) == (65536, None)   # None: derived
    assert cli._check_tc_flags(args) == ""
    args.max_backend_slots = 0
    assert cli._check_tc_flags(args) == "--max-backend-slots 0: must be 1 to 1073741824"
    with pytest.raises(config.ConfigError, match=r"maps\.backendSlots: must be a positive "
                                                 r"whole number"):
        config.parse({"apiVersion": config.API_VERSION, "kind": config.KIND,
                      "maps": {"backendSlots": -1}})
    with pytest.raises(config.ConfigError, match=r"maps\.slots: unknown field"):
        config.parse({"apiVersion": config.API_VERSION, "kind": config.KIND,
                      "maps": {"slots": 1}})


@pytest.mark.parametrize("incremental", [False, True], ids=["full", "changes"])
def test_a_refused_rollout_still_stops_sending_to_the_pods_that_left(incremental):
    """a moves from pods 1-4 to pods 3-7 in a full map: the growth is refused, but pods 1
    and 2 (terminated) leave the kernel at once (kube-proxy never keeps a removed one)."""
    kernel = FakeServiceMaps(sizes=sizes(slots=4))
    before = desired(service("a", 4))
    previous = sync(kernel, before)
    rollout = desired(service("a", 5, first_backend=3))
    p = sync(kernel, rollout, previous if incremental else None, set(rollout))
    assert set(p.refused) == {("default", "a")}
    key = next(iter(rollout))
    number = sum(map(ord, "a")) % 200 + 1
    assert served(kernel, key) == {f"10.{number}.0.3", f"10.{number}.0.4"}


def test_maglev_rows_a_failed_sync_wrote_are_read_back_and_removed():
    """Issue 14.4: a sync writes a new Service's slots and Maglev table, then the frontend
    map refuses (it holds less than it reports): the rows are read back with the rest of
    what the failed sync left, the next plan removes them, and the budget counted them."""
    maglev_m = 251
    kernel = FakeServiceMaps(sizes={**sizes(frontends=2), "bpfp_maglev": 64})
    told = {**sizes(), "bpfp_maglev": 64}                # the frontend map says it is larger
    want = desired(service("a", 2, node_port=True), service("b", 2, node_port=True))
    with pytest.raises(MapFullError):
        kernel.apply(plan(want, kernel.read_back(), maglev_m=maglev_m, capacity=told).ops)
    left = kernel.read_back()
    orphans = {i for i, s in left.items() if s.stray_maglev_rows}
    assert orphans and all(not left[i].frontends for i in orphans)
    # the next plan, on the budget the agent lowers to, removes them and refuses b
    retry = plan(want, left, maglev_m=maglev_m,
                 capacity={**told, "bpfp_svc4": kernel.entries()["bpfp_svc4"]})
    kernel.apply(retry.ops)
    uses = {s.svc_id for s in kernel.read_back().values() if s.flags & SVC_F_MAGLEV}
    assert set(kernel.maglev) == uses, "Maglev rows no frontend uses"
    assert set(retry.refused) == {("default", "b")}
