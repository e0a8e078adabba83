"""Hand-made Ethernet frames, well-formed or not, and a raw sender: how tests feed the TC
programs packets no socket would send. `python -m lab.packets IFNAME FILE [--expect TYPE]`
sends the hex frames in FILE (one per line) on IFNAME and, with --expect, prints the hex of
frames of that ethertype that arrive within a second."""
from __future__ import annotations

import argparse
import ipaddress
import select
import socket
import struct
import sys
import time

ETH_IP, ETH_IP6, ETH_ARP = 0x0800, 0x86DD, 0x0806
TCP, UDP, ICMP, HOPOPTS = 6, 17, 1, 0


def mac(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ether(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    return mac(dst) + mac(src) + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, frag: int = 0,
         options: bytes = b"", ttl: int = 64) -> bytes:
    """frag: the flags+offset field (0x2000 more fragments, low 13 bits the offset)."""
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(options) + len(payload),
                         0x1234, frag, ttl, proto, 0, ipaddress.IPv4Address(src).packed,
                         ipaddress.IPv4Address(dst).packed) + options
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + payload


def ipv6(src: str, dst: str, nexthdr: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nexthdr, 64,
                       ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + payload


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if a.version == 4:
        return a.packed + b.packed + struct.pack("!BBH", 0, proto, length)
    return a.packed + b.packed + struct.pack("!IxxxB", length, proto)


def udp(src: str, dst: str, sport: int, dport: int, data: bytes = b"x") -> bytes:
    header = struct.pack("!HHHH", sport, dport, 8 + len(data), 0)
    csum = checksum(_pseudo(src, dst, UDP, 8 + len(data)) + header + data) or 0xFFFF
    return header[:6] + struct.pack("!H", csum) + data


def tcp(src: str, dst: str, sport: int, dport: int, flags: int = 0x02) -> bytes:
    header = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, flags, 65535, 0, 0)
    csum = checksum(_pseudo(src, dst, TCP, len(header)) + header)
    return header[:16] + struct.pack("!H", csum) + header[18:]


def icmp_echo(ident: int = 7, seq: int = 1) -> bytes:
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"bpfp"
    return header[:2] + struct.pack("!H", checksum(header)) + header[4:]


def arp_request(src_mac: str, src_ip: str, target_ip: str) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_IP, 6, 4, 1, mac(src_mac),
                       ipaddress.IPv4Address(src_ip).packed, bytes(6),
                       ipaddress.IPv4Address(target_ip).packed)


def send(ifname: str, frames: list[bytes], expect: int | None = None,
         wait: float = 1.0) -> list[bytes]:
    """Send frames on ifname; with expect, return the frames of that ethertype received
    within `wait` seconds after the last one."""
    proto = socket.htons(expect if expect is not None else 0x0003)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, proto) as sock:
        sock.bind((ifname, proto))
        for frame in frames:
            sock.send(frame)
        got: list[bytes] = []
        deadline = time.monotonic() + wait
        while expect is not None and (left := deadline - time.monotonic()) > 0:
            if select.select([sock], [], [], left)[0]:
                data, (_, _, pkttype, *_) = sock.recvfrom(65535)
                if pkttype != socket.PACKET_OUTGOING:
                    got.append(data)
        return got


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ifname")
    parser.add_argument("file")
    parser.add_argument("--expect", type=lambda v: int(v, 0), default=None)
    args = parser.parse_args(argv)
    with open(args.file) as lines:
        frames = [bytes.fromhex(line) for line in lines.read().split() if line]
    for frame in send(args.ifname, frames, args.expect):
        print(frame.hex(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
