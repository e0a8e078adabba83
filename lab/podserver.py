"""A pod's workload: answer every TCP connection and UDP datagram with `NAME:PORT\\n`.
Run in a pod as `python -m lab.podserver --name NAME --port P [--port P2] [--udp]`;
prints "ready"."""

from __future__ import annotations

import argparse
import selectors
import socket


def serve(name: str, ports: list[int], udp: bool) -> None:
    selector = selectors.DefaultSelector()
    for port in ports:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", port))
        listener.listen(1024)  # bursts of short connections from benchmarks
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, ("tcp", port))
        if udp:
            datagrams = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            datagrams.bind(("0.0.0.0", port))
            datagrams.setblocking(False)
            selector.register(datagrams, selectors.EVENT_READ, ("udp", port))
    print("ready", flush=True)

    # One thread, non-blocking: each answer fits in an empty send buffer, so nothing waits.
    while True:
        for key, _events in selector.select():
            protocol, port = key.data
            answer = f"{name}:{port}\n".encode()
            if protocol == "tcp":
                _answer_connections(key.fileobj, answer)
            else:
                _answer_datagrams(key.fileobj, answer)


def _answer_connections(listener: socket.socket, answer: bytes) -> None:
    while True:
        try:
            connection, _peer = listener.accept()
        except BlockingIOError:
            return
        with connection:
            try:
                connection.sendall(answer)
            except OSError:
                pass  # the client gave up; nothing to tell it


def _answer_datagrams(datagrams: socket.socket, answer: bytes) -> None:
    while True:
        try:
            _request, client = datagrams.recvfrom(2048)
        except BlockingIOError:
            return
        try:
            datagrams.sendto(answer, client)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True, help="the pod name to answer with")
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--udp", action="store_true", help="also answer UDP on each port")
    args = parser.parse_args(argv)
    try:
        serve(args.name, args.port, args.udp)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
