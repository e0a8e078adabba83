"""The service maps behind one door: apply planner operations in batches, read state back.

Keys and values are the ctypes structs BCC derives from bpf/maps.h, so the Python side
can never disagree with the C layout."""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import itertools
import logging
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from typing import Protocol as TypingProtocol

from agent.model.types import Protocol
from agent.planner import (
    AppliedState,
    BackendAddr,
    DeleteFrontend,
    DeleteSlot,
    FrontendKey,
    MapOp,
    PutFrontend,
    PutSlot,
    kernel_state,
)

log = logging.getLogger(__name__)

_PROTOCOLS = {p.number: p for p in Protocol}
_READ_CHUNK = 4096


class MapFullError(RuntimeError):
    """A map has no room left: raise its size (--max-* flags) or shrink the cluster."""


class ServiceMaps(TypingProtocol):
    def apply(self, ops: Sequence[MapOp]) -> None: ...
    def read_back(self) -> AppliedState: ...
    def supports(self, family: int, protocol: Protocol) -> bool: ...


def _be32(address: ipaddress.IPv4Address) -> int:
    """An address as the u32 whose memory holds it in network order (ctx->user_ip4)."""
    if address.version != 4:
        raise ValueError(f"{address} is not IPv4: the IPv4 maps cannot hold it")
    return int.from_bytes(address.packed, sys.byteorder)


def _from_be32(value: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(value.to_bytes(4, sys.byteorder))


class BpfServiceMaps:
    """ServiceMaps on the pinned BPF maps of a compiled datapath."""

    def __init__(self, bpf) -> None:
        self.svc = bpf[b"bpfp_svc4"]
        self.slots = bpf[b"bpfp_slot4"]
        self._names = {id(self.svc): "bpfp_svc4", id(self.slots): "bpfp_slot4"}

    def supports(self, family: int, protocol: Protocol) -> bool:
        """IPv4 TCP and UDP today (the socket programs leave other protocols alone)."""
        return family == 4 and protocol in (Protocol.TCP, Protocol.UDP)

    # --- writes -----------------------------------------------------------------------

    def apply(self, ops: Sequence[MapOp]) -> None:
        """Ops are applied in their order; consecutive ops of one kind go in one batch."""
        for kind, group in itertools.groupby(ops, key=type):
            batch = list(group)
            if kind is PutSlot:
                self._update(self.slots, [self._slot_key(o.svc_id, o.slot) for o in batch],
                             [self._backend(o.backend) for o in batch])
            elif kind is PutFrontend:
                self._update(self.svc, [self._svc_key(o.frontend) for o in batch],
                             [self._svc_value(o) for o in batch])
            elif kind is DeleteFrontend:
                self._delete(self.svc, [self._svc_key(o.frontend) for o in batch])
            elif kind is DeleteSlot:
                self._delete(self.slots, [self._slot_key(o.svc_id, o.slot) for o in batch])

    def _update(self, table, keys: list, values: list) -> None:
        for start in range(0, len(keys), _READ_CHUNK):
            k = keys[start:start + _READ_CHUNK]
            v = values[start:start + _READ_CHUNK]
            ct_keys = (table.Key * len(k))(*k)
            ct_values = (table.Leaf * len(v))(*v)
            count = ctypes.c_uint32(len(k))
            from bcc.libbcc import lib
            if lib.bpf_update_batch(table.map_fd, ctypes.byref(ct_keys),
                                    ctypes.byref(ct_values), ctypes.byref(count)) != 0:
                err = ctypes.get_errno()
                if err in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
                    raise MapFullError(f"map {self._names[id(table)]} is full "
                                       f"({table.max_entries} entries): {os.strerror(err)}")
                raise OSError(err, f"updating {self._names[id(table)]}: {os.strerror(err)}")

    def _delete(self, table, keys: list) -> None:
        """BPF_MAP_DELETE_BATCH; a key already gone (a crash between the kernel write and
        our record of it) is skipped, not an error."""
        from bcc.libbcc import lib
        ct_keys = (table.Key * len(keys))(*keys)
        done = 0
        while done < len(keys):
            count = ctypes.c_uint32(len(keys) - done)
            ref = ctypes.byref(ct_keys, ctypes.sizeof(table.Key) * done)
            if lib.bpf_delete_batch(table.map_fd, ref, ctypes.byref(count)) == 0:
                return
            err = ctypes.get_errno()
            if err != errno.ENOENT:
                raise OSError(err, f"deleting from {self._names[id(table)]}: {os.strerror(err)}")
            done += count.value + 1        # count were deleted, the next one was absent

    # --- reads ------------------------------------------------------------------------

    def read_back(self) -> AppliedState:
        """Rebuild the applied state from the maps alone (how a restarted agent adopts)."""
        frontends = ((FrontendKey(_from_be32(k.addr), socket.ntohs(k.port),
                                  _PROTOCOLS.get(k.proto, Protocol.TCP)), v.svc_id, v.count)
                     for k, v in _read_all(self.svc))
        slots = ((k.svc_id, k.slot, 4, BackendAddr(_from_be32(v.addr), socket.ntohs(v.port)))
                 for k, v in _read_all(self.slots))
        return kernel_state(frontends, slots)

    # --- conversions ------------------------------------------------------------------

    def _svc_key(self, f: FrontendKey):
        return self.svc.Key(addr=_be32(f.address), port=socket.htons(f.port),
                            proto=f.protocol.number, scope=0)

    def _svc_value(self, op: PutFrontend):
        return self.svc.Leaf(svc_id=op.svc_id, count=op.count, flags=0, affinity_sec=0)

    def _slot_key(self, svc_id: int, slot: int):
        return self.slots.Key(svc_id=svc_id, slot=slot)

    def _backend(self, b: BackendAddr):
        return self.slots.Leaf(addr=_be32(b.address), port=socket.htons(b.port), pad=0)


def _read_all(table) -> Iterator[tuple[object, object]]:
    """BPF_MAP_LOOKUP_BATCH in bounded chunks (BCC's version allocates max_entries)."""
    from bcc.libbcc import lib
    keys = (table.Key * _READ_CHUNK)()
    values = (table.Leaf * _READ_CHUNK)()
    token = ctypes.c_uint32(0)
    first = True
    while True:
        count = ctypes.c_uint32(_READ_CHUNK)
        res = lib.bpf_lookup_batch(table.map_fd, None if first else ctypes.byref(token),
                                   ctypes.byref(token), ctypes.byref(keys),
                                   ctypes.byref(values), ctypes.byref(count))
        err = ctypes.get_errno() if res != 0 else 0
        for i in range(count.value):
            yield keys[i], values[i]
        if res != 0:
            if err == errno.ENOENT:
                return
            raise OSError(err, f"reading map {table.map_fd}: {os.strerror(err)}")
        first = False
