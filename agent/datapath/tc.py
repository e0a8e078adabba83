"""The node's interfaces as the TC programs need them: each one's index and the node's own
address there per family, the source of SNATed flows (written to bpfp_ifaddr); and the
SNAT ports kept from the node's own sockets (net.ipv4.ip_local_reserved_ports)."""
from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Sequence
from pathlib import Path

from agent.model.types import IPAddress

log = logging.getLogger(__name__)


def interface_addresses(interfaces: Sequence[str], preferred: Sequence[IPAddress] = ()
                        ) -> dict[tuple[int, int], IPAddress]:
    """(ifindex, family) -> address: a --node-ip found on the interface, else its first
    global address of that family."""
    from pyroute2 import IPRoute  # only here: netlink is the datapath's business

    out: dict[tuple[int, int], IPAddress] = {}
    with IPRoute() as ipr:
        for name in interfaces:
            index = socket.if_nametoindex(name)
            found: dict[int, list[IPAddress]] = {4: [], 6: []}
            for msg in ipr.get_addr(index=index):
                if msg["scope"] != 0:        # RT_SCOPE_UNIVERSE only: no link-local
                    continue
                address = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
                found[address.version].append(address)
            for family, addresses in found.items():
                chosen = [a for a in addresses if a in preferred] or addresses
                if chosen:
                    out[index, family] = chosen[0]
    return out


def check_snat_ports(low: int, high: int,
                     sysctl: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> bool:
    """Whether the node's ephemeral range stays clear of the SNAT ports: where it reaches
    them, a reply to the node's own connection could be taken for a SNATed flow's. Says
    so in the log (the range is the node's to choose); True when clear."""
    try:
        first, last = map(int, sysctl.read_text().split())
    except (OSError, ValueError):
        return True
    if last < low or first > high:
        return True
    log.warning("event=snat_ports_overlap ephemeral=%d-%d snat=%d-%d advice=%r", first, last,
                low, high, "lower net.ipv4.ip_local_port_range's upper end below the SNAT "
                "ports, or reserve them in net.ipv4.ip_local_reserved_ports")
    return False



RESERVED_PORTS = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")


def parse_port_ranges(text: str) -> list[tuple[int, int]]:
    """'1000,61000-65535' (the sysctl's format) -> [(1000, 1000), (61000, 65535)]."""
    out = []
    for part in text.replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        out.append((int(low), int(high or low)))
    return out


def merge_port_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, overlapping and adjacent ranges joined: nobody's port is dropped."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def format_port_ranges(ranges: list[tuple[int, int]]) -> str:
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


def reserve_snat_ports(low: int, high: int, sysctl: Path = RESERVED_PORTS) -> bool:
    """Reserve the SNAT ports in net.ipv4.ip_local_reserved_ports (per network namespace),
    merged with the entries there: the kernel then never gives one to a local socket's
    bind(0) or connect(), so a node process never shares a port with a SNATed flow. Logged.
    Left in place by `bpfproxy cleanup`, as kube-proxy leaves the sysctls it sets: an
    identical entry may be the operator's, and a reservation only steers automatic port
    choice (an explicit bind still works). True when the ports are reserved."""
    try:
        current = sysctl.read_text().strip()
        ranges = parse_port_ranges(current)
    except (OSError, ValueError) as exc:
        log.warning("event=snat_ports_not_reserved sysctl=net.ipv4.ip_local_reserved_ports "
                    "error=%r", str(exc))
        return False
    merged = merge_port_ranges([*ranges, (low, high)])
    if merged == merge_port_ranges(ranges):
        log.info("event=snat_ports_reserved ports=%d-%d already=true", low, high)
        return True
    try:
        sysctl.write_text(format_port_ranges(merged) + "\n")
    except OSError as exc:
        log.warning("event=snat_ports_not_reserved sysctl=net.ipv4.ip_local_reserved_ports "
                    "error=%r advice=%r", str(exc), f"reserve {low}-{high} there, or keep "
                    "net.ipv4.ip_local_port_range below them")
        return False
    log.info("event=snat_ports_reserved ports=%d-%d sysctl=net.ipv4.ip_local_reserved_ports "
             "was=%r now=%r", low, high, current, format_port_ranges(merged))
    return True
