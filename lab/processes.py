"""Start processes inside a network namespace (and optionally a cgroup) and stop them again.
Each gets its own session, so stopping it by pid also ends what it forked; it dies with us."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from lab import netns

# Pod processes run `python -m lab.podserver` and friends from wherever they were started.
REPO_ROOT = str(Path(__file__).resolve().parent.parent)

# Our children start through fork + preexec_fn. gRPC's fork handlers (on by default in
# grpcio's core since 1.6x) restart its poller thread in the child, which then aborts
# (epoll_wait: Bad file descriptor) when the child closes its descriptors before exec. A
# test or bench process that talks gRPC (the agent's API) and starts lab processes needs
# them off; read when gRPC starts, so set before any channel or server exists.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _child_setup(cgroup: Path | None, die_with_parent: bool):
    procs = os.fsencode(cgroup / "cgroup.procs") if cgroup else None
    parent = os.getpid()

    def setup() -> None:
        # Runs in the child between fork and exec: only syscalls, no locks.
        if die_with_parent:
            # If the test process is SIGKILLed, its pod servers and agents go with it instead
            # of living on in namespaces nobody can see; cleanup_stale() then finds no one.
            _libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
            if os.getppid() != parent:
                os._exit(1)
        if procs:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

    return setup


class Processes:
    """The processes one lab started; stop_all() is safe to call more than once."""

    def __init__(self) -> None:
        self._running: list[tuple[subprocess.Popen, str]] = []
        self._lock = threading.Lock()  # tests may start clients from threads

    def start(
        self, argv: list[str], netns_name: str, cgroup: Path | None = None, owner: str = "", **kw
    ) -> subprocess.Popen:
        """Popen argv inside netns_name (and cgroup); the agent's cgroup hooks see it there.

        nsenter instead of `ip netns exec`: the latter remounts /sys and hides bpffs and cgroups.
        nsenter does not fork for a network namespace, so the Popen pid is the command's pid.
        """
        env = dict(kw.pop("env", None) or os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
        kw.setdefault("stdin", subprocess.DEVNULL)
        # The death signal follows the forking *thread*: only tie it to the main thread.
        setup = _child_setup(cgroup, threading.current_thread() is threading.main_thread())
        process = subprocess.Popen(
            [netns.nsenter(), f"--net={netns.path(netns_name)}", "--", *argv],
            env=env,
            start_new_session=True,
            preexec_fn=setup,  # noqa: PLW1509 - it makes syscalls only
            **kw,
        )
        with self._lock:
            self._running.append((process, owner))
        return process

    def run(
        self,
        argv: list[str],
        netns_name: str,
        cgroup: Path | None,
        owner: str,
        timeout: float,
        check: bool,
    ) -> subprocess.CompletedProcess:
        """start() to completion, output captured as text; stopped if it outlives timeout."""
        process = self.start(
            argv, netns_name, cgroup, owner, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        return self.finish(process, argv, timeout, check)

    def finish(
        self, process: subprocess.Popen, argv: list[str], timeout: float, check: bool
    ) -> subprocess.CompletedProcess:
        """Wait (bounded) for a started process and collect its piped output."""
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(process)
            raise
        self.forget(process)
        done = subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {stderr.strip()}")
        return done

    def stop(self, process: subprocess.Popen, grace: float = 2.0) -> None:
        """SIGTERM its process group, SIGKILL the group after grace seconds; forget it."""
        self.forget(process)
        if process.returncode is None:
            _kill_group(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while not _exited(process.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            # The leader is not reaped yet, so its pid is still the group id: whatever it
            # forked and left behind gets the SIGKILL, and nothing else can.
            _kill_group(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe:
                pipe.close()

    def forget(self, process: subprocess.Popen) -> None:
        """Stop tracking it (it has finished and been reaped, or is being stopped)."""
        with self._lock:
            self._running = [(p, o) for p, o in self._running if p is not process]

    def stop_owned_by(self, owner: str) -> None:
        with self._lock:
            owned = [p for p, o in self._running if o == owner]
        for process in owned:
            self.stop(process)

    def stop_all(self) -> None:
        with self._lock:
            everything = [p for p, _o in self._running]
        for process in everything:
            self.stop(process)


def _exited(pid: int) -> bool:
    """True once pid has exited, without reaping it (WNOWAIT keeps the pid ours)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True  # already reaped (by a result() in another thread)


def _kill_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
