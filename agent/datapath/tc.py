"""The node's interfaces as the TC programs need them: each one's index and the node's own
address there per family, the source of SNATed flows (written to bpfp_ifaddr)."""
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

