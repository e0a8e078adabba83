"""A pod's workload: answer every TCP connection and UDP datagram, IPv4 or IPv6, with
`NAME:PORT\\n` (with --peer `NAME:PORT@CLIENT-ADDRESS\\n`: who the server saw). Run in a pod
as `python -m lab.podserver --name NAME --port P [--port P2] [--udp] [--peer]`; prints "ready"."""

from __future__ import annotations

import argparse
import errno
import selectors
import socket

# One socket per family: the IPv4 one stays a plain AF_INET socket (what the benchmarks
# measured), the IPv6 one is IPV6_V6ONLY so the two never compete for IPv4 connections.
_ANY = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}


def serve(name: str, ports: list[int], udp: bool, peer: bool = False) -> None:
    selector = selectors.DefaultSelector()
    for port in ports:
        for family in _families():
            listener = _bound(family, socket.SOCK_STREAM, port)
            listener.listen(1024)  # bursts of short connections from benchmarks
            selector.register(listener, selectors.EVENT_READ, ("tcp", port))
            if udp:
                datagrams = _bound(family, socket.SOCK_DGRAM, port)
                selector.register(datagrams, selectors.EVENT_READ, ("udp", port))
    print("ready", flush=True)

    # One thread, non-blocking: each answer fits in an empty send buffer, so nothing waits.
    while True:
        for key, _events in selector.select():
            protocol, port = key.data
            answer = f"{name}:{port}"
            if protocol == "tcp":
                _answer_connections(key.fileobj, answer, peer)
            else:
                _answer_datagrams(key.fileobj, answer, peer)


def _families() -> list[socket.AddressFamily]:
    """IPv4, and IPv6 unless this kernel has none at all."""
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
    except OSError as error:
        if error.errno != errno.EAFNOSUPPORT:
            raise
        return [socket.AF_INET]
    return [socket.AF_INET, socket.AF_INET6]


def _bound(family: socket.AddressFamily, kind: socket.SocketKind, port: int) -> socket.socket:
    sock = socket.socket(family, kind)
    if kind == socket.SOCK_STREAM:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((_ANY[family], port))
    sock.setblocking(False)
    return sock


def _reply(answer: str, client, peer: bool) -> bytes:
    return (f"{answer}@{client[0]}\n" if peer else f"{answer}\n").encode()


def _answer_connections(listener: socket.socket, answer: str, peer: bool) -> None:
    while True:
        try:
            connection, client = listener.accept()
        except BlockingIOError:
            return
        with connection:
            try:
                connection.sendall(_reply(answer, client, peer))
            except OSError:
                pass  # the client gave up; nothing to tell it


def _answer_datagrams(datagrams: socket.socket, answer: str, peer: bool) -> None:
    while True:
        try:
            _request, client = datagrams.recvfrom(2048)
        except BlockingIOError:
            return
        try:
            datagrams.sendto(_reply(answer, client, peer), client)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True, help="the pod name to answer with")
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--udp", action="store_true", help="also answer UDP on each port")
    parser.add_argument("--peer", action="store_true", help="add the client's address")
    args = parser.parse_args(argv)
    try:
        serve(args.name, args.port, args.udp, args.peer)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
