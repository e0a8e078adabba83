"""What crosses an interface, as tcpdump would show it: an AF_PACKET socket on IFNAME sees
each TCP and UDP frame of either IP family both ways (before the TC ingress programs on the
way in, after the egress ones on the way out; not what XDP handles). `python -m lab.capture
IFNAME` prints "ready", captures until its stdin closes, then prints one JSON line per frame:
[src, sport, dst, dport, proto, outgoing]. Capture(...) runs it in a namespace."""
from __future__ import annotations

import ipaddress
import json
import select
import socket
import struct
import subprocess
import sys
from typing import NamedTuple

ETH_P_ALL, ETH_IP, ETH_IP6 = 0x0003, 0x0800, 0x86DD
PACKET_OUTGOING = 4
TCP, UDP = 6, 17


class Frame(NamedTuple):
    src: str
    sport: int
    dst: str
    dport: int
    proto: int
    outgoing: bool


def parse(data: bytes, outgoing: bool) -> Frame | None:
    """The frame's addresses and ports, or None when it is no TCP or UDP over IP."""
    ethertype = struct.unpack_from("!H", data, 12)[0] if len(data) >= 14 else 0
    if ethertype == ETH_IP and len(data) >= 34:
        ihl = (data[14] & 15) * 4
        proto, src, dst, l4 = data[23], data[26:30], data[30:34], 14 + ihl
    elif ethertype == ETH_IP6 and len(data) >= 54:
        proto, src, dst, l4 = data[20], data[22:38], data[38:54], 54
        if proto == 60 and len(data) >= 56:          # a destination options header first
            proto, l4 = data[54], 54 + (data[55] + 1) * 8
    else:
        return None
    if proto not in (TCP, UDP) or len(data) < l4 + 4:
        return None
    sport, dport = struct.unpack_from("!HH", data, l4)
    return Frame(str(ipaddress.ip_address(src)), sport, str(ipaddress.ip_address(dst)), dport,
                 proto, outgoing)


def main(argv: list[str] | None = None) -> int:
    ifname = (argv or sys.argv[1:])[0]
    frames = []
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as sock:
        sock.bind((ifname, 0))
        print("ready", flush=True)
        while True:
            readable, _, _ = select.select([sock, sys.stdin], [], [])
            if sock in readable:
                data, address = sock.recvfrom(65536)
                frame = parse(data, address[2] == PACKET_OUTGOING)
                if frame:
                    frames.append(frame)
            if sys.stdin in readable and not sys.stdin.buffer.read1(4096):
                break
    for frame in frames:
        print(json.dumps(list(frame)))
    return 0


class Capture:
    """with Capture(processes, netns, "eth0") as capture: ...; capture.frames: what passed."""

    def __init__(self, processes, netns_name: str, ifname: str) -> None:
        self.processes = processes
        self.process = processes.start(
            [sys.executable, "-m", "lab.capture", ifname], netns_name, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.frames: list[Frame] = []
        if self.process.stdout.readline().strip() != "ready":
            self.processes.stop(self.process)
            raise RuntimeError(f"lab.capture on {ifname} in {netns_name} did not start: "
                               f"{self.process.stderr.read()}")

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> list[Frame]:
        if self.process.poll() is None:
            out, err = self.process.communicate(input="", timeout=30)
            self.processes.forget(self.process)
            self.frames = [Frame(*json.loads(line)) for line in out.splitlines()]
        return self.frames


if __name__ == "__main__":
    sys.exit(main())
