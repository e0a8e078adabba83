"""One range of allocatable values (a service CIDR's addresses, or the node port range)
and who holds each value. Allocation is deterministic from a seed (namespace/name), so
every node's agent reading the same files picks the same values, with linear probing past
values held. Facts from kube-apiserver: ipallocator and portallocator (bitmap)."""
from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from agent.model.types import IPNetwork

# The API server keeps the bottom of a range for values given explicitly and allocates
# from above it first (KEP-3070, KEP-3668: calculateRangeOffset), so a manifest's fixed
# 10.96.0.10 seldom meets an allocated one.
IP_BAND = (16, 256, 16)          # (min, max, step): offset = clamp(size / step)
PORT_BAND = (16, 128, 32)
MAX_IPV6_RANGE = 65536           # the bitmap allocator's cap on an IPv6 range


@dataclass(frozen=True, slots=True)
class Holder:
    key: str                     # "namespace/name" of the Service
    explicit: bool               # given in its manifest (else allocated)


def static_band(size: int, band: tuple[int, int, int]) -> int:
    low, high, step = band
    if size < low:
        return 0
    return max(low, min(high, size // step))


class RangeAllocator:
    """Values first..first+size-1; holders may also hold values outside (an explicit
    address or port outside the range: served as written, never allocated to another)."""

    def __init__(self, first: int, size: int, band: tuple[int, int, int], label: str) -> None:
        self.first, self.size, self.label = first, size, label
        self.static = static_band(size, band)
        self.holders: dict[int, Holder] = {}
        self._inside = 0             # values held inside the range

    @classmethod
    def for_network(cls, network: IPNetwork) -> RangeAllocator:
        """The network's addresses less its network address (and, for IPv4, broadcast)."""
        size = network.num_addresses - (2 if network.version == 4 else 1)
        if network.version == 6:
            size = min(size, MAX_IPV6_RANGE)
        return cls(int(network.network_address) + 1, max(size, 0), IP_BAND, str(network))

    @classmethod
    def for_ports(cls, low: int, high: int) -> RangeAllocator:
        return cls(low, high - low + 1, PORT_BAND, f"{low}-{high}")

    def contains(self, value: int) -> bool:
        return self.first <= value < self.first + self.size

    @property
    def full(self) -> bool:
        return self._inside >= self.size

    def holder(self, value: int) -> Holder | None:
        return self.holders.get(value)

    def hold(self, value: int, holder: Holder) -> None:
        if value not in self.holders and self.contains(value):
            self._inside += 1
        self.holders[value] = holder

    def release(self, value: int, key: str) -> None:
        held = self.holders.get(value)
        if held is not None and held.key == key:
            del self.holders[value]
            if self.contains(value):
                self._inside -= 1

    def allocate(self, seed: str, key: str) -> int | None:
        """A free value for key, the same for the same seed while it is free: from the
        dynamic band above the static one first, then the static band. None: all held."""
        if self.full:
            return None
        start = int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=8).digest(), "big")
        for low, size in ((self.static, self.size - self.static), (0, self.static)):
            for i in range(size):
                value = self.first + low + (start + i) % size
                if value not in self.holders:
                    self.hold(value, Holder(key, explicit=False))
                    return value
        return None


def address_text(version: int, value: int) -> str:
    return str(ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value))
