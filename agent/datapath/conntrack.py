"""The TC path's flow table as the agent sees it: a periodic sweep that removes flows that
are over and counts what is in use, the SNAT ports above all.

The kernel takes a finished flow's SNAT port back by itself when a new flow needs that
port (bpf/nodeport.c, claim_snat), so no flow ever waits for this sweep. The sweep keeps
the map to live flows (the figures an operator reads: entries, flows, SNAT ports per
backend against the range) and frees what no packet will come to claim.

A flow is over when both of its entries are past their time: one entry alone may lag,
as a one-way stream refreshes its partner only now and then. The same rule as the
kernel's (expire_flow); entries are read in batches and removed one by one, each only
after a fresh read shows it still past its time, so a port the kernel has just handed to
a new flow is never taken from it."""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from agent.datapath import bpfsys, layout
from agent.datapath.inventory import read_events

log = logging.getLogger(__name__)

MAX_DELETES_PER_SWEEP = 65536      # the rest waits for the next sweep: bounded work


@dataclass(frozen=True, slots=True)
class FlowTableStats:
    """One sweep's view of bpfp_ct (counts, not flows)."""

    entries: int = 0                # entries found (two per flow)
    flows: int = 0                  # live flows (their forward entries)
    snat_ports_in_use: int = 0      # live SNATed flows: one node port each
    # the most ports held towards one (node address, backend, port, protocol): new flows
    # to that backend fail when this reaches snat_port_range
    snat_ports_busiest: int = 0
    snat_port_range: int = 0        # ports a backend can be reached from (61000-65535)
    removed: int = 0                # entries of finished flows this sweep removed
    seconds: float = 0.0            # the sweep's own duration
    finished_unix: float = 0.0
    # the TC path's own counters (bpfp_tc_events, summed over CPUs): no_snat_port,
    # tcp_not_syn, snat_port_reused, flow_expired
    events: dict[str, int] = field(default_factory=dict)


def reply_key(key: layout.CtKey, value: layout.CtValue) -> layout.CtKey:
    """The key of the other entry of key's flow: value's rewrite, swapped (maps.h); on a
    DSR backend's node, key itself reversed (bpf/nodeport.h partner_key)."""
    if value.flags & layout.CT_DSR_BACKEND:
        return layout.CtKey(key.daddr, key.saddr, key.dport, key.sport, key.proto,
                            key.family, 0)
    return layout.CtKey(value.daddr, value.saddr, value.dport, value.sport, key.proto,
                        key.family, 0)


def _same(a: layout.CtKey, b: layout.CtKey) -> bool:
    return bytes(a) == bytes(b)


class FlowTable:
    """bpfp_ct (a maps.PinnedMap) and the TC path's counters of one pin directory."""

    def __init__(self, ct, pin_dir, snat_port_range: int) -> None:
        self.ct = ct
        self.pin_dir = pin_dir
        self.snat_port_range = snat_port_range
        self.last = FlowTableStats(snat_port_range=snat_port_range)
        self.removed_total = 0

    def _alive(self, key: layout.CtKey, value: layout.CtValue, now: int) -> bool:
        """The flow of this entry is live: the entry, or its partner still pointing back."""
        if value.expires >= now:
            return True
        other = reply_key(key, value)
        partner = layout.CtValue()
        if not bpfsys.map_lookup(self.ct.fd, other, partner):
            return False
        return partner.expires >= now and _same(reply_key(other, partner), key)

    def sweep(self, now: int | None = None) -> FlowTableStats:
        """Remove the entries of finished flows; count the rest. now: CLOCK_MONOTONIC ns,
        the clock of bpf_ktime_get_ns()."""
        started = time.monotonic()
        now = time.monotonic_ns() if now is None else now
        entries = flows = snat = 0
        per_backend: Counter[bytes] = Counter()
        doomed: list[layout.CtKey] = []
        for key, value in self.ct.items():
            entries += 1
            if self._alive(key, value, now):
                if not value.flags & layout.CT_REPLY:
                    flows += 1
                elif value.flags & layout.CT_SNAT:
                    # a reply entry's key: backend -> node address:port
                    snat += 1
                    per_backend[bytes(key)[:32] + bytes(key)[32:34] + bytes(key)[36:37]] += 1
            elif len(doomed) < MAX_DELETES_PER_SWEEP:
                doomed.append(layout.CtKey.from_buffer_copy(key))
        removed = sum(self._remove(key, now) for key in doomed)
        self.removed_total += removed
        self.last = FlowTableStats(
            entries=entries - removed, flows=flows, snat_ports_in_use=snat,
            snat_ports_busiest=max(per_backend.values(), default=0),
            snat_port_range=self.snat_port_range, removed=removed,
            seconds=time.monotonic() - started, finished_unix=time.time(),
            events=self.read_events())
        return self.last

    def _remove(self, key: layout.CtKey, now: int) -> int:
        """Delete key if it is still a finished flow's (the kernel may have reused it)."""
        value = layout.CtValue()
        if not bpfsys.map_lookup(self.ct.fd, key, value) or self._alive(key, value, now):
            return 0
        return int(bpfsys.map_delete(self.ct.fd, key))

    def read_events(self) -> dict[str, int]:
        """bpfp_tc_events summed over the possible CPUs."""
        return {name: count for (program, name), count in read_events(self.pin_dir).items()
                if program == "tc"}
