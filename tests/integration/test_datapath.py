"""The kernel door alone: compile the real programs, write plans into the real pinned maps,
read them back, and check what a restarted agent would adopt."""
from __future__ import annotations

import ipaddress
import uuid
from pathlib import Path

import pytest

from agent.datapath import loader
from agent.datapath.config import DatapathConfig
from agent.datapath.maps import BpfServiceMaps, MapFullError
from agent.model.types import Backend, Frontend, Protocol, ServicePortName, ServicePortState
from agent.planner import plan

pytestmark = pytest.mark.integration


@pytest.fixture
def pin_dir():
    path = Path(f"/sys/fs/bpf/bpfp-test-{uuid.uuid4().hex[:8]}")
    try:
        yield path
    finally:
        loader.cleanup(path)


_compiled = []   # BCC objects stay alive for the test's duration, as in the loader child


def open_maps(config: DatapathConfig) -> BpfServiceMaps:
    """Compile (which creates or adopts the pins), then open the pins as the agent does."""
    _compiled.append(loader.compile_programs(config))
    return BpfServiceMaps(config.pin_dir)


# Service and pod ranges of each family, as a dual-stack cluster has them.
RANGES = {4: ("10.96.0.0", "10.244.0.0"), 6: ("fd00:10:96::", "fd00:10:244::")}


def world(n: int, backends_each: int = 3, offset: int = 0, family: int = 4) -> dict:
    desired = {}
    service_range, pod_range = (ipaddress.ip_address(a) for a in RANGES[family])
    for i in range(n):
        name = ServicePortName("ns", f"svc{i}", "", Protocol.TCP if i % 2 else Protocol.UDP)
        vip = service_range + i + 1
        backends = tuple(
            Backend(pod_range + (i * backends_each + j + offset) % 60000 + 1, 8080)
            for j in range(backends_each))
        desired[name, family] = ServicePortState(
            name, family, (Frontend(vip, 80, name.protocol),),
            tuple(sorted(backends, key=Backend.sort_key)))
    return desired


def dual_stack(n: int, backends_each: int = 3, offset: int = 0) -> dict:
    """n dual-stack services: each service port once per family, as kube-proxy sees them."""
    return world(n, backends_each, offset, 4) | world(n, backends_each, offset, 6)


def test_plans_written_to_the_kernel_read_back_identically(pin_dir):
    maps = open_maps(DatapathConfig(pin_dir=pin_dir))
    assert maps.read_back() == {}
    first = plan(world(2000), {})
    maps.apply(first.ops)
    assert maps.read_back() == first.result
    assert plan(world(2000), maps.read_back()).ops == ()

    changed = plan(world(1500, backends_each=2, offset=7), maps.read_back())
    maps.apply(changed.ops)
    assert maps.read_back() == changed.result

    maps.apply(plan({}, maps.read_back()).ops)
    assert maps.read_back() == {}


def test_ipv6_and_dual_stack_plans_read_back_identically(pin_dir):
    maps = open_maps(DatapathConfig(pin_dir=pin_dir))
    assert maps.supports(6, Protocol.TCP) and maps.supports(6, Protocol.UDP)
    only6 = plan(world(500, family=6), {})
    maps.apply(only6.ops)
    assert maps.read_back() == only6.result
    assert {s.family for s in maps.read_back().values()} == {6}

    both = plan(dual_stack(1000), maps.read_back())
    maps.apply(both.ops)
    assert maps.read_back() == both.result
    assert plan(dual_stack(1000), maps.read_back()).ops == ()

    # each family's svc_ids index that family's slot map, and nothing else
    ids = {family: {i for i, s in both.result.items() if s.family == family} for family in (4, 6)}
    assert len(ids[4]) == len(ids[6]) == 1000
    assert {k.svc_id for k, _ in maps.slots4.items()} == ids[4]
    assert {k.svc_id for k, _ in maps.slots6.items()} == ids[6]
    frontends6 = {ipaddress.IPv6Address(bytes(k.addr)) for k, _ in maps.svc6.items()}
    assert frontends6 == {f.address for i in ids[6] for f in both.result[i].frontends}

    changed = plan(dual_stack(700, backends_each=2, offset=5), maps.read_back())
    maps.apply(changed.ops)
    assert maps.read_back() == changed.result

    maps.apply(plan({}, maps.read_back()).ops)
    assert maps.read_back() == {}
    assert list(maps.svc6.items()) == [] and list(maps.slots6.items()) == []


def test_a_second_compile_adopts_the_pinned_maps(pin_dir):
    config = DatapathConfig(pin_dir=pin_dir)
    first = open_maps(config)
    p = plan(dual_stack(50), {})
    first.apply(p.ops)
    again = open_maps(config)
    assert again.read_back() == p.result


def test_deleting_what_is_already_gone_is_not_an_error(pin_dir):
    maps = open_maps(DatapathConfig(pin_dir=pin_dir))
    p = plan(world(10), {})
    maps.apply(p.ops)
    removal = plan({}, p.result)
    maps.apply(removal.ops[:5])
    maps.apply(removal.ops)            # the first five again: already gone
    assert maps.read_back() == {}


def test_a_full_map_raises_a_clear_error(pin_dir):
    config = DatapathConfig(pin_dir=pin_dir, max_frontends=16, max_slots=1024)
    maps = open_maps(config)
    with pytest.raises(MapFullError, match="bpfp_svc4.*full"):
        maps.apply(plan(world(40), {}).ops)


def test_a_pinned_map_of_another_layout_is_refused(pin_dir):
    from bcc import BPF
    pin_dir.mkdir(parents=True)
    # a map with the same pinned name but other key and value sizes
    source = f'BPF_TABLE_PINNED("hash", u32, u64, bpfp_svc4, 16, "{pin_dir}/bpfp_svc4_v1");'
    BPF(text=source.encode())
    with pytest.raises(loader.DatapathError, match="another layout"):
        loader.compile_programs(DatapathConfig(pin_dir=pin_dir))


def test_the_agents_ctypes_layouts_are_what_bcc_compiles(pin_dir):
    from agent.datapath import layout
    bpf = loader.compile_programs(DatapathConfig(pin_dir=pin_dir)).bpf
    assert set(layout.MAPS) == {f"bpfp_{kind}{family}" for kind in ("svc", "slot", "revnat")
                                for family in (4, 6)} | {
        "bpfp_sock_events",
        "bpfp_affinity", "bpfp_stats", "bpfp_ct", "bpfp_ifaddr", "bpfp_affinity_ext",
        "bpfp_srcrange", "bpfp_maglev", "bpfp_tc_events"}
    for name, spec in layout.MAPS.items():
        table = bpf[name.encode()]
        assert layout.struct_fields(table.Key) == layout.struct_fields(spec.key), name
        leaf = getattr(table, "sLeaf", table.Leaf)     # per-CPU tables: one CPU's value
        assert layout.struct_fields(leaf) == layout.struct_fields(spec.value), name


def test_the_loader_child_compiles_pins_and_attaches(pin_dir, tmp_path):
    from lab.cgroups import cgroup2_mount
    cgroup = cgroup2_mount() / f"bpfp-ldr-{pin_dir.name[-8:]}"
    cgroup.mkdir()
    try:
        loader.load_in_child(DatapathConfig(pin_dir=pin_dir), cgroup)
        assert sorted(loader.attached_programs(cgroup)) == sorted(
            f for f, _ in loader.SOCKET_PROGRAMS)
        maps = BpfServiceMaps(pin_dir)
        assert maps.read_back() == {}
        maps.close()
    finally:
        loader.cleanup(pin_dir)
        loader.wait_detached(cgroup, 5)
        cgroup.rmdir()
