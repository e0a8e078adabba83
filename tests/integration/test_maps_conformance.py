"""The fake kernel door (tests/fakes.py) against the real pinned maps: the same operation
sequences, full maps included, leave the same entries and raise the same MapFullError.

What the kernel does with a batch that overflows midway: BPF_MAP_UPDATE_BATCH writes its
entries one by one and stops at the first one refused (E2BIG from a full hash map, ENOSPC
from a full LPM trie), keeping those before it; the real door writes one batch per op kind
and family, a Maglev table row by row. The fake mirrors that, and these tests hold it to
it. Small maps only: a large BPF_F_NO_PREALLOC hash map counts its entries per CPU and may
refuse a little early, which the agent handles by lowering its budget (agent.agent)."""
from __future__ import annotations

import errno
import ipaddress
import random
import socket
import uuid
from pathlib import Path

import pytest

from agent.datapath import bpfsys, layout, loader
from agent.datapath.config import DatapathConfig
from agent.datapath.maps import BpfServiceMaps, MapFullError, PinnedMap
from agent.model.types import (
    Backend,
    Frontend,
    FrontendKind,
    Protocol,
    ServicePortName,
    ServicePortState,
)
from agent.planner import (
    BackendAddr,
    DeleteFrontend,
    DeleteMaglev,
    DeleteRange,
    FrontendKey,
    PutFrontend,
    PutMaglev,
    PutRange,
    PutSlot,
    by_scope,
    plan,
)
from tests.fakes import FakeServiceMaps

pytestmark = pytest.mark.integration

SIZES = DatapathConfig(max_frontends=8, max_slots=12, max_source_ranges=4,
                       max_maglev_rows=40)
MAGLEV_M = 1021                      # 32 rows a table: the second one overflows midway


@pytest.fixture(scope="module")
def real_maps():
    pin_dir = Path(f"/sys/fs/bpf/bpfp-conf-{uuid.uuid4().hex[:8]}")
    config = DatapathConfig(**{**{f: getattr(SIZES, f) for f in (
        "max_frontends", "max_slots", "max_source_ranges", "max_maglev_rows")},
        "pin_dir": pin_dir, "maglev_m": MAGLEV_M})
    try:
        compiled = loader.compile_programs(config)       # creates and pins the maps
        maps = BpfServiceMaps(pin_dir)
        yield maps
        maps.close()
        del compiled
    finally:
        loader.cleanup(pin_dir)


@pytest.fixture
def kernels(real_maps):
    """(fake, real), both empty, the fake sized as the kernel reports its maps."""
    _empty(real_maps)
    assert snapshot(real_maps) == EMPTY
    yield FakeServiceMaps(sizes=real_maps.capacity()), real_maps
    _empty(real_maps)


def _empty(maps: BpfServiceMaps) -> None:
    for pinned in (maps.svc4, maps.svc6, maps.slots4, maps.slots6, maps.maglev):
        keys = [type(k).from_buffer_copy(k) for k, _ in pinned.items()]
        if keys:
            pinned.delete(keys)
    for key in bpfsys.map_keys(maps.ranges.fd, layout.SrcrangeKey):
        bpfsys.map_delete(maps.ranges.fd, key)


# --- one comparable picture of either door's entries, read from the raw maps ------------

EMPTY = ({}, {}, set(), {})


def _addr4(value: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(socket.ntohl(value))


def _addr6(value) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(bytes(value))


def snapshot(maps) -> tuple:
    """(frontends, slots, ranges, Maglev rows) as plain values."""
    if isinstance(maps, FakeServiceMaps):
        return (dict(maps.frontends), dict(maps.slots), set(maps.ranges),
                dict(maps.maglev_rows))
    protocols = {p.number: p for p in Protocol}
    frontends = {}
    for table, decode in ((maps.svc4, _addr4), (maps.svc6, _addr6)):
        for k, v in table.items():
            frontends[FrontendKey(decode(k.addr), socket.ntohs(k.port), protocols[k.proto],
                                  k.scope)] = (v.svc_id, v.count, v.name_hash,
                                               v.affinity_sec, v.flags)
    slots = {}
    for family, table, decode in ((4, maps.slots4, _addr4), (6, maps.slots6, _addr6)):
        for k, v in table.items():
            slots[k.svc_id, k.slot] = (family, BackendAddr(decode(v.addr),
                                                           socket.ntohs(v.port)), v.flags)
    ranges = set()
    for k in bpfsys.map_keys(maps.ranges.fd, layout.SrcrangeKey):
        raw, bits = bytes(k.addr), k.prefixlen - 32
        v4 = raw[4:] == bytes(12) and bits <= 32
        ranges.add((k.svc_id, ipaddress.IPv4Network((raw[:4], bits)) if v4
                    else ipaddress.IPv6Network((raw, bits))))
    rows = {(k.svc_id, k.row): tuple(v.slot) for k, v in maps.maglev.items()}
    return frontends, slots, ranges, rows


def apply_both(fake: FakeServiceMaps, real: BpfServiceMaps, ops) -> str | None:
    """Apply ops to both; the map each refused (None: both took everything), checked to
    be the same, and their entries checked to be the same afterwards."""
    outcomes = []
    for door in (fake, real):
        try:
            door.apply(ops)
            outcomes.append(None)
        except MapFullError as full:
            outcomes.append(full.map_name)
    assert outcomes[0] == outcomes[1], f"fake refused {outcomes[0]}, kernel {outcomes[1]}"
    assert snapshot(fake) == snapshot(real)
    return outcomes[0]


# --- desired states that overflow the small maps ---------------------------------------

def service(i: int, backends: int, family: int = 4, outside: bool = False,
            ranges: tuple[str, ...] = (), local: frozenset[int] = frozenset()) -> dict:
    """local: the backends (by index) on this node, whose slots carry BE_LOCAL."""
    name = ServicePortName("conf", f"s{i}", "", Protocol.TCP if i % 2 else Protocol.UDP)
    base = "10.96.0.0" if family == 4 else "fd00:10:96::"
    pods = "10.244.0.0" if family == 4 else "fd00:10:244::"
    vip = ipaddress.ip_address(base) + i + 1
    kind = FrontendKind.LOAD_BALANCER if outside else FrontendKind.CLUSTER_IP
    pod_list = tuple(Backend(ipaddress.ip_address(pods) + 100 * i + j + 1, 8080,
                             local=j in local) for j in range(backends))
    return {(name, family): ServicePortState(
        name, family, (Frontend(vip, 80, name.protocol, kind),), pod_list,
        external_backends=pod_list if outside else (),
        outside_backends=pod_list if outside else (),
        source_ranges=tuple(ipaddress.ip_network(r) for r in ranges))}


def world(*services: dict) -> dict:
    merged = {}
    for s in services:
        merged.update(s)
    return by_scope(merged)


def test_a_full_slot_map_keeps_the_batch_up_to_the_refused_entry(kernels):
    fake, real = kernels
    assert apply_both(fake, real, plan(world(service(1, 5)), {}).ops) is None
    # 5 + 9 slots do not fit in 12: the batch stops at the first slot over
    grown = plan(world(service(1, 5), service(2, 4), service(3, 5)), fake.read_back())
    assert apply_both(fake, real, grown.ops) == "bpfp_slot4"
    assert len(snapshot(real)[1]) == 12                   # full, not rolled back
    # the kernel holds a whole service or none of it: the frontends were not written
    assert fake.read_back() == real.read_back()
    assert {s.svc_id for s in real.read_back().values() if s.frontends} == {1}


def test_a_full_frontend_map_refuses_new_keys_but_rewrites_held_ones(kernels):
    fake, real = kernels
    ten = world(*(service(i, 0) for i in range(10)))
    assert apply_both(fake, real, plan(ten, {}).ops) == "bpfp_svc4"
    assert len(snapshot(real)[0]) == 8
    # a frontend the full map holds can still be rewritten (its count changes)
    [(held, (svc_id, *_))] = list(snapshot(real)[0].items())[:1]
    rewrite = [PutSlot(4, svc_id, 0, BackendAddr(ipaddress.ip_address("10.244.9.9"), 80)),
               PutFrontend(held, svc_id, 1, 7, 0, 0)]
    assert apply_both(fake, real, rewrite) is None
    assert apply_both(fake, real, [DeleteFrontend(held)]) is None
    assert apply_both(fake, real, plan(ten, fake.read_back()).ops) == "bpfp_svc4"


def test_one_family_full_leaves_the_other_as_the_real_door_orders_it(kernels):
    """A PutSlot batch of both families goes to the kernel one family after the other,
    in the order the families first appear: a full IPv4 map stops the IPv6 batch from
    being written when IPv4 came first, and not when IPv6 did."""
    fake, real = kernels
    mixed = world(service(1, 8, 4), service(2, 8, 6), service(3, 8, 4), service(4, 3, 6))
    assert apply_both(fake, real, plan(mixed, {}).ops) == "bpfp_slot4"
    assert fake.read_back() == real.read_back()
    six_first = world(service(5, 2, 6), service(6, 20, 4))
    assert apply_both(fake, real, plan(six_first, fake.read_back()).ops) is not None
    assert fake.read_back() == real.read_back()


def test_a_full_lpm_trie_refuses_like_a_full_hash_map(kernels):
    """bpfp_srcrange answers ENOSPC, not E2BIG: the door maps both to MapFullError."""
    fake, real = kernels
    walled = world(service(1, 1, outside=True, ranges=("192.0.2.0/24", "198.51.100.0/24")),
                   service(2, 1, outside=True, ranges=("203.0.113.0/24", "10.1.0.0/16",
                                                         "10.2.0.0/16")))
    assert apply_both(fake, real, plan(walled, {}).ops) == "bpfp_srcrange"
    net = ipaddress.ip_network("192.0.2.0/24")
    assert apply_both(fake, real, [PutRange(1, net)]) is None      # held: fits
    assert apply_both(fake, real, [DeleteRange(1, net), DeleteRange(1, net)]) is None
    assert apply_both(fake, real, [PutRange(9, ipaddress.ip_network("fd00::/64"))]) is None


def test_a_maglev_table_that_overflows_midway_keeps_its_first_rows(kernels):
    fake, real = kernels
    rows = -(-MAGLEV_M // layout.MAGLEV_ROW)                     # 32
    tables = [PutMaglev(svc_id, tuple((i * svc_id) % 3 for i in range(MAGLEV_M)))
              for svc_id in (1, 2)]
    assert apply_both(fake, real, tables) == "bpfp_maglev"
    assert len(snapshot(real)[3]) == SIZES.max_maglev_rows
    assert {r for (svc_id, r) in snapshot(real)[3] if svc_id == 2} == \
        set(range(SIZES.max_maglev_rows - rows))
    assert apply_both(fake, real, [DeleteMaglev(2, MAGLEV_M), DeleteMaglev(2, MAGLEV_M)]) \
        is None
    assert apply_both(fake, real, [tables[0]]) is None           # held rows: rewritten


def test_the_planners_maglev_tables_read_back_identically(kernels):
    fake, real = kernels
    desired = world(service(1, 3, outside=True), service(2, 2))
    p = plan(desired, {}, maglev_m=MAGLEV_M)
    assert any(isinstance(op, PutMaglev) for op in p.ops)
    assert apply_both(fake, real, p.ops) is None
    shrunk = plan(world(service(1, 2, outside=True)), fake.read_back(), maglev_m=MAGLEV_M)
    assert apply_both(fake, real, shrunk.ops) is None
    assert apply_both(fake, real, plan({}, fake.read_back(), maglev_m=MAGLEV_M).ops) is None
    assert snapshot(real) == EMPTY


@pytest.mark.parametrize("seed", range(12))
def test_random_plans_in_small_maps_leave_the_same_entries(kernels, seed):
    """Worlds drawn at random, planned with no budget (so they overflow the maps at any
    point), then planned again from what each refusal left, as the agent does."""
    fake, real = kernels
    rnd, flips = random.Random(seed), random.Random(-seed - 1)
    refused = 0
    for _ in range(8):
        parts = []
        for i in rnd.sample(range(1, 12), rnd.randrange(0, 6)):
            family = rnd.choice((4, 6))
            ranges = [f"192.0.{r}.0/24" if family == 4 else f"fd00:{r}::/64"
                      for r in range(rnd.randrange(0, 3))]
            # a backend's BE_LOCAL drawn anew each round, so flags flip on slots that
            # stay (from their own generator: the worlds stay those that fill the maps)
            local = frozenset(j for j in range(6) if flips.random() < 0.5)
            parts.append(service(i, rnd.randrange(0, 6), family, rnd.random() < 0.3,
                                 tuple(ranges), local))
        p = plan(world(*parts), fake.read_back(), maglev_m=7 if rnd.random() < 0.5 else 0)
        refused += apply_both(fake, real, p.ops) is not None
        assert fake.read_back() == real.read_back()
    assert refused or seed % 3, "no map filled up: the sizes are too large to test"


@pytest.mark.parametrize("code", [errno.E2BIG, errno.ENOSPC, errno.ENOMEM])
def test_every_full_map_errno_is_a_map_full_error(real_maps, monkeypatch, code):
    """ENOMEM (a hash map that cannot allocate an element) is not provoked here: the
    maps' memory is charged to the memory cgroup of the process that created them, which
    would have to be held at its limit while the compile runs. The door's mapping of each
    errno is checked instead, with the kernel call answering it."""
    pinned = PinnedMap(real_maps.pin_dir, layout.MAPS["bpfp_slot4"])
    try:
        monkeypatch.setattr(bpfsys, "map_update_batch", lambda *a: (0, code))
        with pytest.raises(MapFullError, match="bpfp_slot4 is full") as full:
            pinned.update([layout.SlotKey(1, 0)], [layout.Backend4(0, 0, 0)])
        assert full.value.map_name == "bpfp_slot4"
        monkeypatch.setattr(bpfsys, "map_update_batch", lambda *a: (0, errno.EPERM))
        with pytest.raises(OSError) as other:
            pinned.update([layout.SlotKey(1, 0)], [layout.Backend4(0, 0, 0)])
        assert not isinstance(other.value, MapFullError)
    finally:
        pinned.close()
