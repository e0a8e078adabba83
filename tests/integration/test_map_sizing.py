"""The kernel holds what agent/datapath/sizing.py says a size costs: with the sizes a small
node derives, the maps an empty agent makes stay within 32 MiB, and the inventory reports
each map's memory as the kernel accounts it (fdinfo memlock)."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from agent.datapath import inventory, layout, loader, sizing
from agent.datapath.config import DatapathConfig

pytestmark = pytest.mark.integration

SMALL_NODE = 2 << 30


@pytest.fixture
def pin_dir():
    path = Path(f"/sys/fs/bpf/bpfp-size-{uuid.uuid4().hex[:8]}")
    try:
        yield path
    finally:
        loader.cleanup(path)


def test_an_empty_agent_sized_for_a_small_node_holds_at_most_32_mib(pin_dir):
    cpus = sizing.possible_cpus()
    sizes = sizing.derive(SMALL_NODE, cpus)
    loaded = loader.compile_programs(DatapathConfig(pin_dir=pin_dir, **sizes))
    try:
        usage = {m.name: m for m in inventory.map_usage(pin_dir)}
    finally:
        loaded.bpf.cleanup()
    assert set(usage) >= {spec.pin for spec in layout.MAPS.values()}
    for sized in sizing.SIZED:
        for table in sized.tables:
            held = usage[layout.MAPS[table].pin]
            assert held.max_entries == sizes[sized.field], table
            # the model the defaults are derived with is the kernel's own account, but
            # for the table's header and per-CPU locks (under a kilobyte a CPU)
            model = sizes[sized.field] * sizing.entry_bytes(table, cpus, sized.preallocated)
            assert 0 <= held.memory_bytes - model <= 1024 * cpus + 4096, table
    assert sum(m.memory_bytes for m in usage.values()) <= 32 * 2**20
