"""Netfilter's own conntrack table (not the TC path's: agent/datapath/conntrack.py), read
through ctnetlink: how many flows of one address family netfilter DNATed are still open.

`bpfproxy cleanup --kube-proxy` asks it before removing the table that keeps NAT of the
flows kube-proxy DNATed (agent/kubeproxy_cleanup.py)."""
from __future__ import annotations

import socket

IPS_DST_NAT = 1 << 5                 # <linux/netfilter/nf_conntrack_common.h>
# TCP_CONNTRACK_TIME_WAIT and _CLOSE: the flow is over, no data follows
_TCP_OVER = frozenset({7, 8})


def is_open_dnat(status: int, tcp_state: int | None) -> bool:
    """A flow whose destination netfilter rewrote, and that may still carry data."""
    return bool(status & IPS_DST_NAT) and tcp_state not in _TCP_OVER


def open_dnat_flows(family: int) -> int:
    """Open DNATed flows of family 4 or 6 in this network namespace (OSError: unreadable)."""
    from pyroute2 import NFCTSocket  # only here: netlink is the datapath's business

    conntrack = NFCTSocket(nfgen_family=socket.AF_INET if family == 4 else socket.AF_INET6)
    try:
        return sum(is_open_dnat(
            entry.get_attr("CTA_STATUS") or 0,
            entry.get_nested("CTA_PROTOINFO", "CTA_PROTOINFO_TCP", "CTA_PROTOINFO_TCP_STATE"))
            for entry in conntrack.dump())
    finally:
        conntrack.close()
