"""Map writes are packed in bulk (issue 16): a batch's keys and values go to the kernel as
one buffer each, byte for byte what the ctypes layouts (agent/datapath/layout.py, mirrored
from bpf/maps.h) hold, with no ctypes object per entry."""
from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from agent.datapath import layout, maps
from agent.model.types import Protocol
from agent.planner import (
    BackendAddr,
    DeleteFrontend,
    DeleteSlot,
    FrontendKey,
    PutFrontend,
    PutSlot,
)

V4, V6 = ipaddress.IPv4Address, ipaddress.IPv6Address


class RecordingMap:
    """A pinned map's write side: what the batch syscalls would be handed, as bytes."""

    def __init__(self, table: str):
        self.spec = layout.MAPS[table]
        self.writes: list[tuple[bytes, bytes]] = []
        self.deletes: list[bytes] = []

    def update_packed(self, keys: bytearray, values: bytearray) -> None:
        self.writes.append((bytes(keys), bytes(values)))

    def delete(self, keys) -> None:
        assert isinstance(keys, bytearray), "keys packed in one buffer"
        self.deletes.append(bytes(keys))


def recording_maps() -> maps.BpfServiceMaps:
    door = maps.BpfServiceMaps.__new__(maps.BpfServiceMaps)   # no pinned maps needed
    door.svc = {4: RecordingMap("bpfp_svc4"), 6: RecordingMap("bpfp_svc6")}
    door.slots = {4: RecordingMap("bpfp_slot4"), 6: RecordingMap("bpfp_slot6")}
    return door


def raw(*structs) -> bytes:
    return b"".join(bytes(s) for s in structs)


def addr6(text: str) -> layout.Addr6:
    return layout.Addr6.from_buffer_copy(V6(text).packed)


def test_a_batch_is_one_buffer_holding_the_layout_structs_bytes():
    door = recording_maps()
    web4 = FrontendKey(V4("10.96.0.10"), 443, Protocol.TCP)
    web6 = FrontendKey(V6("fd00:10:96::a"), 8443, Protocol.UDP, scope=1)
    door.apply([
        PutSlot(4, 7, 0, BackendAddr(V4("10.244.1.2"), 8080), flags=0x3),
        PutSlot(4, 7, 1, BackendAddr(V4("192.168.255.1"), 65535)),
        PutSlot(6, 9, 0, BackendAddr(V6("fd00::1:2"), 53), flags=0x101),
        PutFrontend(web4, 7, 2, name_hash=0x1234_5678_9ABC_DEF0, affinity=10800, flags=5),
        PutFrontend(web6, 9, 1, name_hash=(1 << 64) - 1),
        DeleteFrontend(web4),
        DeleteSlot(4, 7, 1),
        DeleteSlot(6, 9, 0),
    ])
    be32 = lambda text: socket.htonl(int(V4(text)))  # noqa: E731
    assert door.slots[4].writes == [(
        raw(layout.SlotKey(7, 0), layout.SlotKey(7, 1)),
        raw(layout.Backend4(be32("10.244.1.2"), socket.htons(8080), 0x3),
            layout.Backend4(be32("192.168.255.1"), socket.htons(65535), 0)))]
    assert door.slots[6].writes == [(
        raw(layout.SlotKey(9, 0)),
        raw(layout.Backend6(addr6("fd00::1:2"), socket.htons(53), 0x101)))]
    key4 = layout.SvcKey4(be32("10.96.0.10"), socket.htons(443), 6, 0)
    assert door.svc[4].writes == [(
        raw(key4), raw(layout.SvcValue(7, 2, 5, 10800, 0x1234_5678_9ABC_DEF0)))]
    assert door.svc[6].writes == [(
        raw(layout.SvcKey6(addr6("fd00:10:96::a"), socket.htons(8443), 17, 1)),
        raw(layout.SvcValue(9, 1, 0, 0, (1 << 64) - 1)))]
    assert door.svc[4].deletes == [raw(key4)]
    assert door.slots[4].deletes == [raw(layout.SlotKey(7, 1))]
    assert door.slots[6].deletes == [raw(layout.SlotKey(9, 0))]


def test_an_address_of_the_other_family_is_refused():
    door = recording_maps()
    with pytest.raises(ValueError, match="IPv4 maps cannot hold it"):
        door.apply([PutSlot(4, 1, 0, BackendAddr(V6("fd00::1"), 80))])
    with pytest.raises(ValueError, match="IPv6 maps cannot hold it"):
        door.apply([PutSlot(6, 1, 0, BackendAddr(V4("10.0.0.1"), 80))])


def test_slot_batches_packed_as_words_are_the_structs_bytes():
    """A full sync's slot keys and IPv4 backends go through arrays of 32-bit words
    (maps._slot_keys, maps._backend4_values): the bytes _pack and ctypes give, at the
    fields' edges, and a field too wide is refused, not truncated into its neighbour."""
    assert maps._WORDS      # this machine's layouts take the word path
    batch = [PutSlot(4, svc_id, slot, BackendAddr(V4(address), port), flags)
             for svc_id, slot, address, port, flags in (
                 (1, 0, "0.0.0.1", 1, 0), ((1 << 32) - 1, 65535, "255.255.255.255", 65535,
                                          0xFFFF), (70000, 3, "10.244.1.2", 8080, 1))]
    assert bytes(maps._slot_keys(batch)) == raw(*(layout.SlotKey(o.svc_id, o.slot)
                                                  for o in batch))
    assert bytes(maps._backend4_values(batch)) == raw(*(layout.Backend4(
        socket.htonl(int(o.backend.address)), socket.htons(o.backend.port), o.flags)
        for o in batch))
    assert bytes(maps._backend4_values(batch)) == bytes(maps._pack(
        maps._BACKEND_VALUE[4], [maps._backend4(o.backend, o.flags) for o in batch]))
    with pytest.raises(struct.error):
        maps._backend4_values([PutSlot(4, 1, 0, BackendAddr(V4("10.0.0.1"), 80), 0x10000)])
    with pytest.raises(OverflowError):
        maps._slot_keys([PutSlot(4, 1 << 32, 0, BackendAddr(V4("10.0.0.1"), 80))])
