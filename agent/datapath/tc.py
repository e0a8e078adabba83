"""The node's interfaces as the TC programs need them: each one's index and the node's own
address there per family, the source of SNATed flows (written to bpfp_ifaddr)."""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

from agent.model.types import IPAddress


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
