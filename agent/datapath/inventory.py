"""Read-only kernel reads for the API, metrics and health: pinned maps' occupancy, which of
our programs are attached where, and the per-CPU counters summed. Never writes anything.

Callers run these in a thread (each is one or a few bpf(2) calls per 4096 entries); an
Inventory caches answers for a second so probes, scrapes and clients do not repeat work."""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TypeVar

from agent.datapath import bpfsys, layout
from agent.datapath.bpfsys import PER_CPU_MAP_TYPES, AttachType, possible_cpus
from agent.datapath.programs import SOCKET_PROGRAMS, TC_PROGRAMS, XDP_PROGRAM
from agent.planner import BackendAddr

T = TypeVar("T")

log = logging.getLogger(__name__)

# enum bpf_map_type (uapi/linux/bpf.h), the ones a reader may meet
MAP_TYPES = {1: "hash", 2: "array", 3: "prog_array", 4: "perf_event_array", 5: "percpu_hash",
             6: "percpu_array", 9: "lru_hash", 10: "lru_percpu_hash", 11: "lpm_trie",
             12: "array_of_maps", 13: "hash_of_maps", 24: "sk_storage", 27: "ringbuf"}
_SK_STORAGE = 24
_TC_INGRESS_PARENT, _TC_EGRESS_PARENT = 0xFFFFFFF2, 0xFFFFFFF3   # clsact's two qdisc parents


# ---- maps ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MapUsage:
    name: str            # the pin name, e.g. bpfp_svc4_v1
    type: str
    entries: int
    max_entries: int
    memory_bytes: int    # kernel memory the map holds (fdinfo memlock), whatever is in it


def _value_bytes(info: dict[str, int], cpus: int) -> int:
    """What one entry's value takes in a lookup buffer (per-CPU: 8-aligned, times CPUs)."""
    if info["type"] in PER_CPU_MAP_TYPES:
        return (info["value_size"] + 7) // 8 * 8 * cpus
    return info["value_size"]


def iterate(fd: int, info: dict[str, int], cpus: int):
    """(keys buffer, values buffer, count) per batch of a map (bpfsys.raw_batches); maps
    without batch lookup (arrays of maps, ...) raise OSError(EINVAL/ENOTSUPP)."""
    return bpfsys.raw_batches(fd, info["key_size"], _value_bytes(info, cpus),
                              f"map {info['id']}")


def count_entries(fd: int, info: dict[str, int], cpus: int) -> int:
    if info["type"] in (2, 6):                 # arrays: every index exists
        return info["max_entries"]
    if info["type"] == _SK_STORAGE:            # lives in each socket: nothing to walk here
        return 0
    try:
        return sum(count for _, _, count in iterate(fd, info, cpus))
    except OSError as exc:
        if exc.errno not in bpfsys.NO_BATCH:
            raise
    # no batch ops for this map type: walk the keys one by one
    return len(bpfsys.map_keys(fd, ctypes.c_char * info["key_size"]))


def map_memory(fd: int) -> int:
    """The kernel's account of a map's memory (fdinfo memlock: since 6.4 what the map
    really holds, preallocated elements included); 0 when the kernel does not say."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("memlock:"):
                return int(line.split()[1])
    return 0


def map_usage(pin_dir: Path, uncounted: Container[str] = ()) -> list[MapUsage]:
    """Every map pinned under pin_dir (bpfp_*), with its entries counted now; those pinned
    as a name in uncounted are not walked (entries -1: the caller knows them)."""
    cpus = possible_cpus()
    usage = []
    for pin in sorted(pin_dir.glob("bpfp_*")):
        fd = bpfsys.obj_get(str(pin))
        try:
            info = bpfsys.map_info(fd)
            entries = -1 if pin.name in uncounted else count_entries(fd, info, cpus)
            usage.append(MapUsage(pin.name, MAP_TYPES.get(info["type"], str(info["type"])),
                                  entries, info["max_entries"], map_memory(fd)))
        finally:
            os.close(fd)
    return usage


# ---- counters --------------------------------------------------------------------------

@dataclass(slots=True)
class Counters:
    """bpf/maps.h struct stats_value, summed over CPUs (and over svc_ids by callers)."""
    connections: int = 0
    packets: int = 0
    bytes: int = 0
    refused: int = 0
    dropped: int = 0

    def add(self, other: Counters) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


# (svc_id, backend) -> counters; backend None: the service port's own entry
StatsTable = dict[tuple[int, BackendAddr | None], Counters]


def _stats_backend(key: layout.StatsKey) -> BackendAddr | None:
    raw = bytes(key.addr)
    if key.port == 0 and raw == bytes(16):
        return None
    address = ipaddress.ip_address(raw[:4] if key.family == 4 else raw)
    return BackendAddr(address, socket.ntohs(key.port))


def read_stats(pin_dir: Path) -> StatsTable:
    """bpfp_stats (LRU per-CPU hash), each entry summed over the possible CPUs."""
    spec = layout.MAPS["bpfp_stats"]
    fd = bpfsys.obj_get(str(pin_dir / spec.pin))
    try:
        info = bpfsys.map_info(fd)
        if (info["key_size"], info["value_size"]) != (ctypes.sizeof(spec.key),
                                                      ctypes.sizeof(spec.value)):
            raise OSError(errno.EINVAL, f"{spec.pin}: key/value {info['key_size']}/"
                                        f"{info['value_size']} bytes, this agent reads "
                                        f"{ctypes.sizeof(spec.key)}/{ctypes.sizeof(spec.value)}")
        cpus = possible_cpus()
        width = len(spec.value._fields_)
        step = _value_bytes(info, cpus) // 8          # u64 words per entry
        table: StatsTable = {}
        for keys, values, count in iterate(fd, info, cpus):
            key_array = (spec.key * count).from_buffer(keys)
            words = memoryview(values).cast("B").cast("Q")
            for i in range(count):
                sums = [sum(words[i * step + cpu * width + f] for cpu in range(cpus))
                        for f in range(width)]
                entry = (key_array[i].svc_id, _stats_backend(key_array[i]))
                table.setdefault(entry, Counters()).add(Counters(*sums))
        return table
    finally:
        os.close(fd)


# ---- programs --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Attachment:
    name: str            # function in bpf/*.c ("" when none of ours is where expected)
    hook: str
    target: str          # cgroup directory or interface
    attached: bool
    program_id: int = 0
    required: bool = True  # health fails while a required one is missing
    fallback: str = ""     # not attached on purpose, and why (best-effort XDP: TC serves)

    @property
    def state(self) -> str:
        """attached, fallback (not attached on purpose, see fallback) or missing."""
        return "attached" if self.attached else "fallback" if self.fallback else "missing"


def pinned_link_programs(pin_dir: Path) -> dict[int, str]:
    """Program id -> function of each link the loader pinned (links/<function> for the socket
    hooks, links/tc-<ifname>-<hook> for tcx, links/xdp-<ifname>). Naming a program from its id needs
    CAP_SYS_ADMIN (BPF_PROG_GET_FD_BY_ID), which the running agent has given up; a pinned
    link's info gives its program's id with CAP_BPF."""
    tc_functions = {"ingress" if hook is AttachType.TCX_INGRESS else "egress": func
                    for func, hook in TC_PROGRAMS}
    found = {}
    links = Path(pin_dir) / "links"
    for link in sorted(links.iterdir()) if links.is_dir() else ():
        func = (tc_functions.get(link.name.rsplit("-", 1)[-1], "")
                if link.name.startswith("tc-") else
                XDP_PROGRAM if link.name.startswith("xdp-") else link.name)
        try:
            fd = bpfsys.obj_get(str(link))
        except OSError:
            continue                                   # unpinned meanwhile
        try:
            if func:
                found[bpfsys.link_program_id(fd)] = func
        except OSError:
            continue
        finally:
            os.close(fd)
    return found


def _program_name(prog_id: int, pinned: dict[int, str]) -> str:
    """The kernel's 15 characters of the program's name."""
    return pinned[prog_id][:15] if prog_id in pinned else bpfsys.program_name(prog_id)


def socket_programs(cgroup_dir: Path, pinned: dict[int, str] | None = None
                    ) -> list[Attachment]:
    """Each socket LB hook on the cgroup: attached (with its program id) or missing."""
    out = []
    for func, hook in SOCKET_PROGRAMS:
        found = [pid for pid in bpfsys.cgroup_program_ids(str(cgroup_dir), hook)
                 if _program_name(pid, pinned or {}) == func[:15]]   # the kernel keeps 15
        out.append(Attachment(func, hook.name, str(cgroup_dir), bool(found),
                              found[0] if found else 0))
    return out


def _tcx_programs(ifname: str, ifindex: int, pinned: dict[int, str]) -> list[Attachment]:
    out = []
    for attach_type, direction in ((AttachType.TCX_INGRESS, "ingress"),
                                   (AttachType.TCX_EGRESS, "egress")):
        try:
            ids = bpfsys.program_ids(ifindex, attach_type)   # tcx: the interface's index
        except OSError:
            continue                                   # no tcx on this kernel/interface
        for pid in ids:
            name = _program_name(pid, pinned)
            if name.startswith("bpfp_"):
                out.append(Attachment(name, f"tcx {direction}", ifname, True, pid))
    return out


def _clsact_programs(ifname: str, ifindex: int) -> list[Attachment]:
    from pyroute2 import IPRoute  # only the datapath imports pyroute2
    out = []
    with IPRoute() as ipr:
        for parent, direction in ((_TC_INGRESS_PARENT, "ingress"),
                                  (_TC_EGRESS_PARENT, "egress")):
            try:
                filters = ipr.get_filters(index=ifindex, parent=parent)
            except Exception:          # no clsact qdisc: nothing attached that way
                continue
            for f in filters:
                options = f.get_attr("TCA_OPTIONS")
                if f.get_attr("TCA_KIND") != "bpf" or options is None:
                    continue
                name = (options.get_attr("TCA_BPF_NAME") or "").split(":")[0]
                pid = options.get_attr("TCA_BPF_ID") or 0
                if name.startswith("bpfp_"):
                    out.append(Attachment(name, f"tc {direction}", ifname, True, pid))
    return out


def tc_programs(interfaces: Sequence[str], pinned: dict[int, str] | None = None
                ) -> list[Attachment]:
    """Our TC programs (tcx links or clsact filters named bpfp_*) on each interface; an
    interface with none of ours gives one Attachment(attached=False). The TC datapath
    plugs in here: any attach style it picks is found by program name."""
    out = []
    for ifname in interfaces:
        try:
            ifindex = socket.if_nametoindex(ifname)
        except OSError:
            out.append(Attachment("", "tc", ifname, False))
            continue
        found = _tcx_programs(ifname, ifindex, pinned or {}) + _clsact_programs(ifname,
                                                                              ifindex)
        out.extend(found or [Attachment("", "tc", ifname, False)])
    return out


def xdp_programs(interfaces: Sequence[str], pin_dir: Path, acceleration: str,
                 fallback: Mapping[str, str] | None = None) -> list[Attachment]:
    """--acceleration: the XDP program on each interface, found by its pinned link
    (links/xdp-<ifname>, on that device). An interface the loader left to TC under
    best-effort (fallback: interface -> why) is shown as that, not as missing; neither
    is a health failure under best-effort (the TC programs serve either way)."""
    if acceleration == "disabled":
        return []
    out = []
    for ifname in interfaces:
        program_id = 0
        try:
            ifindex = socket.if_nametoindex(ifname)
            fd = bpfsys.obj_get(str(Path(pin_dir) / "links" / f"xdp-{ifname}"))
            try:
                if bpfsys.link_ifindex(fd) == ifindex:
                    program_id = bpfsys.link_program_id(fd)
            finally:
                os.close(fd)
        except OSError:
            pass                                       # no interface, or no link
        if program_id:
            out.append(Attachment(XDP_PROGRAM, "xdp", ifname, True, program_id))
        elif acceleration == "best-effort" and ifname in (fallback or {}):
            out.append(Attachment(XDP_PROGRAM, "xdp", ifname, False, required=False,
                                  fallback=f"the TC programs handle {ifname} (--acceleration "
                                           f"best-effort fell back: {fallback[ifname]})"))
        else:
            out.append(Attachment(XDP_PROGRAM, "xdp", ifname, False,
                                  required=acceleration == "native"))
    return out


def acceleration_states(acceleration: str, programs: Sequence[Attachment]
                        ) -> list[tuple[str, str]]:
    """(interface, state) for each XDP entry: xdp (attached), tc_fallback or missing."""
    names = {"attached": "xdp", "fallback": "tc_fallback", "missing": "missing"}
    return [(a.target, names[a.state]) for a in programs
            if acceleration != "disabled" and a.hook == "xdp"]


# ---- the programs' own counters ---------------------------------------------------------

# per-CPU arrays of u64 counters: (program, map, slot names)
EVENT_MAPS = (("socket", "bpfp_sock_events", layout.SOCK_EVENTS),
              ("tc", "bpfp_tc_events", layout.TC_EVENTS))


def read_events(pin_dir: Path) -> dict[tuple[str, str], int]:
    """(program, event) -> count since the maps were made, summed over the CPUs: what the
    programs did that no service counter shows (bpf/maps.h BPFP_SOCKEV_*, BPFP_TCEV_*). A
    map not pinned (an older agent's pins) reads as nothing."""
    cpus = possible_cpus()
    out: dict[tuple[str, str], int] = {}
    for program, table, names in EVENT_MAPS:
        path = pin_dir / layout.MAPS[table].pin
        if not path.exists():
            continue
        fd = bpfsys.obj_get(str(path))
        try:
            for slot, name in enumerate(names):
                values = (ctypes.c_uint64 * cpus)()
                found = bpfsys.map_lookup(fd, ctypes.c_uint32(slot), values)
                out[program, name] = sum(values) if found else 0
        finally:
            os.close(fd)
    return out


# ---- the cached door -------------------------------------------------------------------

class Inventory:
    """The node's kernel state for readers; programs and maps cached for max_age seconds
    (probes and scrapes come often). Thread-safe: the API reads in its threads, metrics
    in its HTTP thread."""

    def __init__(self, pin_dir: Path, cgroup_dir: Path, interfaces: Sequence[str] = (),
                 max_age: float = 1.0, expect_tc: bool = False,
                 acceleration: str = "disabled",
                 xdp_fallback: Mapping[str, str] | None = None) -> None:
        self.pin_dir = pin_dir
        self.acceleration = acceleration
        self.xdp_fallback = dict(xdp_fallback or {})
        self.cgroup_dir = cgroup_dir
        self.interfaces = tuple(interfaces)
        self.expect_tc = expect_tc and bool(self.interfaces)
        self.max_age = max_age
        self.read_errors = 0
        # one lock per kind: a health probe (programs) never waits behind a walk of every
        # map's entries (maps), which takes long with full flow tables
        self._locks = {"programs": threading.Lock(), "maps": threading.Lock(),
                       "maps_uncounted": threading.Lock()}
        self._cache: dict[str, tuple[float, object]] = {}

    def _cached(self, kind: str, read: Callable[[], object]):
        with self._locks[kind]:
            hit = self._cache.get(kind)
            if hit is not None and time.monotonic() - hit[0] < self.max_age:
                return hit[1]
            value = self._read(kind, read)
            self._cache[kind] = (time.monotonic(), value)
            return value

    def _read(self, what: str, read: Callable[[], T]) -> T:
        """read(); a failure is counted (read_errors) and logged, then raised."""
        try:
            return read()
        except OSError as exc:
            self.read_errors += 1
            log.warning("event=kernel_read_failed what=%s error=%r", what, str(exc))
            raise

    def programs(self) -> list[Attachment]:
        def read() -> list[Attachment]:
            pinned = pinned_link_programs(self.pin_dir)
            return socket_programs(self.cgroup_dir, pinned) + (
                tc_programs(self.interfaces, pinned) if self.expect_tc else []) + (
                xdp_programs(self.interfaces, self.pin_dir, self.acceleration,
                             self.xdp_fallback) if self.expect_tc else [])
        return self._cached("programs", read)

    def maps(self, known: Mapping[str, int] | None = None) -> list[MapUsage]:
        """known: entries of maps the caller keeps the count of, by pin name (the maps
        only the agent writes: Observed.map_entries); those are not walked. The others'
        entries (the LRU flow, NAT, affinity and counter maps, which the programs write)
        are counted in the kernel."""
        if not known:
            return self._cached("maps", lambda: map_usage(self.pin_dir))
        pins = frozenset(known)
        found = self._cached("maps_uncounted", lambda: map_usage(self.pin_dir, pins))
        return [replace(m, entries=known[m.name]) if m.entries < 0 and m.name in known
                else m for m in found]

    def events(self) -> dict[tuple[str, str], int]:
        """The programs' own counters (read_events); never cached, a few syscalls."""
        return self._read("events", lambda: read_events(self.pin_dir))

    def stats(self) -> StatsTable:
        """Never cached: whoever asks right after sending traffic must see it counted."""
        return self._read("stats", lambda: read_stats(self.pin_dir))

    def programs_attached(self) -> tuple[bool, str]:
        """(all expected programs attached, what is missing) for health."""
        try:
            missing = [f"{a.name or 'bpfp_*'} at {a.hook} on {a.target}"
                       for a in self.programs() if a.required and not a.attached]
        except OSError as exc:
            return False, f"cannot query programs: {exc}"
        return not missing, ", ".join(missing)
