"""Close connected UDP sockets whose peer is a removed backend (issue 5, point 8).

The socket LB rewrites a connected UDP socket's destination once, at connect() time. When that
backend leaves its service the socket keeps sending to it: the client is stuck on a dead
backend. kube-proxy's answer is its UDP conntrack cleanup (pkg/proxy/conntrack/cleanup.go
deletes flows whose reply source is no longer a serving endpoint); with no conntrack entry to
delete, ours is Cilium's (socket termination in its load-balancer reconciler): find the
sockets and destroy them with SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY). The owner's next
recv()/send() fails with ECONNABORTED (a recv() blocked at that moment wakes up with it) and
the socket is left unconnected, so an application that reconnects goes through connect()
again and the socket LB picks a live backend.

sock_diag only sees the sockets of the network namespace its netlink socket was created in,
and pods each have their own. So: collect the namespaces of the processes in the agent's
cgroup tree (the processes whose sockets the socket LB balances) plus the agent's own, each
once (grouped by the namespace's inode), and for each get a NETLINK_SOCK_DIAG socket created
inside it (a socket keeps the namespace it was created in). Entering a pod's namespace
needs CAP_SYS_ADMIN and CAP_SYS_PTRACE, which the agent gives up after loading: in the
agent a small child process holds them and hands the sockets over (netns_opener.py);
LocalNetns does it in this process (tests, tools). Each namespace is asked once per family
with an inet_diag bytecode filter on the removed backends, so the kernel answers only with
the sockets that matter, and SOCK_DESTROY goes to each one.

Fairness: a pod can make many network namespaces. They are swept round-robin by the cgroup
their processes were found in (one namespace of each cgroup before a second of any), and
each namespace has its own budget (netns_budget seconds) within the sweep's deadline, so
one pod cannot spend the whole sweep while another pod's client stays on a dead backend.
Only datagrams from the kernel (sender port id 0) are read: inside a pod's namespace a
process with CAP_NET_ADMIN there could send our socket forged answers.

Raw netlink rather than pyroute2's DiagSocket: the two messages are fixed-size structs, we
need SOCK_DESTROY (which DiagSocket does not send) and the exact socket id echoed back
(cookie included), and the sockets must be opened in another namespace's thread anyway.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import ipaddress
import itertools
import logging
import os
import socket
import struct
import threading
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent.model.types import Protocol
from agent.planner import BackendAddr

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Backend = tuple[IPAddress, int]

# <linux/netlink.h>, <linux/sock_diag.h>, <linux/inet_diag.h>
NETLINK_SOCK_DIAG = 4
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
CLONE_NEWNET = 0x40000000
# A connected UDP socket is in TCP_ESTABLISHED; unconnected ones (servers, sendto() clients)
# are TCP_CLOSE and have no peer. Asking only for ESTABLISHED lets the kernel skip the rest.
TCP_ESTABLISHED = 1
UDP_CONNECTED = 1 << TCP_ESTABLISHED

_NLMSGHDR = struct.Struct("=IHHII")             # len, type, flags, seq, pid
_REQ_HEAD = struct.Struct("=BBBxI")             # family, protocol, ext, pad, states
_SOCKID = struct.Struct("!HH16s16s")            # sport, dport, src, dst (network order)
_SOCKID_TAIL = struct.Struct("=III")            # ifindex, cookie[0], cookie[1] (host order)
SOCKID_LEN = _SOCKID.size + _SOCKID_TAIL.size   # 48
_MSG_HEAD = struct.Struct("=BBBB")              # family, state, timer, retrans
_MSG_TAIL = struct.Struct("=IIIII")             # expires, rqueue, wqueue, uid, inode
MSG_LEN = _MSG_HEAD.size + SOCKID_LEN + _MSG_TAIL.size   # 72: struct inet_diag_msg
_ERRNO = struct.Struct("=i")
_NLATTR = struct.Struct("=HH")                  # len, type
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_JMP = 1
INET_DIAG_BC_D_COND = 8
_BC_OP = struct.Struct("=BBH")                  # code, yes, no (jumps, in bytes)
_HOSTCOND = struct.Struct("=BBxxi")             # family, prefix_len, port (-1: any); addr
_FILTER_BACKENDS = 1024                         # 32 KiB of IPv6 conditions per dump

_DESTROY_BATCH = 64      # acks waiting in our receive buffer at most (they are tiny)
_RECV_BUFFER = 1 << 16   # a dump message is at most 32 KiB


@dataclass(frozen=True)
class UdpSocket:
    """One connected UDP socket as sock_diag reports it."""

    family: int
    src: IPAddress
    sport: int
    dst: IPAddress
    dport: int
    cookie: int          # what bpf_get_socket_cookie() returned for it in the socket LB
    inode: int
    uid: int
    raw_id: bytes = field(repr=False, compare=False)   # inet_diag_sockid, echoed back

    @property
    def peer(self) -> Backend:
        """(destination, port); an IPv4-mapped IPv6 destination as the IPv4 address."""
        return (_unmap(self.dst), self.dport)


@dataclass
class SweepResult:
    """What happened in one network namespace."""

    netns: int                     # the namespace's inode (as in `ls -l /proc/PID/ns/net`)
    owner: str = ""                # the cgroup it was found through ("" for the agent's own)
    via: str = ""                  # the /proc path it was entered through
    order: int = 0                 # when its sweep began, among this sweep's namespaces
    checked: int = 0               # connected UDP sockets the kernel's filter let through
    matched: int = 0               # peers that are removed backends (and should_destroy agreed)
    destroyed: int = 0
    gone: int = 0                  # closed or disconnected between the dump and the destroy
    failed: int = 0
    foreign: int = 0               # datagrams not from the kernel, dropped
    vanished: bool = False         # every process of it exited before we got there
    timed_out: bool = False        # its budget or the sweep's deadline ran out
    errors: list[str] = field(default_factory=list)


def destroy_udp_sockets(cgroup_dir: Path, backends: Iterable[Backend], **options) -> int:
    """sweep_udp_sockets() (same keyword options), returning how many sockets it destroyed."""
    return sum(r.destroyed for r in sweep_udp_sockets(cgroup_dir, backends, **options))


def sweep_udp_sockets(
    cgroup_dir: Path,
    backends: Iterable[Backend],
    *,
    include_own_netns: bool = True,
    should_destroy: Callable[[UdpSocket], bool] | None = None,
    timeout: float = 10.0,
    netns_budget: float = 1.0,
    workers: int = 4,
    door: NetnsDoor | None = None,
) -> list[SweepResult]:
    """Destroy every connected UDP socket, in the network namespaces of the processes in
    cgroup_dir and its descendants (and the caller's own), whose peer is one of backends
    ((address, port) pairs; strings are accepted for addresses). Returns what happened in each
    namespace, in the order their sweeps began (namespaces the deadline left untouched last).
    door lists and enters the namespaces (default: LocalNetns, this process).

    should_destroy(sock) may veto a match; the agent can pass one that keeps sockets the
    socket LB did not balance (no revnat entry for sock.cookie + sock.peer). It runs in a
    worker thread, in the caller's network namespace; an exception counts as a veto.

    Never raises for processes or namespaces that go away meanwhile, or for netlink errors
    (they are logged); returns within about `timeout` seconds, leaving namespaces it had not
    reached by then alone (logged); one namespace gets at most netns_budget seconds. Raises
    NetnsDoorClosed when the door cannot list namespaces any more. One log line per
    namespace (INFO when a socket matched or something failed, DEBUG otherwise) and one
    summary line.
    """
    wanted = frozenset(_normalise(backends))
    if not wanted:
        return []
    started = time.monotonic()
    deadline = started + timeout
    door = door if door is not None else LocalNetns(cgroup_dir, include_own_netns)
    namespaces = fair_order(door.namespaces())
    families = [socket.AF_INET6]     # IPv4 backends are also reached through mapped sockets
    if any(ip.version == 4 for ip, _ in wanted):
        families.insert(0, socket.AF_INET)
    query = _Query(tuple(families), tuple(destination_filters(wanted)), wanted,
                   should_destroy, deadline, netns_budget)

    results: list[SweepResult] = []
    begun = itertools.count(1)
    # Workers are this thread's children: they start in its network namespace. The pool
    # takes namespaces in fair order.
    pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=max(1, min(workers, len(namespaces))), thread_name_prefix="bpfp-stale-udp")
    try:
        futures = {pool.submit(lambda n=netns: _sweep(n, door, query, next(begun))): netns
                   for netns in namespaces}
        done, pending = concurrent.futures.wait(
            futures, timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        for future in done:
            netns = futures[future]
            try:
                results.append(future.result())
            except Exception as error:  # noqa: BLE001 - a bug in one sweep, not in all
                log.exception("event=stale_udp_netns_error netns=%d", netns.key[1])
                results.append(SweepResult(netns=netns.key[1], owner=netns.owner,
                                           order=len(namespaces), failed=1,
                                           errors=[repr(error)]))
        for future in pending:
            future.cancel()
            netns = futures[future]
            results.append(SweepResult(netns=netns.key[1], owner=netns.owner,
                                       order=len(namespaces) + 1, timed_out=True))
    finally:
        # Workers bound every netlink wait by the deadline; never wait for them past it.
        pool.shutdown(wait=False, cancel_futures=True)

    results.sort(key=lambda r: r.order)
    for result in results:
        _log_sweep(result)
    log.info("event=stale_udp_sockets backends=%d netns=%d destroyed=%d gone=%d failed=%d "
             "vanished=%d timed_out=%d foreign=%d ms=%.1f", len(wanted), len(results),
             sum(r.destroyed for r in results), sum(r.gone for r in results),
             sum(r.failed for r in results), sum(r.vanished for r in results),
             sum(r.timed_out for r in results), sum(r.foreign for r in results),
             (time.monotonic() - started) * 1000)
    return results


# -- which network namespaces ------------------------------------------------------------------

NetnsKey = tuple[int, int]   # (st_dev, st_ino) of the nsfs inode


@dataclass
class Netns:
    """One network namespace to sweep and the /proc paths that lead to it (several: when one
    process has exited, another still leads there)."""

    key: NetnsKey
    owner: str                     # cgroup (relative to the swept tree) it was first seen in
    paths: list[str]


class NetnsDoor(typing.Protocol):
    """Lists the namespaces to sweep and gives a sock_diag socket created in one of them."""

    def namespaces(self) -> list[Netns]: ...

    def diag_socket(self, netns: Netns, deadline: float) -> tuple[socket.socket, str] | None:
        """(socket, the path it was entered through); None when the namespace is gone."""


class LocalNetns:
    """NetnsDoor in this process: it needs CAP_SYS_ADMIN (setns) and CAP_SYS_PTRACE (other
    users' /proc/PID/ns/net) itself."""

    def __init__(self, cgroup_dir: Path, include_own_netns: bool = True) -> None:
        self.cgroup_dir = Path(cgroup_dir)
        self.include_own_netns = include_own_netns

    def namespaces(self) -> list[Netns]:
        return find_namespaces(self.cgroup_dir, self.include_own_netns)

    def diag_socket(self, netns: Netns, deadline: float) -> tuple[socket.socket, str] | None:
        return open_diag_socket(netns)


def find_namespaces(cgroup_dir: Path, include_own_netns: bool = True) -> list[Netns]:
    """The network namespaces of the processes in cgroup_dir's tree, each once, in the
    order found; the caller's own namespace first when included."""
    found: dict[NetnsKey, Netns] = {}
    if include_own_netns:
        _add(found, "/proc/self/ns/net", "")
    for owner, pid in cgroup_pids(cgroup_dir):
        _add(found, f"/proc/{pid}/ns/net", owner)
    return list(found.values())


def cgroup_pids(cgroup_dir: Path) -> Iterator[tuple[str, int]]:
    """(cgroup relative to cgroup_dir, pid) for every process in cgroup_dir's tree; cgroups
    removed meanwhile are skipped. Processes in another pid namespace than ours are listed as
    0 and skipped: the agent needs the host's pid namespace (hostPID) to see pods."""
    for dirpath, _dirs, _files in os.walk(cgroup_dir):
        try:
            with open(os.path.join(dirpath, "cgroup.procs"), "rb") as procs:
                text = procs.read()
        except OSError:
            continue      # removed while we walked, or not a cgroup
        owner = os.path.relpath(dirpath, cgroup_dir)
        for token in text.split():
            pid = int(token)
            if pid > 0:
                yield owner, pid


def _add(found: dict[NetnsKey, Netns], path: str, owner: str) -> None:
    try:
        st = os.stat(path)
    except OSError:
        return            # exited (ENOENT, ESRCH), or a zombie (its namespaces are gone)
    key = (st.st_dev, st.st_ino)
    if key in found:
        found[key].paths.append(path)
    else:
        found[key] = Netns(key, owner, [path])


def fair_order(namespaces: Iterable[Netns]) -> list[Netns]:
    """Round-robin by owner, in the order owners were first seen: the first namespace of
    every cgroup, then the second of those that have one, and so on. A pod with thousands of
    namespaces then delays another pod's by at most one of its own per round."""
    by_owner: dict[str, list[Netns]] = {}
    for netns in namespaces:
        by_owner.setdefault(netns.owner, []).append(netns)
    queues = list(by_owner.values())
    ordered = []
    for round_ in range(max((len(q) for q in queues), default=0)):
        ordered.extend(q[round_] for q in queues if round_ < len(q))
    return ordered


def open_diag_socket(netns: Netns) -> tuple[socket.socket, str] | None:
    """A NETLINK_SOCK_DIAG socket created in netns, through the first of its paths that still
    leads there; None when none does any more. Raises OSError when entering fails."""
    opened = _open_netns(netns.key, netns.paths)
    if opened is None:
        return None
    fd, via = opened
    try:
        return _diag_socket_in(fd), via
    finally:
        os.close(fd)


def _open_netns(key: NetnsKey, paths: list[str]) -> tuple[int, str] | None:
    """An fd of the namespace through the first path that still leads to it."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue      # that process exited
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == key:
            return fd, path
        os.close(fd)      # the pid was reused by a process elsewhere
    return None


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    """setns(fd, CLONE_NEWNET) for the calling thread only (os.setns from Python 3.12)."""
    if hasattr(os, "setns"):
        os.setns(fd, CLONE_NEWNET)
        return
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _diag_socket_in(netns_fd: int) -> socket.socket:
    """A NETLINK_SOCK_DIAG socket bound to the namespace of netns_fd (a socket keeps the
    namespace it was created in). This thread enters the namespace only for socket() and goes
    back at once, so nothing else (logging, should_destroy) ever runs in a pod's namespace."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(netns_fd)
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 NETLINK_SOCK_DIAG)
        except BaseException:
            _setns(home)
            raise
        try:
            _setns(home)
        except BaseException:
            sock.close()
            raise
    finally:
        os.close(home)
    return sock


# -- one namespace -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Query:
    """What every namespace's sweep is asked, built once per sweep."""

    families: tuple[int, ...]
    bytecodes: tuple[bytes, ...]   # one dump per family and bytecode
    wanted: frozenset[Backend]
    should_destroy: Callable[[UdpSocket], bool] | None
    deadline: float                # the sweep's
    netns_budget: float            # seconds for one namespace, within the deadline


def _sweep(netns: Netns, door: NetnsDoor, query: _Query, order: int) -> SweepResult:
    result = SweepResult(netns=netns.key[1], owner=netns.owner, order=order)
    deadline = min(query.deadline, time.monotonic() + query.netns_budget)
    if time.monotonic() >= deadline:
        result.timed_out = True
        return result
    try:
        opened = door.diag_socket(netns, deadline)
    except TimeoutError:
        result.timed_out = True
        return result
    except OSError as error:
        result.failed += 1
        result.errors.append(f"enter: {_errname(error)}")
        return result
    if opened is None:
        result.vanished = True
        return result
    sock, result.via = opened
    with sock:
        try:
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)   # acks without our request
            matches: list[UdpSocket] = []
            for family in query.families:
                for bytecode in query.bytecodes:
                    # an error answer ends that dump only (IPv6 disabled, say): go on
                    try:
                        for udp in dump_udp(sock, family, deadline, bytecode, result):
                            result.checked += 1
                            if udp.peer in query.wanted and _agrees(query.should_destroy,
                                                                    udp, result):
                                matches.append(udp)
                    except TimeoutError:
                        raise
                    except OSError as error:
                        result.failed += 1
                        result.errors.append(f"dump(family={family}): {_errname(error)}")
            result.matched = len(matches)
            _destroy(sock, matches, deadline, result)
        except TimeoutError:
            result.timed_out = True
        except OSError as error:
            result.failed += 1
            result.errors.append(f"netlink: {_errname(error)}")
    return result


def _agrees(should_destroy: Callable[[UdpSocket], bool] | None, udp: UdpSocket,
            result: SweepResult) -> bool:
    if should_destroy is None:
        return True
    try:
        return bool(should_destroy(udp))
    except Exception as error:  # noqa: BLE001 - a bad callback must not stop the sweep
        result.errors.append(f"should_destroy: {error!r}")
        return False


class _Seq:
    _next = int(time.time()) & 0x7FFFFFFF
    _lock = threading.Lock()

    @classmethod
    def take(cls) -> int:
        with cls._lock:
            cls._next = (cls._next + 1) & 0xFFFFFFFF
            return cls._next


def _request(msg_type: int, flags: int, seq: int, family: int, states: int,
             sockid: bytes = b"\0" * SOCKID_LEN, bytecode: bytes = b"") -> bytes:
    body = _REQ_HEAD.pack(family, socket.IPPROTO_UDP, 0, states) + sockid
    if bytecode:
        body += _NLATTR.pack(_NLATTR.size + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def destination_filters(wanted: Iterable[Backend]) -> Iterator[bytes]:
    """inet_diag bytecode that lets through only sockets whose destination is one of wanted
    (an IPv4 backend also matches an IPv4-mapped IPv6 peer: the kernel compares those),
    at most _FILTER_BACKENDS per program (its length is a u16)."""
    ordered = sorted(wanted, key=lambda b: (b[0].version, b[0].packed, b[1]))
    for start in range(0, len(ordered), _FILTER_BACKENDS):
        yield destination_filter(ordered[start:start + _FILTER_BACKENDS])


def destination_filter(backends: list[Backend]) -> bytes:
    """c1 JMP c2 JMP ... cN, as `ss` compiles an OR: a true condition goes on to its JMP,
    which jumps to the end (accept); a false one skips its JMP to the next condition; the
    last one, false, jumps 4 bytes past the end (reject). Built from the end backwards."""
    program = b""
    for index, (address, port) in enumerate(reversed(backends)):
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        cond = _HOSTCOND.pack(family, address.max_prefixlen, port) + address.packed
        size = _BC_OP.size + len(cond)
        if index:    # not the last condition: a JMP to the end follows it
            program = _BC_OP.pack(INET_DIAG_BC_JMP, 4, 4 + len(program)) + program
        program = _BC_OP.pack(INET_DIAG_BC_D_COND, size, size + 4) + cond + program
    return program


def dump_udp(sock: socket.socket, family: int, deadline: float, bytecode: bytes = b"",
             result: SweepResult | None = None) -> Iterator[UdpSocket]:
    """Every connected UDP socket of family in the netlink socket's namespace that bytecode
    (destination_filter(); none: every one) lets through."""
    seq = _Seq.take()
    sock.sendall(_request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, family,
                          UDP_CONNECTED, bytecode=bytecode))
    while True:
        for msg_type, flags, msg_seq, payload in _receive(sock, deadline, result):
            if msg_seq != seq:
                continue          # a late answer to something else
            if msg_type == NLMSG_DONE:
                if flags & NLM_F_DUMP_INTR:
                    log.debug("event=stale_udp_dump_interrupted family=%d", family)
                return
            if msg_type == NLMSG_ERROR:
                code = _ERRNO.unpack_from(payload)[0]
                if code:
                    raise OSError(-code, os.strerror(-code))
                continue
            if msg_type == SOCK_DIAG_BY_FAMILY and len(payload) >= MSG_LEN:
                yield parse_diag_msg(payload)


def parse_diag_msg(payload: bytes) -> UdpSocket:
    """struct inet_diag_msg -> UdpSocket."""
    family, _state, _timer, _retrans = _MSG_HEAD.unpack_from(payload)
    raw_id = bytes(payload[_MSG_HEAD.size:_MSG_HEAD.size + SOCKID_LEN])
    sport, dport, src, dst = _SOCKID.unpack_from(raw_id)
    _ifindex, cookie_lo, cookie_hi = _SOCKID_TAIL.unpack_from(raw_id, _SOCKID.size)
    *_rest, uid, inode = _MSG_TAIL.unpack_from(payload, _MSG_HEAD.size + SOCKID_LEN)
    if family == socket.AF_INET:
        src_ip: IPAddress = ipaddress.IPv4Address(src[:4])
        dst_ip: IPAddress = ipaddress.IPv4Address(dst[:4])
    else:
        src_ip, dst_ip = ipaddress.IPv6Address(src), ipaddress.IPv6Address(dst)
    return UdpSocket(family=family, src=src_ip, sport=sport, dst=dst_ip, dport=dport,
                     cookie=cookie_lo | (cookie_hi << 32), inode=inode, uid=uid, raw_id=raw_id)


def _destroy(sock: socket.socket, matches: list[UdpSocket], deadline: float,
             result: SweepResult) -> None:
    """SOCK_DESTROY each match by its exact id (addresses, ports, cookie), in batches: send a
    batch, then collect its acks."""
    for start in range(0, len(matches), _DESTROY_BATCH):
        waiting: dict[int, UdpSocket] = {}
        for udp in matches[start:start + _DESTROY_BATCH]:
            seq = _Seq.take()
            sock.sendall(_request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, udp.family,
                                  UDP_CONNECTED, udp.raw_id))
            waiting[seq] = udp
        while waiting:
            for msg_type, _flags, seq, payload in _receive(sock, deadline, result):
                if msg_type != NLMSG_ERROR or seq not in waiting:
                    continue
                udp = waiting.pop(seq)
                code = -_ERRNO.unpack_from(payload)[0]
                if code == 0:
                    result.destroyed += 1
                    log.debug("event=udp_socket_destroyed netns=%d src=%s:%d dst=%s:%d "
                              "cookie=%d", result.netns, udp.src, udp.sport, udp.dst,
                              udp.dport, udp.cookie)
                elif code == errno.ENOENT:
                    result.gone += 1        # closed or disconnected since the dump
                else:
                    result.failed += 1
                    result.errors.append(f"destroy: {errno.errorcode.get(code, code)}")


def _receive(sock: socket.socket, deadline: float, result: SweepResult | None = None
             ) -> Iterator[tuple[int, int, int, bytes]]:
    """The netlink messages of one datagram from the kernel: (type, flags, seq, payload)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline")
    sock.settimeout(left)
    data, sender = sock.recvfrom(_RECV_BUFFER)     # TimeoutError past the deadline
    messages = kernel_messages(data, sender)
    if messages is None and result is not None:
        result.foreign += 1
    return iter(messages or ())


def kernel_messages(data: bytes, sender: tuple[int, int]
                    ) -> list[tuple[int, int, int, bytes]] | None:
    """(type, flags, seq, payload) of each netlink message in a datagram, or None when the
    datagram is not the kernel's. The sender's port id (sockaddr_nl.nl_pid, which the kernel
    fills in and a sender cannot choose) is 0 only for the kernel: inside a pod's namespace a
    process with CAP_NET_ADMIN could send our socket forged answers. (Each message's own
    nlmsg_pid is the sender's to write, and the kernel sets it to our port id.)"""
    if sender[0] != 0:
        return None
    messages = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        messages.append((msg_type, flags, seq, data[offset + _NLMSGHDR.size:offset + length]))
        offset += (length + 3) & ~3
    return messages


# -- helpers -----------------------------------------------------------------------------------

def _unmap(ip: IPAddress) -> IPAddress:
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _normalise(backends: Iterable[Backend]) -> set[Backend]:
    wanted = set()
    for address, port in backends:
        port = int(port)
        if not 0 < port < 65536:
            raise ValueError(f"backend port {port} out of range")
        wanted.add((_unmap(ipaddress.ip_address(address)), port))
    return wanted


def _errname(error: OSError) -> str:
    return errno.errorcode.get(error.errno or 0, str(error))


def _log_sweep(result: SweepResult) -> None:
    level = logging.INFO if (result.matched or result.failed or result.timed_out
                             or result.foreign) else logging.DEBUG
    log.log(level, "event=stale_udp_netns netns=%d owner=%s via=%s checked=%d matched=%d "
            "destroyed=%d gone=%d failed=%d foreign=%d vanished=%s timed_out=%s errors=%s",
            result.netns, result.owner or "-", result.via or "-", result.checked,
            result.matched, result.destroyed, result.gone, result.failed, result.foreign,
            result.vanished, result.timed_out, ",".join(result.errors) or "-")


def udp_cleanup_for(cgroup_dir: Path, maps, door: NetnsDoor | None = None) -> Callable:
    """The agent's udp_cleanup: close connected UDP sockets whose peer is a removed backend,
    but only those the socket LB balanced to it for a service that no longer has it (the
    reverse NAT entry of the socket's cookie names the service, as Cilium checks), so a
    pod's own connection to another pod, or one through a service that still has the
    backend, is left alone."""
    def cleanup(removed, still_served) -> int:
        def should_destroy(sock: UdpSocket) -> bool:
            peer = sock.dst
            if peer.version == 6 and peer.ipv4_mapped:
                peer = peer.ipv4_mapped
            backend = BackendAddr(peer, sock.dport)
            frontend = maps.socket_service(sock.cookie, backend, Protocol.UDP)
            return frontend is not None and not still_served(frontend, backend)
        return destroy_udp_sockets(cgroup_dir, [(b.address, b.port) for b in removed],
                                   should_destroy=should_destroy, door=door)
    return cleanup
