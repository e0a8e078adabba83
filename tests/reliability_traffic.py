"""Long-lived TCP connections for the reliability tests: a server that answers every line
with its name, and a client that holds connections open and pings on each of them.

`python -m tests.reliability_traffic serve --name N --port P` (prints "ready");
`python -m tests.reliability_traffic hold ADDR PORT --connections K --duration S` prints one
JSON summary: every connection with its backend, requests, and how and when it ended; with
--stop-file and --rounds-file it runs until stopped and says when each round over its
connections began. Times are time.monotonic(), which all processes of the machine share."""
from __future__ import annotations

import argparse
import errno
import itertools
import json
import os
import selectors
import socket
import time
from dataclasses import asdict, dataclass


def serve(name: str, port: int) -> None:
    selector = selectors.DefaultSelector()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(256)
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ)
    answer = f"{name}\n".encode()
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                try:
                    connection, _peer = listener.accept()
                except BlockingIOError:
                    continue
                connection.setblocking(False)
                selector.register(connection, selectors.EVENT_READ)
                continue
            connection = key.fileobj
            try:
                data = connection.recv(4096)
            except OSError:
                data = b""
            if not data:
                selector.unregister(connection)
                connection.close()
                continue
            try:
                connection.sendall(answer * data.count(b"\n"))
            except OSError:
                pass


@dataclass
class Held:
    """One connection: who answered it, how often, and how it ended (if it did)."""
    backend: str
    opened: float
    requests: int = 0
    last_ok: float = 0.0
    ended: float | None = None
    error: str | None = None
    wrong_answers: int = 0


def _error_name(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, OSError) and error.errno:
        return errno.errorcode.get(error.errno, str(error.errno))
    return type(error).__name__


def _ask(sock: socket.socket, timeout: float) -> str:
    sock.settimeout(timeout)
    sock.sendall(b"ping\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(256)
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "closed by the server (EOF)")
        data += chunk
    return data.decode(errors="replace").strip()


def _open(addr: str, port: int, timeout: float) -> tuple[socket.socket, Held]:
    sock = socket.create_connection((addr, port), timeout=timeout)
    started = time.monotonic()
    backend = _ask(sock, timeout)
    return sock, Held(backend, started, 1, time.monotonic())


def _rounds_done(rounds_file: str, began: float) -> None:
    """Say, atomically, when the last round that ended began."""
    with open(rounds_file + ".tmp", "w") as out:
        out.write(repr(began))
    os.replace(rounds_file + ".tmp", rounds_file)


def hold(addr: str, port: int, connections: int, duration: float, interval: float,
         timeout: float, reconnect: bool, stop_file: str | None = None,
         rounds_file: str | None = None) -> dict:
    """A round asks once on each open connection (and reconnects, with reconnect). Once
    stop_file exists, one more round (begun after it appeared) and no other; rounds_file
    holds when the last round that ended began."""
    started = time.monotonic()
    stopping = False
    held: list[Held] = []
    open_now: list[tuple[socket.socket, Held]] = []
    connect_failures: list[dict] = []

    def connect() -> None:
        try:
            open_now.append(_open(addr, port, timeout))
            held.append(open_now[-1][1])
        except OSError as error:
            connect_failures.append({"t": time.monotonic(), "error": _error_name(error)})

    for _ in range(connections):
        connect()
    while not stopping and time.monotonic() - started < duration:
        stopping = bool(stop_file) and os.path.exists(stop_file)
        began = time.monotonic()
        for sock, record in list(open_now):
            try:
                answer = _ask(sock, timeout)
                record.requests += 1
                record.last_ok = time.monotonic()
                record.wrong_answers += answer != record.backend
            except OSError as error:
                record.ended, record.error = time.monotonic(), _error_name(error)
                sock.close()
                open_now.remove((sock, record))
                if reconnect:
                    connect()
        if reconnect:
            while len(open_now) < connections and time.monotonic() - started < duration:
                connect()
                time.sleep(interval)
        if rounds_file:
            _rounds_done(rounds_file, began)
        if not stopping:
            time.sleep(interval)
    for sock, _ in open_now:
        sock.close()
    return {"started": started, "connections": [asdict(h) for h in held],
            "connect_failures": connect_failures}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    server = sub.add_parser("serve")
    server.add_argument("--name", required=True)
    server.add_argument("--port", type=int, required=True)
    client = sub.add_parser("hold")
    client.add_argument("addr")
    client.add_argument("port", type=int)
    client.add_argument("--connections", type=int, default=8)
    client.add_argument("--duration", type=float, default=10.0)
    client.add_argument("--interval", type=float, default=0.05)
    client.add_argument("--timeout", type=float, default=2.0)
    client.add_argument("--reconnect", action="store_true",
                        help="replace a connection that ended with a new one")
    client.add_argument("--stop-file", help="one last round once this file exists")
    client.add_argument("--rounds-file", help="when the last round that ended began")
    args = parser.parse_args(argv)
    if args.mode == "serve":
        try:
            serve(args.name, args.port)
        except KeyboardInterrupt:
            pass
    else:
        print(json.dumps(hold(args.addr, args.port, args.connections, args.duration,
                              args.interval, args.timeout, args.reconnect, args.stop_file,
                              args.rounds_file)), flush=True)


if __name__ == "__main__":
    main()


# --- starting them in lab pods (the test process side) -----------------------------------

def start_server(pod, port: int, timeout: float = 10.0):
    """Run `serve` in a lab pod (its netns and cgroup); return once it listens."""
    import select
    import subprocess
    import sys

    server = pod.popen([sys.executable, "-m", "tests.reliability_traffic", "serve", "--name",
                        pod.name, "--port", str(port)],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    readable, _, _ = select.select([server.stdout], [], [], timeout)
    if not readable or server.stdout.readline().strip() != "ready":
        pod.lab.processes.stop(server)
        raise RuntimeError(f"pod {pod.name}: hold server on {port} did not start")
    return server


@dataclass
class HoldRun:
    """A `hold` client running in a pod; result() waits for its summary."""
    pod: object
    process: object
    argv: list
    timeout: float
    stop_file: object = None            # Paths, with start_hold(until_stopped=True)
    rounds_file: object = None

    def wait_round(self, begun_after: float = 0.0, timeout: float = 60.0) -> None:
        """Return once a round begun after begun_after (time.monotonic()) has ended: every
        connection open then has been asked since. timeout only turns a hang into a failure."""
        assert self.rounds_file is not None, "start the client with until_stopped=True"
        deadline = time.monotonic() + timeout
        while not (self.rounds_file.exists() and
                   float(self.rounds_file.read_text()) > begun_after):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"hold client {self.argv}: no round begun after "
                                     f"{begun_after} ended (exit {self.process.poll()})")
            time.sleep(0.02)

    def stop(self) -> dict:
        """Stop the client: its last round begins after this call. Returns its summary."""
        assert self.stop_file is not None, "start the client with until_stopped=True"
        self.stop_file.touch()
        return self.result()

    def result(self) -> dict:
        done = self.pod.lab.processes.finish(self.process, self.argv, self.timeout, check=True)
        return json.loads(done.stdout)


_hold_numbers = itertools.count(1)


def start_hold(pod, addr: str, port: int, connections: int, duration: float,
               interval: float = 0.05, reconnect: bool = False,
               until_stopped: bool = False) -> HoldRun:
    """until_stopped: it runs until HoldRun.stop() (duration only bounds it), and
    HoldRun.wait_round() follows its rounds."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "tests.reliability_traffic", "hold", addr, str(port),
            "--connections", str(connections), "--duration", str(duration),
            "--interval", str(interval)]
    if reconnect:
        argv.append("--reconnect")
    stop_file = rounds_file = None
    if until_stopped:
        base = pod.lab.workdir / f"hold-{pod.name}-{next(_hold_numbers)}"
        stop_file, rounds_file = base.with_suffix(".stop"), base.with_suffix(".rounds")
        argv += ["--stop-file", str(stop_file), "--rounds-file", str(rounds_file)]
    process = pod.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return HoldRun(pod, process, argv, duration + 30.0, stop_file, rounds_file)
