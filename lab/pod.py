"""A pod of the lab: its own network namespace (eth0 on the node's bridge, IPv4 and IPv6) and
cgroup v2 dir. Commands run in both, so the agent's cgroup socket hooks see them as the pod's
traffic."""

from __future__ import annotations

import itertools
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab.podclient import ClientResult, Requests
from lab.processes import Processes

_client_numbers = itertools.count(1)


@dataclass(frozen=True)
class PodHome:
    """What a pod uses of the lab (or cluster) it lives in, and nothing more."""

    name: str  # the lab's
    processes: Processes  # where the pod's commands are started, and stopped on teardown
    workdir: Path  # for server logs and client stop files


@dataclass(eq=False)
class Pod:
    """Made by Lab.add_pod(); the lab removes it (remove_pod or on exit)."""

    lab: PodHome
    name: str
    ip: str
    ip6: str  # the pod's IPv6 address (the lab is dual-stack); servers answer on both
    netns: str  # bpfp-LAB-POD
    cgroup: Path  # <cgroup2 mount>/bpfp-LAB/POD
    node_veth: str  # the bridge port in the node namespace
    servers: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Start argv in this pod's netns and cgroup; the lab stops it on teardown."""
        return self.lab.processes.start(argv, self.netns, self.cgroup, owner=self.name, **kw)

    def run(
        self, argv: list[str], timeout: float = 30.0, check: bool = False
    ) -> subprocess.CompletedProcess:
        """Run argv in the pod to completion; stdout and stderr are captured as text."""
        return self.lab.processes.run(argv, self.netns, self.cgroup, self.name, timeout, check)

    def start_server(
        self, ports: list[int], udp: bool = False, name: str | None = None, timeout: float = 10.0,
        peer: bool = False,
    ) -> subprocess.Popen:
        """Start lab.podserver answering `NAME:PORT` (peer: `NAME:PORT@CLIENT`); return once it
        has bound every port."""
        argv = [sys.executable, "-m", "lab.podserver", "--name", name or self.name]
        for port in ports:
            argv += ["--port", str(port)]
        if udp:
            argv.append("--udp")
        if peer:
            argv.append("--peer")
        log = self.lab.workdir / f"{self.name}-server-{ports[0]}.log"
        with open(log, "w") as stderr:
            server = self.popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True)
        if not _wait_for_line(server, "ready", timeout):
            self.lab.processes.stop(server)
            raise RuntimeError(f"pod {self.name}: podserver {ports} not ready: {log.read_text()}")
        self.servers.append(server)
        return server

    def start_client(
        self,
        mode: str,
        addr: str,
        port: int,
        count: int = 1,
        timeout: float = 1.0,
        interval: float = 0.0,
        duration: float | None = None,
        timeline: bool = False,
        until_stopped: bool = False,
    ) -> RunningClient:
        """Start lab.podclient in the background (traffic flowing while a test changes things).
        until_stopped: it runs until RunningClient.stop() (duration, then, only bounds it), and
        RunningClient.wait_started() returns once its first request is done."""
        requests = Requests(mode, addr, port, count, timeout, interval, duration)
        argv = requests.argv()
        if timeline:
            argv.append("--timeline")
        stop_file = started_file = None
        if until_stopped:
            if duration is None:
                raise ValueError("until_stopped needs a duration to bound the run")
            base = self.lab.workdir / f"client-{self.name}-{next(_client_numbers)}"
            stop_file, started_file = base.with_suffix(".stop"), base.with_suffix(".started")
            argv += ["--stop-file", str(stop_file), "--started-file", str(started_file)]
        process = self.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return RunningClient(
            self.lab.processes, process, argv, requests.longest() + 15.0, stop_file, started_file
        )

    def tcp(self, addr: str, port: int, count: int = 1, **kw) -> ClientResult:
        """count TCP connections to addr:port: connect, read the answer, close."""
        return self.start_client("tcp", addr, port, count, **kw).result()

    def udp(self, addr: str, port: int, count: int = 1, **kw) -> ClientResult:
        """count unconnected UDP requests; a reply from another address counts as wrong_source."""
        return self.start_client("udp", addr, port, count, **kw).result()

    def udp_one_socket(self, addr: str, port: int, count: int = 1, **kw) -> ClientResult:
        """count unconnected UDP requests from one socket kept open across all of them."""
        return self.start_client("udp-one-socket", addr, port, count, **kw).result()

    def udp_connected(self, addr: str, port: int, count: int = 1, **kw) -> ClientResult:
        """count connected UDP requests; getpeername() other than addr:port counts as wrong_peer."""
        return self.start_client("udp-connected", addr, port, count, **kw).result()


@dataclass
class RunningClient:
    """A podclient started in the background; result() waits for its summary."""

    processes: Processes
    process: subprocess.Popen
    argv: list[str]
    timeout: float
    stop_file: Path | None = None
    started_file: Path | None = None

    def wait_started(self, timeout: float = 30.0) -> None:
        """Return once the first request is done (start_client(until_stopped=True))."""
        assert self.started_file is not None, "start the client with until_stopped=True"
        deadline = time.monotonic() + timeout
        while not self.started_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"client {self.argv} made no request (exit "
                                   f"{self.process.poll()}) within {timeout}s")
            time.sleep(0.02)

    def stop(self) -> ClientResult:
        """Stop the client and return what it saw. Its last request begins after this call,
        so a timeline that runs past a moment taken before stop() is guaranteed."""
        assert self.stop_file is not None, "start the client with until_stopped=True"
        self.stop_file.touch()
        return self.result()

    def result(self, timeout: float | None = None) -> ClientResult:
        """Wait for the client (bounded by how long it can run) and parse its summary."""
        done = self.processes.finish(self.process, self.argv, timeout or self.timeout,
                                     check=True)
        return ClientResult.from_json(done.stdout)


def _wait_for_line(process: subprocess.Popen, line: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([process.stdout], [], [], left)
        if not readable:
            return False
        got = process.stdout.readline()
        if not got:
            return False  # it exited
        if got.strip() == line:
            return True
    return False
