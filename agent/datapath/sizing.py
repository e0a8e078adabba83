"""Default map sizes derived from the node: a share of its memory (--map-memory-ratio) for
every map whose size flag is not given, each between a floor and the compiled-in default.

Why: the sizes were fixed for a large node (316 MiB of kernel memory before any service,
mostly preallocated LRU maps) and every node pays them. Cilium sizes its flow maps the same
way (--bpf-map-dynamic-size-ratio, a share of total memory). The memory of a map is the
kernel's own accounting (what fdinfo's memlock reports on 6.x), modelled in map_bytes and
checked against the kernel by tests/integration/test_map_sizing.py. SIZE_FLAGS declares the
--max-* flags that give a size by hand, for the command line and the config file's maps:."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

from agent.datapath import layout
from agent.datapath.bpfsys import possible_cpus
from agent.datapath.config import DatapathConfig

DEFAULT_MEMORY_RATIO = 0.005     # of the node's memory, over all the maps sized here

# the kernel's per-entry costs (kernel/bpf/hashtab.c): a bucket (hlist head + lock) per
# entry of a power-of-two table; a preallocated element is struct htab_elem (48 bytes on
# 64-bit) with the key and value 8-aligned after it (per-CPU: a pointer, and the value
# once per possible CPU). Hash maps made with BPF_F_NO_PREALLOC pay only the bucket up front.
_BUCKET = 16
_HTAB_ELEM = 48


@dataclass(frozen=True, slots=True)
class SizedMap:
    field: str                # DatapathConfig field
    flag: str                 # the agent flag that sets it (its dest)
    share: float              # of the budget
    floor: int                # never below: a node of any size must work
    preallocated: bool        # LRU maps: every entry's memory is taken when the map is made

    @property
    def tables(self) -> tuple[str, ...]:
        """bpf/maps.h tables of that size (layout.MapLayout.size)."""
        return layout.sized_by(self.field)


# Shares: the service tables are cheap up front (buckets only) but must hold the cluster;
# the LRU flow maps take their whole size at once.
SIZED = (
    SizedMap("max_frontends", "max_frontends", 0.05, 16384, False),
    SizedMap("max_slots", "max_backend_slots", 0.25, 131072, False),
    SizedMap("max_maglev_rows", "max_maglev_rows", 0.05, 32768, False),
    SizedMap("ct_max", "conntrack_max", 0.25, 32768, True),
    SizedMap("max_revnat", "max_reverse_nat", 0.20, 16384, True),
    SizedMap("max_affinity", "max_affinity", 0.10, 8192, True),
    SizedMap("max_stats", "max_stats", 0.10, 2048, True),   # per CPU
)
PER_CPU = {"bpfp_stats"}


@dataclass(frozen=True, slots=True)
class SizeFlag:
    """One of the agent's --max-* flags: a map size given by hand (a flag left out is
    derived, as SIZED says, unless it has a default); the config file's maps.<key>."""
    dest: str                 # the flag's dest: --max-reverse-nat is max_reverse_nat
    key: str                  # its field in the config file's maps: section
    help: str
    default: int | None = None

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")


# the --max-* flags, in their --help order (conntrack's size is --conntrack-max)
SIZE_FLAGS = (
    SizeFlag("max_frontends", "frontends",
             "service address:port/protocol entries, per address family"),
    SizeFlag("max_backend_slots", "backendSlots",
             "backend slots over all service ports, per address family (a pod behind two "
             "service ports takes two)"),
    SizeFlag("max_source_ranges", "sourceRanges",
             "loadBalancerSourceRanges entries over all services", default=65536),
    SizeFlag("max_maglev_rows", "maglevRows",
             "Maglev table rows (32 entries each) over all service ports"),
    SizeFlag("max_reverse_nat", "reverseNat",
             "(socket, backend) pairs of balanced sockets, per address family, that the "
             "agent's stale UDP socket sweep looks up (LRU; a socket's pairs leave with it, "
             "and replies read its own copy)"),
    SizeFlag("max_affinity", "affinity",
             "(client, service port) pairs remembered for sessionAffinity ClientIP, from "
             "inside and from outside the node (LRU)"),
    SizeFlag("max_stats", "stats",
             "service ports and backends counted (LRU: the coldest are forgotten when full)"),
)


def _aligned(size: int) -> int:
    return (size + 7) // 8 * 8


def entry_bytes(table: str, cpus: int, preallocated: bool) -> int:
    """Kernel memory one entry of `table` takes up front."""
    if not preallocated:
        return _BUCKET
    spec = layout.MAPS[table]
    key, value = _aligned(ctypes.sizeof(spec.key)), _aligned(ctypes.sizeof(spec.value))
    if table in PER_CPU:
        return _BUCKET + _HTAB_ELEM + key + 8 + value * cpus
    return _BUCKET + _HTAB_ELEM + key + value


def map_bytes(sized: SizedMap, entries: int, cpus: int) -> int:
    """Memory of every table of `sized` at `entries` (a power of two: no rounding)."""
    return sum(entries * entry_bytes(t, cpus, sized.preallocated) for t in sized.tables)


def _power_of_two_below(n: float) -> int:
    return 1 << max(0, int(n).bit_length() - 1) if n >= 1 else 1


def derive(memory_bytes: int, cpus: int, ratio: float = DEFAULT_MEMORY_RATIO) -> dict[str, int]:
    """DatapathConfig field -> entries: each map's share of memory_bytes * ratio, as a power
    of two (the kernel rounds a hash table's buckets up to one), at least its floor and at
    most the compiled-in default (bpf/maps.h)."""
    budget = memory_bytes * ratio
    ceiling = DatapathConfig()
    sizes = {}
    for sized in SIZED:
        per_entry = map_bytes(sized, 1, cpus)
        entries = _power_of_two_below(budget * sized.share / per_entry)
        sizes[sized.field] = min(max(entries, sized.floor), getattr(ceiling, sized.field))
    return sizes


def node_memory_bytes(meminfo: str = "/proc/meminfo") -> int:
    for line in Path(meminfo).read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{meminfo}: no MemTotal")


def sizes_for(args) -> dict[str, int]:
    """DatapathConfig size fields for the agent's parsed flags: a flag (or config field)
    given wins; the others are derived from this node."""
    derived = derive(node_memory_bytes(), possible_cpus(), args.map_memory_ratio)
    return {sized.field: getattr(args, sized.flag) if getattr(args, sized.flag) is not None
            else derived[sized.field] for sized in SIZED}
