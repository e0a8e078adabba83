"""Linux capabilities of the agent: once the loader child has compiled, pinned and attached,
the agent keeps only AGENT_CAPABILITIES (README "Security") and can never regain the others.

capset(2) and the bounding set are per thread: drop_to() changes the calling thread and
every thread it starts afterwards, so the agent calls it before any other thread exists
and other_threads_with_more() checks that none escaped."""
from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

# <linux/capability.h>: the capabilities this module names
CAP_DAC_OVERRIDE = 1
CAP_SETPCAP = 8
CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
CAP_PERFMON = 38
CAP_BPF = 39
NAMES = {CAP_DAC_OVERRIDE: "CAP_DAC_OVERRIDE", CAP_SETPCAP: "CAP_SETPCAP",
         CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE", CAP_NET_ADMIN: "CAP_NET_ADMIN",
         CAP_NET_RAW: "CAP_NET_RAW", CAP_SYS_PTRACE: "CAP_SYS_PTRACE",
         CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_SYS_RESOURCE: "CAP_SYS_RESOURCE",
         CAP_PERFMON: "CAP_PERFMON", CAP_BPF: "CAP_BPF"}

# What the running agent needs, found by running it without each (tests/integration/
# test_security.py); program loading and attaching happen before, in the loader child.
AGENT_CAPABILITIES = frozenset({
    CAP_BPF,          # bpf(2) on the pinned maps and links (unprivileged_bpf_disabled)
    CAP_NET_ADMIN,    # SOCK_DESTROY of stale UDP sockets (sock_diag checks it), and
                      # BPF_PROG_QUERY of the hooks for the API and health
})
# What the netns opener child keeps (agent/datapath/netns_opener.py), and nothing else:
# the agent itself parses input and serves the API without them.
NETNS_OPENER_CAPABILITIES = frozenset({
    CAP_SYS_ADMIN,    # setns() into pods' network namespaces
    CAP_SYS_PTRACE,   # /proc/<pid>/ns/net of pod processes (other users, or more caps)
})
# What the container needs at start (manifests/daemonset.yaml): the loader child compiles,
# loads and attaches with CAP_SYS_ADMIN (which also covers CAP_BPF, CAP_NET_ADMIN's attach
# checks and CAP_PERFMON's verifier checks on Linux 5.8+); CAP_SETPCAP lets the agent and
# the opener empty their bounding sets when they drop.
CONTAINER_CAPABILITIES = AGENT_CAPABILITIES | NETNS_OPENER_CAPABILITIES | {CAP_SETPCAP}

_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


def name(cap: int) -> str:
    return NAMES.get(cap, f"cap{cap}")


def names(caps) -> str:
    return ",".join(name(c) for c in sorted(caps)) or "none"


def last_cap() -> int:
    return int(Path("/proc/sys/kernel/cap_last_cap").read_text())


def from_mask(mask: int) -> frozenset[int]:
    return frozenset(bit for bit in range(64) if mask >> bit & 1)


def of_task(status_path: str | Path = "/proc/thread-self/status",
            field: str = "CapEff") -> frozenset[int]:
    """One set (CapEff, CapPrm, CapInh, CapBnd, CapAmb) of a task, from its status file."""
    for line in Path(status_path).read_text().splitlines():
        if line.startswith(field + ":"):
            return from_mask(int(line.split()[1], 16))
    raise ValueError(f"{status_path}: no {field} line")


def _prctl(option: int, arg: int = 0, arg3: int = 0) -> int:
    ret = _libc.prctl(option, arg, arg3, 0, 0)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {arg}): {os.strerror(err)}")
    return ret


def _mask_words(caps) -> tuple[int, int]:
    mask = sum(1 << c for c in caps)
    return mask & 0xFFFFFFFF, mask >> 32


def drop_to(keep) -> frozenset[int]:
    """Keep at most `keep` in this thread (and the threads it starts later): the others
    leave the effective, permitted, inheritable, ambient and bounding sets, and no exec can
    bring them back. Never adds one. Returns the effective set now."""
    keep = frozenset(keep)
    permitted = of_task(field="CapPrm")
    bounding = of_task(field="CapBnd")
    if CAP_SETPCAP in of_task(field="CapEff"):
        for cap in sorted(bounding - keep):
            _prctl(_PR_CAPBSET_DROP, cap)
    elif bounding - keep:
        # a root child's exec would regain the bounding set; no_new_privs below still caps
        # it at what we keep
        log.warning("event=capabilities_bounding_kept reason=no_CAP_SETPCAP caps=%s",
                    names(bounding - keep))
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    low, high = _mask_words(permitted & keep)
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)(_Data(low, low, 0), _Data(high, high, 0))
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    return of_task()


def other_threads_with_more(allowed) -> dict[int, frozenset[int]]:
    """Threads of this process whose effective set exceeds `allowed` (tid -> the extra)."""
    extra = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            caps = of_task(task / "status")
        except (OSError, ValueError):
            continue       # the thread ended meanwhile
        if caps - frozenset(allowed):
            extra[int(task.name)] = caps - frozenset(allowed)
    return extra


class DropFailed(RuntimeError):
    """The capabilities could not be dropped: the process must not go on with them."""


def drop_after_loading(keep=None, who: str = "agent",
                       binder: PortBinder | None = None) -> frozenset[int]:
    """The agent's drop (keep: AGENT_CAPABILITIES): log what it keeps. A failed drop, or a
    thread that kept more, raises DropFailed: running on with every capability the
    container gave (CAP_SYS_ADMIN among them) is worse than not running. The binder's
    thread alone may keep CAP_NET_BIND_SERVICE besides, until it is closed."""
    keep = AGENT_CAPABILITIES if keep is None else frozenset(keep)
    before = of_task()
    try:
        now = drop_to(keep)
    except OSError as exc:
        raise DropFailed(f"{who}: dropping capabilities to {names(keep)} failed: {exc}; "
                         f"it still has {names(before)} and stops") from exc
    leaked = other_threads_with_more(now)
    if binder is not None and leaked.get(binder.tid, frozenset()) <= {CAP_NET_BIND_SERVICE}:
        leaked.pop(binder.tid, None)
    if leaked:
        raise DropFailed(f"{who}: threads {sorted(leaked)} kept capabilities "
                         f"{names(frozenset().union(*leaked.values()))} after the drop "
                         f"(started before it); it stops")
    missing = keep - now
    log.info("event=capabilities_dropped who=%s kept=%s dropped=%d", who, names(now),
             len(before - now))
    if missing:
        log.warning("event=capabilities_missing who=%s caps=%s hint=%r", who, names(missing),
                    "started without them: stale UDP socket cleanup or map writes may fail")
    return now


# --- listening below 1024 ------------------------------------------------------------------

def needs_bind_service(ports: Iterable[int],
                       sysctl: Path = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
                       ) -> bool:
    """Whether binding one of these ports takes CAP_NET_BIND_SERVICE in this namespace."""
    try:
        first_free = int(sysctl.read_text())
    except (OSError, ValueError):
        first_free = 1024
    return any(0 < port < first_free for port in ports)


class PortBinder:
    """The one thread that keeps CAP_NET_BIND_SERVICE past the agent's drop, to bind the
    API, metrics and health ports below 1024 the flags ask for; close() ends it.

    Capabilities are per thread and a thread starts with its creator's: started before the
    drop, this thread drops to the agent's set plus CAP_NET_BIND_SERVICE, so the threads the
    agent starts later (gRPC's, the HTTP servers') never hold it. Only binding runs here;
    a server's threads are started from the caller's thread."""

    def __init__(self, keep=None) -> None:
        keep = AGENT_CAPABILITIES if keep is None else frozenset(keep)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="bind")
        try:
            self.tid, now = self._thread.submit(self._drop, keep).result()
        except OSError as exc:
            self._thread.shutdown()
            raise DropFailed(f"port binder: dropping capabilities failed: {exc}") from exc
        if CAP_NET_BIND_SERVICE not in now:
            log.warning("event=capabilities_missing who=port_binder caps=%s hint=%r",
                        name(CAP_NET_BIND_SERVICE), "started without it: ports below 1024 "
                        "cannot be bound; give the container NET_BIND_SERVICE")

    @staticmethod
    def _drop(keep: frozenset[int]) -> tuple[int, frozenset[int]]:
        return threading.get_native_id(), drop_to(keep | {CAP_NET_BIND_SERVICE})

    def run(self, bind: Callable, *args):
        """bind(*args) in the binder's thread; its result, or its exception."""
        return self._thread.submit(bind, *args).result()

    def close(self) -> None:
        """The thread ends, and CAP_NET_BIND_SERVICE with it."""
        self._thread.shutdown(wait=True)
