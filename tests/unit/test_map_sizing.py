"""Map sizes derived from the node (agent/datapath/sizing.py): an empty agent on a small
node holds little kernel memory, sizes grow with the node up to the compiled-in defaults,
and every size is a flag and a config field that wins over the derivation."""
from __future__ import annotations

import pytest

from agent import cli, cli_output, config
from agent.datapath import sizing
from agent.datapath.config import DatapathConfig

GiB = 1 << 30
SMALL_NODE = 2 * GiB


def total_bytes(sizes: dict[str, int], cpus: int) -> int:
    return sum(sizing.map_bytes(m, sizes[m.field], cpus) for m in sizing.SIZED)


def test_the_fixed_defaults_took_over_300_mib_before_any_service():
    # the figure issue 16 measured (316 MiB in fdinfo): what derive() replaces
    fixed = {m.field: getattr(DatapathConfig(), m.field) for m in sizing.SIZED}
    assert total_bytes(fixed, cpus=2) > 300 * 2**20


@pytest.mark.parametrize("cpus", [2, 8, 64])
def test_an_empty_agent_on_a_small_node_holds_at_most_32_mib(cpus):
    sizes = sizing.derive(SMALL_NODE, cpus)
    assert total_bytes(sizes, cpus) <= 32 * 2**20
    for m in sizing.SIZED:
        assert sizes[m.field] >= m.floor, m.field


def test_sizes_grow_with_the_node_are_powers_of_two_and_stop_at_the_compiled_defaults():
    small, large, huge = (sizing.derive(n * GiB, 4) for n in (2, 32, 4096))
    ceiling = DatapathConfig()
    for m in sizing.SIZED:
        assert small[m.field] <= large[m.field] <= huge[m.field], m.field
        assert huge[m.field] == getattr(ceiling, m.field), m.field
        for sizes in (small, large, huge):
            assert sizes[m.field] & (sizes[m.field] - 1) == 0, m.field
    assert large["ct_max"] > small["ct_max"] and large["max_slots"] > small["max_slots"]
    # a ratio is the one knob: ten times the share, more entries (until the ceiling)
    assert sizing.derive(4 * GiB, 4, ratio=0.05)["ct_max"] > sizing.derive(4 * GiB, 4)["ct_max"]


def test_per_cpu_stats_shrink_with_many_cpus_to_keep_their_memory():
    few, many = sizing.derive(32 * GiB, 2), sizing.derive(32 * GiB, 128)
    assert many["max_stats"] < few["max_stats"]
    stats = next(m for m in sizing.SIZED if m.field == "max_stats")
    assert sizing.map_bytes(stats, many["max_stats"], 128) <= \
        32 * GiB * sizing.DEFAULT_MEMORY_RATIO * stats.share


def parse(argv: list[str], path=None):
    parser = cli.build_parser()
    argv = ["agent", *argv] + (["--config", str(path)] if path else [])
    args = parser.parse_args(argv)
    return config.apply(parser, argv, args) if path else args


def test_a_size_given_by_flag_or_config_wins_and_the_rest_are_derived(tmp_path, monkeypatch):
    monkeypatch.setattr(sizing, "node_memory_bytes", lambda: SMALL_NODE)
    monkeypatch.setattr(sizing, "possible_cpus", lambda: 2)
    path = tmp_path / "config.yaml"
    path.write_text(f"apiVersion: {config.API_VERSION}\nkind: {config.KIND}\n"
                    "maps:\n  affinity: 4096\n  stats: 2048\n  memoryRatio: 0.01\n"
                    "conntrack:\n  maxEntries: 65536\n")
    args = parse(["--max-stats", "1024", "--max-reverse-nat", "8192"], path)
    assert cli._check_tc_flags(args) == ""
    sizes = sizing.sizes_for(args)
    derived = sizing.derive(SMALL_NODE, 2, ratio=0.01)
    assert sizes == {**derived, "max_stats": 1024, "max_revnat": 8192, "max_affinity": 4096,
                     "ct_max": 65536}
    # the fields DatapathConfig takes, nothing else
    DatapathConfig(**sizes)
    assert sizing.sizes_for(parse([])) == sizing.derive(SMALL_NODE, 2)


@pytest.mark.parametrize("argv, error", [
    (["--max-affinity", "0"], "--max-affinity 0: must be 1 to 1073741824"),
    (["--max-stats", str(1 << 31)], "--max-stats 2147483648: must be 1 to 1073741824"),
    (["--map-memory-ratio", "0"], "--map-memory-ratio 0.0: must be above 0 and at most 0.5"),
    (["--map-memory-ratio", "0.9"], "--map-memory-ratio 0.9: must be above 0 and at most 0.5"),
])
def test_bad_sizes_are_refused_by_name(argv, error):
    assert cli._check_tc_flags(parse(argv)) == error


def test_a_bad_memory_ratio_in_the_config_file_names_its_field():
    with pytest.raises(config.ConfigError, match=r"maps\.memoryRatio: must be a fraction"):
        config.parse({"apiVersion": config.API_VERSION, "kind": config.KIND,
                      "maps": {"memoryRatio": "lots"}})


def test_status_shows_each_maps_memory_and_their_total():
    from agent.api.client import to_plain
    from agent.api.generated import agent_pb2
    status = agent_pb2.Status(synced=True, node_name="n", source="manifests", maps=[
        agent_pb2.MapUsage(name="bpfp_ct_v1", type="lru_hash", entries=0, max_entries=32768,
                           memory_bytes=5 * 2**20),
        agent_pb2.MapUsage(name="bpfp_svc4_v1", type="hash", entries=3, max_entries=16384,
                           memory_bytes=256 * 1024)])
    text = cli_output.status_text(to_plain(status))
    ct_row = next(line for line in text.splitlines() if line.startswith("bpfp_ct_v1"))
    assert ct_row.split()[-1] == "5.0MiB"
    assert "MEMORY" in text and "maps hold 5.2MiB of kernel memory" in text
