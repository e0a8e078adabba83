"""A pod's client: N requests (or requests for S seconds) to ADDR:PORT, one JSON summary on stdout.
`python -m lab.podclient tcp|udp|udp-connected ADDR PORT [--count N | --duration S]
[--timeline] [--stop-file F] [--started-file F]`. An IPv6 ADDR (also ::ffff:a.b.c.d) is
reached from an AF_INET6 socket."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

MODES = ("tcp", "udp", "udp-connected", "udp-one-socket")


@dataclass
class Outcome:
    """One request: the answer ("pod-a:80") or an error name, and whether the addresses matched."""

    answer: str | None = None
    error: str | None = None
    wrong_source: bool = False  # unconnected UDP: reply came from another address than ADDR:PORT
    wrong_peer: bool = False  # connected sockets: getpeername() is not ADDR:PORT


@dataclass
class ClientResult:
    """What a podclient run saw; answers count "pod:port" strings, errors count errno names."""

    answers: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    wrong_source: int = 0
    wrong_peer: int = 0
    timeline: list[tuple[float, str]] = field(default_factory=list)
    started: float = 0.0  # time.monotonic() at the client's start: timeline t is relative to it

    @classmethod
    def from_json(cls, text: str) -> ClientResult:
        raw = json.loads(text)
        return cls(
            answers=Counter(raw["answers"]),
            errors=Counter(raw["errors"]),
            wrong_source=raw["wrong_source"],
            wrong_peer=raw["wrong_peer"],
            timeline=[(t, what) for t, what in raw.get("timeline", [])],
            started=raw.get("started", 0.0),
        )

    def to_json(self, timeline: bool = False) -> str:
        out = {
            "answers": dict(self.answers),
            "errors": dict(self.errors),
            "wrong_source": self.wrong_source,
            "wrong_peer": self.wrong_peer,
            "started": self.started,
        }
        if timeline:
            out["timeline"] = self.timeline
        return json.dumps(out)

    def add(self, t: float, outcome: Outcome) -> None:
        if outcome.answer is not None:
            self.answers[outcome.answer] += 1
        if outcome.error is not None:
            self.errors[outcome.error] += 1
        self.wrong_source += outcome.wrong_source
        self.wrong_peer += outcome.wrong_peer
        self.timeline.append((round(t, 3), outcome.answer or outcome.error or "?"))

    def backends(self) -> set[str]:
        """Names of the pods that answered."""
        return {answer.split(":")[0] for answer in self.answers}

    @property
    def answered(self) -> int:
        return sum(self.answers.values())

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def total(self) -> int:
        return self.answered + self.failed


def request_on(sock: socket.socket, addr: str, port: int, timeout: float) -> Outcome:
    """One unconnected UDP request on a socket kept across requests (udp-one-socket): what
    a DNS resolver or a QUIC client does, so every datagram should reach one backend."""
    target = (addr, port)
    try:
        sock.settimeout(timeout)
        sock.sendto(b"?\n", target)
        data, source = sock.recvfrom(2048)
        return Outcome(answer=_text(data), wrong_source=not _names(source, addr, port))
    except TimeoutError:
        return Outcome(error="timeout")
    except OSError as error:
        return Outcome(error=errno.errorcode.get(error.errno, str(error.errno)))


def request(mode: str, addr: str, port: int, timeout: float) -> Outcome:
    """One request on a fresh socket, every wait bounded by timeout."""
    kind = socket.SOCK_STREAM if mode == "tcp" else socket.SOCK_DGRAM
    target = (addr, port)
    try:
        with socket.socket(family(addr), kind) as sock:
            sock.settimeout(timeout)
            if mode == "udp":
                sock.sendto(b"?\n", target)
                data, source = sock.recvfrom(2048)
                return Outcome(answer=_text(data), wrong_source=not _names(source, addr, port))
            sock.connect(target)
            # With socket load balancing the peer must still read as the service address.
            wrong_peer = not _names(sock.getpeername(), addr, port)
            if mode == "udp-connected":
                sock.send(b"?\n")
                return Outcome(answer=_text(sock.recv(2048)), wrong_peer=wrong_peer)
            data = _read_line(sock, time.monotonic() + timeout)
            if not data:
                return Outcome(error="empty", wrong_peer=wrong_peer)
            return Outcome(answer=_text(data), wrong_peer=wrong_peer)
    except TimeoutError:
        return Outcome(error="timeout")
    except OSError as error:
        name = (
            errno.errorcode.get(error.errno, str(error.errno))
            if error.errno
            else type(error).__name__
        )
        return Outcome(error=name)


def family(addr: str) -> socket.AddressFamily:
    """AF_INET6 for any IPv6 address, IPv4-mapped ones included (an IPv6 socket talking IPv4)."""
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def _names(peer: tuple, addr: str, port: int) -> bool:
    """Whether a socket address (recvfrom, getpeername; 4-tuples for IPv6) is addr:port."""
    if peer[1] != port:
        return False
    return peer[0] == addr or ipaddress.ip_address(peer[0]) == ipaddress.ip_address(addr)


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(2048)
        if not chunk:
            break
        data += chunk
    return data


def _text(data: bytes) -> str:
    return data.decode(errors="replace").strip()


@dataclass(frozen=True)
class Requests:
    """What one client run sends: count requests, or as many as fit in duration seconds,
    interval seconds apart, each given timeout seconds."""

    mode: str  # one of MODES
    addr: str
    port: int
    count: int = 1
    timeout: float = 1.0
    interval: float = 0.0
    duration: float | None = None

    def argv(self) -> list[str]:
        """The command line that runs them (python -m lab.podclient ...)."""
        argv = [sys.executable, "-m", "lab.podclient", self.mode, self.addr, str(self.port),
                "--count", str(self.count), "--timeout", str(self.timeout),
                "--interval", str(self.interval)]
        if self.duration is not None:
            argv += ["--duration", str(self.duration)]
        return argv

    def longest(self) -> float:
        """The most seconds the run can take, start-up aside."""
        if self.duration is not None:
            return self.duration + self.timeout + self.interval
        return self.count * (self.timeout + self.interval)


def run(requests: Requests, stop_file: str | None = None,
        started_file: str | None = None) -> ClientResult:
    """count requests, or as many as fit in duration seconds, interval seconds apart; once
    stop_file exists, one more (begun after it appeared: the timeline ends after the stop) and
    no others. started_file is created when the first request is done."""
    mode, addr, port, timeout = requests.mode, requests.addr, requests.port, requests.timeout
    count, interval, duration = requests.count, requests.interval, requests.duration
    result = ClientResult()
    start = result.started = time.monotonic()
    sent = 0
    stopping = False
    kept = socket.socket(family(addr), socket.SOCK_DGRAM) if mode == "udp-one-socket" else None
    while not stopping and \
            ((time.monotonic() - start < duration) if duration is not None else sent < count):
        stopping = bool(stop_file) and os.path.exists(stop_file)
        if kept is not None:
            outcome = request_on(kept, addr, port, timeout)
        else:
            outcome = request(mode, addr, port, timeout)
        result.add(time.monotonic() - start, outcome)
        sent += 1
        if sent == 1 and started_file:
            open(started_file, "w").close()
        if interval and not stopping:
            time.sleep(interval)
    if kept is not None:
        kept.close()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("addr")
    parser.add_argument("port", type=int)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds per request")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between requests")
    parser.add_argument("--duration", type=float, help="keep going this long instead of --count")
    parser.add_argument("--timeline", action="store_true", help="add [t, answer-or-error] pairs")
    parser.add_argument("--stop-file", help="make one last request once this file exists")
    parser.add_argument("--started-file", help="create this file when the first request is done")
    args = parser.parse_args(argv)
    requests = Requests(args.mode, args.addr, args.port, args.count, args.timeout,
                        args.interval, args.duration)
    result = run(requests, args.stop_file, args.started_file)
    print(result.to_json(timeline=args.timeline), flush=True)


if __name__ == "__main__":
    main()
