"""The one part of the agent that keeps CAP_SYS_ADMIN and CAP_SYS_PTRACE after loading: a child
process that lists the network namespaces of the processes in the cgroup tree and hands over
NETLINK_SOCK_DIAG sockets created inside them (SCM_RIGHTS), and does nothing else.

Entering a pod's network namespace needs setns(2) (CAP_SYS_ADMIN) and its /proc/PID/ns/net
(CAP_SYS_PTRACE for other users' processes); the agent, which parses input and serves the
API, gives both up (agent/capabilities.py) and asks this child instead: the stale-UDP sweep
(stale_sockets.py) reads and destroys through the sockets it gets, with CAP_NET_ADMIN. The
agent starts it before its own drop. Requests and answers are JSON frames (a 4-byte length
first) on a socketpair, one at a time, each with an id. When the child dies the agent can
not start another (it no longer has the capabilities to give): every later request fails
at once with NetnsDoorClosed, logged with its exit status and counted, and a restart of the
agent (its pod) brings it back.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from agent import capabilities
from agent.datapath.stale_sockets import Netns, find_namespaces, open_diag_socket

log = logging.getLogger(__name__)

_FRAME = struct.Struct("!I")
_MAX_FRAME = 64 << 20                  # a namespace listing of a very busy node stays below
_PROC_NETNS = re.compile(r"/proc/(self|[1-9][0-9]*)/ns/net")
_START_TIMEOUT = 30.0
_PR_SET_PDEATHSIG = 1


class NetnsDoorClosed(OSError):
    """The opener is gone: no namespace can be entered until the agent restarts."""


# -- frames ------------------------------------------------------------------------------------

def _send(sock: socket.socket, message: dict, fd: int | None = None) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    frame = _FRAME.pack(len(body)) + body
    if fd is None:
        sock.sendall(frame)
        return
    sent = socket.send_fds(sock, [frame], [fd])
    if sent < len(frame):
        sock.sendall(frame[sent:])


def _receive(sock: socket.socket) -> tuple[dict, int | None]:
    """One frame and the fd that came with it; EOFError when the other side closed.
    TimeoutError only when nothing of the frame had come: a frame cut in the middle would
    leave the stream unreadable, so that is a ValueError."""
    header, fds = bytearray(), []     # filled in place: what came before a timeout
    try:
        return _receive_frame(sock, header, fds)
    except TimeoutError:
        if not header and not fds:
            raise
        raise ValueError("a frame cut by the timeout") from None


def _receive_frame(sock: socket.socket, header: bytearray, fds: list[int]
                   ) -> tuple[dict, int | None]:
    while len(header) < _FRAME.size:
        data, more_fds, _flags, _addr = socket.recv_fds(sock, _FRAME.size - len(header), 1)
        if not data:
            for fd in fds + more_fds:
                os.close(fd)
            raise EOFError
        header += data
        fds += more_fds
    (length,) = _FRAME.unpack(bytes(header))
    if length > _MAX_FRAME:
        raise ValueError(f"frame of {length} bytes")
    body = bytearray()
    while len(body) < length:
        chunk = sock.recv(min(length - len(body), 1 << 20))
        if not chunk:
            raise EOFError
        body += chunk
    for extra in fds[1:]:
        os.close(extra)
    return json.loads(body), (fds[0] if fds else None)


# -- the agent's side --------------------------------------------------------------------------

class NetnsOpener:
    """stale_sockets.NetnsDoor through the opener child. Thread-safe (one request at a time)."""

    def __init__(self, process: subprocess.Popen, sock: socket.socket) -> None:
        self.process = process
        self._sock = sock
        self._lock = threading.Lock()
        self._ids = iter(range(1, 1 << 62))
        self._closed_reason = ""
        self.failures = 0                  # requests that failed because the opener was gone

    @classmethod
    def start(cls, cgroup_dir: Path, include_own_netns: bool = True) -> NetnsOpener:
        """Start the child (with this process's capabilities: call before the drop) and wait
        until it has dropped to its own set. Raises NetnsDoorClosed when it could not."""
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [sys.executable, "-m", "agent.datapath.netns_opener", str(child_end.fileno()),
                str(cgroup_dir)] + (["--own-netns"] if include_own_netns else [])
        try:
            process = subprocess.Popen(argv, pass_fds=[child_end.fileno()],
                                       stdin=subprocess.DEVNULL)
        finally:
            child_end.close()
        opener = cls(process, parent_end)
        try:
            parent_end.settimeout(_START_TIMEOUT)
            ready, _ = _receive(parent_end)
        except (OSError, EOFError, ValueError) as exc:
            opener.close()
            raise NetnsDoorClosed(f"the netns opener did not start ({exc!r}, exit status "
                                  f"{process.poll()}); see its log line above") from exc
        log.info("event=netns_opener_started pid=%d kept=%s", process.pid, ready.get("kept"))
        return opener

    def namespaces(self) -> list[Netns]:
        reply, _ = self._call({"op": "namespaces"}, time.monotonic() + _START_TIMEOUT)
        return [Netns((dev, ino), owner, paths)
                for dev, ino, owner, paths in reply["namespaces"]]

    def diag_socket(self, netns: Netns, deadline: float) -> tuple[socket.socket, str] | None:
        reply, fd = self._call({"op": "open", "key": list(netns.key), "paths": netns.paths},
                               deadline)
        if fd is not None:
            return socket.socket(fileno=fd), reply["via"]
        if reply.get("vanished"):
            return None
        raise OSError(reply.get("errno") or 0, reply.get("error", "netns opener: no socket"))

    def _call(self, request: dict, deadline: float) -> tuple[dict, int | None]:
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError("netns opener busy")
        try:
            self._check_open()
            request["id"] = next(self._ids)
            try:
                self._sock.settimeout(None)
                _send(self._sock, request)
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("netns opener: no answer in time")
                    self._sock.settimeout(left)
                    reply, fd = _receive(self._sock)
                    if reply.get("id") == request["id"]:
                        return reply, fd
                    if fd is not None:      # the late answer to a request that timed out
                        os.close(fd)
            except TimeoutError:
                raise               # nothing of the answer came: the next call skips it by id
            except (OSError, EOFError, ValueError) as exc:
                self._fail(f"{exc!r}")
                raise NetnsDoorClosed(self._closed_reason) from exc
        finally:
            self._lock.release()

    def _check_open(self) -> None:
        if self._closed_reason:
            self.failures += 1
            raise NetnsDoorClosed(self._closed_reason)
        if self.process.poll() is not None:
            self._fail("it exited")
            raise NetnsDoorClosed(self._closed_reason)

    def _fail(self, what: str) -> None:
        self.failures += 1
        if self._closed_reason:
            return
        if self.process.poll() is None:
            self.process.kill()         # alive but unreadable: no half-working opener
        status = self.process.wait()
        self._closed_reason = (f"netns opener pid {self.process.pid} gone ({what}, exit "
                               f"status {status}): stale UDP sockets in pods are not closed "
                               f"until the agent restarts")
        log.error("event=netns_opener_gone pid=%d status=%s error=%r", self.process.pid,
                  status, what)

    def close(self) -> None:
        """End the child (it exits when its end of the socketpair closes)."""
        self._sock.close()
        try:
            self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- the child ---------------------------------------------------------------------------------

def _answer(request: dict, cgroup_dir: Path, include_own_netns: bool
            ) -> tuple[dict, socket.socket | None]:
    if request.get("op") == "namespaces":
        return {"namespaces": [[*n.key, n.owner, n.paths]
                               for n in find_namespaces(cgroup_dir, include_own_netns)]}, None
    if request.get("op") == "open":
        dev, ino = (int(x) for x in request["key"])
        paths = [str(p) for p in request["paths"]]
        # only namespace links of processes: never open() anything else (a FIFO would hang)
        if not paths or not all(_PROC_NETNS.fullmatch(p) for p in paths):
            return {"errno": 22, "error": f"not /proc/PID/ns/net paths: {paths[:3]}"}, None
        opened = open_diag_socket(Netns((dev, ino), "", paths))
        if opened is None:
            return {"vanished": True}, None
        sock, via = opened
        return {"via": via}, sock
    return {"errno": 22, "error": f"unknown request {request.get('op')!r}"}, None


def serve(sock: socket.socket, cgroup_dir: Path, include_own_netns: bool) -> None:
    """Answer requests until the agent closes its end."""
    while True:
        try:
            request, stray = _receive(sock)
        except EOFError:
            return
        if stray is not None:
            os.close(stray)
        try:
            reply, diag = _answer(request, cgroup_dir, include_own_netns)
        except OSError as exc:
            reply, diag = {"errno": exc.errno or 0, "error": str(exc)}, None
        except Exception as exc:  # noqa: BLE001 - a bad request must not end the opener
            reply, diag = {"errno": 22, "error": repr(exc)}, None
        reply["id"] = request.get("id")
        try:
            _send(sock, reply, diag.fileno() if diag is not None else None)
        finally:
            if diag is not None:
                diag.close()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s "
                        "%(message)s")
    fd, cgroup_dir = int(argv[0]), Path(argv[1])
    include_own_netns = "--own-netns" in argv[2:]
    # ends with the agent, whatever way the agent ends
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    sock = socket.socket(fileno=fd)
    try:
        kept = capabilities.drop_after_loading(capabilities.NETNS_OPENER_CAPABILITIES,
                                               who="netns-opener")
    except capabilities.DropFailed as exc:
        log.error("event=capabilities_drop_failed error=%r action=exiting", str(exc))
        return 1
    _send(sock, {"ready": True, "kept": capabilities.names(kept)})
    serve(sock, cgroup_dir, include_own_netns)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
