"""The service maps behind one door: apply planner operations in batches, read state back.

Opens the pinned maps by path (the agent itself never loads BCC) and checks that their
key and value sizes are the ones agent/datapath/layout.py mirrors from bpf/maps.h."""
from __future__ import annotations

import array
import ctypes
import errno
import ipaddress
import itertools
import logging
import operator
import os
import socket
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from agent import planner
from agent.datapath import bpfsys, layout
from agent.model.types import IPAddress, IPNetwork, Protocol
from agent.planner import MapFullError

log = logging.getLogger(__name__)

_PROTOCOLS = {p.number: p for p in Protocol}
_CHUNK = 4096


__all__ = ["BpfServiceMaps", "LayoutError", "MapFullError", "PinnedMap"]
_FULL = (errno.E2BIG, errno.ENOSPC, errno.ENOMEM)     # what a full map answers an insert


class LayoutError(RuntimeError):
    """A pinned map does not have the layout this agent writes."""


def _be32(address: ipaddress.IPv4Address) -> int:
    """An address as the u32 whose memory holds it in network order (ctx->user_ip4)."""
    if address.version != 4:
        raise ValueError(f"{address} is not IPv4: the IPv4 maps cannot hold it")
    return socket.htonl(int(address))


def _from_be32(value: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(socket.ntohl(value))


def _addr6(address: ipaddress.IPv6Address) -> layout.Addr6:
    """An address as the __be32[4] whose memory holds it in network order (ctx->user_ip6)."""
    if address.version != 6:
        raise ValueError(f"{address} is not IPv6: the IPv6 maps cannot hold it")
    return layout.Addr6.from_buffer_copy(address.packed)


def _from_addr6(value: layout.Addr6) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(bytes(value))


class PinnedMap:
    """One pinned map: its fd and layout."""

    def __init__(self, pin_dir: Path, spec: layout.MapLayout) -> None:
        self.spec = spec
        self.path = pin_dir / spec.pin
        self.fd = bpfsys.obj_get(str(self.path))
        info = bpfsys.map_info(self.fd)
        self.max_entries = info["max_entries"]
        want = (ctypes.sizeof(spec.key), ctypes.sizeof(spec.value))
        if (info["key_size"], info["value_size"]) != want:
            os.close(self.fd)
            raise LayoutError(f"pinned map {self.path}: key/value {info['key_size']}/"
                              f"{info['value_size']} bytes, this agent writes {want[0]}/"
                              f"{want[1]}; run `bpfproxy cleanup` and start again")

    def close(self) -> None:
        os.close(self.fd)

    def update(self, keys: list, values: list) -> None:
        for start in range(0, len(keys), _CHUNK):
            k, v = keys[start:start + _CHUNK], values[start:start + _CHUNK]
            self._update_batch((self.spec.key * len(k))(*k), (self.spec.value * len(v))(*v),
                               len(k))

    def update_packed(self, keys: bytearray, values: bytearray) -> None:
        """As update, from entries packed back to back in the map's layout (_pack): the
        batch syscall reads the buffers in place, no ctypes object per entry."""
        key_size, value_size = ctypes.sizeof(self.spec.key), ctypes.sizeof(self.spec.value)
        count = len(keys) // key_size
        for start in range(0, count, _CHUNK):
            n = min(_CHUNK, count - start)
            self._update_batch((self.spec.key * n).from_buffer(keys, start * key_size),
                               (self.spec.value * n).from_buffer(values, start * value_size),
                               n)

    def _update_batch(self, keys, values, count: int) -> None:
        done, err = bpfsys.map_update_batch(self.fd, keys, values, count)
        if err in _FULL:
            raise MapFullError(self.spec.table, f"map {self.spec.table} is full "
                               f"({self.max_entries} entries): {os.strerror(err)}")
        if err:
            raise OSError(err, f"updating {self.spec.table}: {os.strerror(err)}")

    def delete(self, keys: list | bytearray) -> None:
        """BPF_MAP_DELETE_BATCH of key structs, or of keys packed back to back (_pack); a
        key already gone (a crash between the kernel write and our record of it) is
        skipped, not an error."""
        size = ctypes.sizeof(self.spec.key)
        if isinstance(keys, bytearray):
            array = (self.spec.key * (len(keys) // size)).from_buffer(keys)
        else:
            array = (self.spec.key * len(keys))(*keys)
        count, done = len(array), 0
        while done < count:
            deleted, err = bpfsys.map_delete_batch(self.fd, array, count - done, size * done)
            if err == 0:
                return
            if err != errno.ENOENT:
                raise OSError(err, f"deleting from {self.spec.table}: {os.strerror(err)}")
            done += deleted + 1          # deleted were, the next one was absent

    def lookup(self, key):
        value = self.spec.value()
        return value if bpfsys.map_lookup(self.fd, key, value) else None

    def items(self) -> Iterator[tuple[object, object]]:
        """BPF_MAP_LOOKUP_BATCH in bounded chunks."""
        keys = (self.spec.key * _CHUNK)()
        values = (self.spec.value * _CHUNK)()
        for count in bpfsys.lookup_batches(self.fd, keys, values, _CHUNK, self.spec.table):
            for i in range(count):
                yield keys[i], values[i]


class BpfServiceMaps:
    """agent.service_maps.ServiceMaps on the pinned BPF maps under a pin directory: each
    family has its own frontend and slot map, and an op goes to the maps of its address's
    family."""

    def __init__(self, pin_dir: Path) -> None:
        opened: list[PinnedMap] = []
        try:
            for family in (4, 6):
                opened.append(PinnedMap(pin_dir, layout.MAPS[f"bpfp_svc{family}"]))
                opened.append(PinnedMap(pin_dir, layout.MAPS[f"bpfp_slot{family}"]))
        except BaseException:
            for pinned in opened:
                pinned.close()
            raise
        self.svc4, self.slots4, self.svc6, self.slots6 = opened
        self.svc = {4: self.svc4, 6: self.svc6}
        self.pin_dir = pin_dir
        self.slots = {4: self.slots4, 6: self.slots6}

        # read by the stale-socket sweep (its worker threads): opened once, here
        self._revnat = {family: PinnedMap(pin_dir, layout.MAPS[f"bpfp_revnat{family}"])
                        for family in (4, 6)}
        # the TC path's
        self.ranges = PinnedMap(pin_dir, layout.MAPS["bpfp_srcrange"])
        self.maglev = PinnedMap(pin_dir, layout.MAPS["bpfp_maglev"])
        self.ct = PinnedMap(pin_dir, layout.MAPS["bpfp_ct"])
        self.ifaddr = PinnedMap(pin_dir, layout.MAPS["bpfp_ifaddr"])

    def close(self) -> None:
        for pinned in (self.svc4, self.slots4, self.svc6, self.slots6,
                       *self._revnat.values(), self.ranges, self.maglev, self.ct, self.ifaddr):
            pinned.close()

    def socket_service(self, cookie: int, backend: planner.BackendAddr,
                       protocol: Protocol) -> planner.FrontendKey | None:
        """The service address a balanced socket asked for: the socket LB's reverse NAT
        entry for (socket cookie, backend). None for a socket the LB did not balance."""
        address = backend.address
        if address.version == 6 and address.ipv4_mapped:    # AF_INET6 socket, IPv4 peer
            address = address.ipv4_mapped
        if address.version == 4:
            key = layout.Revnat4Key(cookie, _be32(address), socket.htons(backend.port), 0)
            value = self._revnat[4].lookup(key)
            return None if value is None else planner.FrontendKey(
                _from_be32(value.addr), socket.ntohs(value.port), protocol)
        key = layout.Revnat6Key(cookie, _addr6(address), socket.htons(backend.port), 0, 0)
        value = self._revnat[6].lookup(key)
        return None if value is None else planner.FrontendKey(
            _from_addr6(value.addr), socket.ntohs(value.port), protocol)

    def supports(self, family: int, protocol: Protocol) -> bool:
        """IPv4 and IPv6; TCP, UDP and SCTP."""
        return family in (4, 6)

    def capacity(self) -> dict[str, int]:
        """max_entries of the maps the planner budgets (planner.Capacity), as the kernel
        reports them: a map pinned by an earlier agent keeps the size it was made with,
        whatever the flags say now."""
        pinned = (self.svc4, self.slots4, self.svc6, self.slots6, self.ranges, self.maglev)
        return {m.spec.table: m.max_entries for m in pinned}

    def apply(self, ops: Sequence[planner.MapOp]) -> None:
        """Ops are applied in their order; consecutive ops of one kind go in one batch per
        family (the two families' maps are independent of each other)."""
        for kind, group in itertools.groupby(ops, key=type):
            if kind in _TC_OPS:
                _TC_OPS[kind](self, list(group))
                continue
            if kind is planner.PutSlot or kind is planner.DeleteSlot:
                by_family = _split(group, lambda o: o.family)
            else:
                by_family = _split(group, lambda o: o.frontend.address.version)
            for family, batch in by_family.items():
                # each batch packed into one buffer of keys and one of values
                if kind is planner.PutSlot:
                    backend = _BACKEND_ROW[family]
                    self.slots[family].update_packed(
                        _slot_keys(batch),
                        _backend4_values(batch) if family == 4 and _WORDS else
                        _pack(_BACKEND_VALUE[family],
                              [backend(o.backend, o.flags) for o in batch]))
                elif kind is planner.PutFrontend:
                    key = _SVC_KEY_ROW[family]
                    self.svc[family].update_packed(
                        _pack(_SVC_KEY_PACKED[family], [key(o.frontend) for o in batch]),
                        _pack(_SVC_VALUE, [(o.svc_id, o.count, o.flags, o.affinity,
                                            o.name_hash) for o in batch]))
                elif kind is planner.DeleteFrontend:
                    key = _SVC_KEY_ROW[family]
                    self.svc[family].delete(
                        _pack(_SVC_KEY_PACKED[family], [key(o.frontend) for o in batch]))
                elif kind is planner.DeleteSlot:
                    self.slots[family].delete(_slot_keys(batch))

    def read_back(self) -> planner.AppliedState:
        """Rebuild the applied state from the maps alone (how a restarted agent adopts)."""
        frontends, slots = [], []
        for version, svc, slot_map, addr in ((4, self.svc4, self.slots4, _from_be32),
                                             (6, self.svc6, self.slots6, _from_addr6)):
            frontends += [(planner.FrontendKey(addr(k.addr), socket.ntohs(k.port),
                                               _PROTOCOLS.get(k.proto, Protocol.TCP), k.scope),
                           v.svc_id, v.count, v.name_hash, v.affinity_sec, v.flags)
                          for k, v in svc.items()]
            slots += [(k.svc_id, k.slot, version,
                       planner.BackendAddr(addr(v.addr), socket.ntohs(v.port)), v.flags)
                      for k, v in slot_map.items()]
        family = {svc_id: fam for svc_id, _, fam, *_ in slots}
        family.update({svc_id: f.address.version for f, svc_id, *_ in frontends})
        ranges: dict[int, list] = {}
        for k in bpfsys.map_keys(self.ranges.fd, layout.SrcrangeKey):
            ranges.setdefault(k.svc_id, []).append(_range_of(k, family.get(k.svc_id)))
        # rows per id, so that rows a failed sync left (no frontend uses them) are removed
        maglev: dict[int, int] = {}
        for k, _ in self.maglev.items():
            maglev[k.svc_id] = max(maglev.get(k.svc_id, 0), k.row + 1)
        return planner.kernel_state(frontends, slots, ranges, maglev)

    # --- the TC path's maps ------------------------------------------------------------

    def _put_ranges(self, ops: list[planner.PutRange]) -> None:
        for o in ops:       # LPM tries take no batches
            try:
                bpfsys.map_update(self.ranges.fd, _range_key(o.svc_id, o.network),
                                  ctypes.c_uint8(1))
            except OSError as exc:
                if exc.errno not in _FULL:
                    raise
                raise MapFullError(self.ranges.spec.table, f"map {self.ranges.spec.table} "
                                   f"is full ({self.ranges.max_entries} entries)") from exc

    def _delete_ranges(self, ops: list[planner.DeleteRange]) -> None:
        for o in ops:       # already gone (an interrupted write) is fine
            bpfsys.map_delete(self.ranges.fd, _range_key(o.svc_id, o.network))

    def _put_maglev(self, ops: list[planner.PutMaglev]) -> None:
        keys, rows = [], []
        for o in ops:
            for row in range(0, len(o.table), layout.MAGLEV_ROW):
                part = o.table[row:row + layout.MAGLEV_ROW]
                keys.append(layout.MaglevKey(o.svc_id, row // layout.MAGLEV_ROW))
                rows.append(layout.MaglevRow((ctypes.c_uint16 * layout.MAGLEV_ROW)(*part)))
        self.maglev.update(keys, rows)

    def _delete_maglev(self, ops: list[planner.DeleteMaglev]) -> None:
        self.maglev.delete([layout.MaglevKey(o.svc_id, row) for o in ops
                            for row in range(-(-o.size // layout.MAGLEV_ROW))])

    def set_interface_addresses(self, addresses: dict[tuple[int, int], IPAddress]) -> None:
        """(ifindex, family) -> the node's address there: the SNAT source."""
        current = {(k.ifindex, k.family) for k, _ in self.ifaddr.items()}
        if addresses:
            self.ifaddr.update([layout.IfaddrKey(i, f) for i, f in addresses],
                               [layout.IfaddrValue(_addr16(a)) for a in addresses.values()])
        gone = current - set(addresses)
        if gone:
            self.ifaddr.delete([layout.IfaddrKey(i, f) for i, f in gone])

    def forget_counters(self, svc_ids: set[int]) -> int:
        """Delete the counters of service ports that are gone: their ids are reused."""
        stats = PinnedMap(self.pin_dir, layout.MAPS["bpfp_stats"])
        try:
            doomed = [layout.StatsKey.from_buffer_copy(k)
                      for k in bpfsys.map_keys(stats.fd, layout.StatsKey) if k.svc_id in svc_ids]
            if doomed:
                stats.delete(doomed)
            return len(doomed)
        finally:
            stats.close()

    def flows(self) -> Iterator[tuple[layout.CtKey, layout.CtValue]]:
        return self.ct.items()

    def forget_flows(self, lost: dict[int, set[planner.BackendAddr]]) -> int:
        """Delete both entries of every tracked UDP flow whose service port lost its
        backend ({svc_id: backends}): its next datagram picks anew, as kube-proxy's
        conntrack cleanup makes it. Returns the entries deleted."""
        doomed = []
        for key, value in self.ct.items():
            if key.proto != socket.IPPROTO_UDP or value.svc_id not in lost:
                continue
            if value.flags & layout.CT_REPLY:
                backend = planner.BackendAddr(_ct_addr(key.family, key.saddr),
                                              socket.ntohs(key.sport))
            else:
                backend = planner.BackendAddr(_ct_addr(key.family, value.daddr),
                                              socket.ntohs(value.dport))
            if backend in lost[value.svc_id]:
                doomed.append(layout.CtKey.from_buffer_copy(key))
        if doomed:
            self.ct.delete(doomed)
        return len(doomed)

    def room_for(self, map_name: str, entries: int) -> bool:
        """Whether a budgeted map takes `entries` more entries now (a map can refuse below
        its size: memcg ENOMEM): writes that many keys no program looks up (PROBE_SVC_ID,
        PROBE_SCOPE) and removes them again."""
        pinned = {m.spec.table: m for m in (self.svc4, self.slots4, self.svc6, self.slots6,
                                            self.ranges, self.maglev)}.get(map_name)
        if pinned is None or entries <= 0:
            return True
        keys = [_PROBE_KEYS[pinned.spec.key](i) for i in range(entries)]
        try:
            if pinned is self.ranges:       # LPM tries take no batches
                for key in keys:
                    bpfsys.map_update(pinned.fd, key, ctypes.c_uint8(1))
            else:
                pinned.update(keys, [pinned.spec.value() for _ in keys])
        except MapFullError:
            return False
        except OSError as exc:
            if exc.errno not in _FULL:
                raise
            return False
        finally:                    # the ones written; absent ones are no error
            if pinned is self.ranges:
                for key in keys:
                    bpfsys.map_delete(pinned.fd, key)
            else:
                pinned.delete(keys)
        return True


# Keys of probe entries (room_for): no service port has this id, no program builds a
# frontend key with this scope, so no packet ever meets one.
PROBE_SVC_ID = 0xFFFFFFFF
PROBE_SCOPE = 0xFF
_PROBE_KEYS = {
    layout.SvcKey4: lambda i: layout.SvcKey4(i, 0, 0, PROBE_SCOPE),
    layout.SvcKey6: lambda i: layout.SvcKey6(layout.Addr6(0, 0, 0, i), 0, 0, PROBE_SCOPE),
    layout.SlotKey: lambda i: layout.SlotKey(PROBE_SVC_ID, i),
    layout.MaglevKey: lambda i: layout.MaglevKey(PROBE_SVC_ID, i),
    layout.SrcrangeKey: lambda i: layout.SrcrangeKey(32 + 128, PROBE_SVC_ID,
                                                     layout.Addr6(0, 0, 0, i)),
}


def _split(ops: Iterable[planner.MapOp], family_of) -> dict[int, list]:
    """ops by family, each family's in their order."""
    by_family: dict[int, list] = {}
    for op in ops:
        by_family.setdefault(family_of(op), []).append(op)
    return by_family


# ctypes scalar -> struct code; anything else (arrays, nested structs) is raw bytes
_CODES = {ctypes.c_uint8: "B", ctypes.c_uint16: "H", ctypes.c_uint32: "I",
          ctypes.c_uint64: "Q", ctypes.c_int32: "i"}


def _packer(mirrored: type) -> struct.Struct:
    """The struct format of a map's key or value, derived from its ctypes layout (native
    order, its padding spelled out): layout.py stays the one Python copy of maps.h."""
    layout_format, offset = "=", 0
    for name, ctype, *_ in mirrored._fields_:
        field = getattr(mirrored, name)
        if field.offset > offset:
            layout_format += f"{field.offset - offset}x"
        layout_format += _CODES.get(ctype, f"{field.size}s")
        offset = field.offset + field.size
    if ctypes.sizeof(mirrored) > offset:
        layout_format += f"{ctypes.sizeof(mirrored) - offset}x"
    packer = struct.Struct(layout_format)
    if packer.size != ctypes.sizeof(mirrored):
        raise LayoutError(f"{layout_format!r} is {packer.size} bytes, {mirrored.__name__} "
                          f"{ctypes.sizeof(mirrored)}")
    return packer


_SLOT_KEY = _packer(layout.SlotKey)                              # svc_id, slot
_BACKEND_VALUE = {4: _packer(layout.Backend4),                   # addr, port, flags
                  6: _packer(layout.Backend6)}
_SVC_KEY_PACKED = {4: _packer(layout.SvcKey4),                   # addr, port, proto, scope
                   6: _packer(layout.SvcKey6)}
_SVC_VALUE = _packer(layout.SvcValue)     # svc_id, count, flags, affinity, name_hash


def _pack(packer: struct.Struct, rows: list[tuple]) -> bytearray:
    """rows packed back to back: one buffer for a whole batch. Fields a row leaves out at
    its end are zero (as a ctypes constructor leaves them): a layout that grew a field
    still takes this agent's rows."""
    buffer = bytearray(packer.size * len(rows))
    pack_into, size = packer.pack_into, packer.size
    zero = packer.unpack(bytes(size))
    tails = [zero[n:] for n in range(len(zero) + 1)]    # by the row's length
    for i, row in enumerate(rows):
        pack_into(buffer, i * size, *row, *tails[len(row)])
    return buffer


# The two layouts a full sync writes most of (one entry per backend slot) are whole
# 32-bit words: packed through an array of them, no struct call per entry. Checked
# against the layouts' formats, else _pack does it (and test_map_packing holds both to
# the ctypes structs' bytes).
_WORDS = _SLOT_KEY.format == "=II" and _BACKEND_VALUE[4].format == "=IHH" and \
    array.array("I").itemsize == 4
_SLOT_ID = operator.attrgetter("svc_id", "slot")
# Backend4's port and flags (u16 each) as the word they make in native order
_PORT_SHIFT, _FLAGS_SHIFT = (0, 16) if sys.byteorder == "little" else (16, 0)


def _slot_keys(batch: list) -> bytearray:
    """_pack(_SLOT_KEY, (svc_id, slot) of each op): the same bytes."""
    if not _WORDS:
        return _pack(_SLOT_KEY, list(map(_SLOT_ID, batch)))
    return bytearray(array.array("I", itertools.chain.from_iterable(map(_SLOT_ID, batch))))


def _backend4_values(batch: list) -> bytearray:
    """_pack(_BACKEND_VALUE[4], _backend4(...) of each PutSlot): the same bytes; an address
    not IPv4 raises as _be32 does, flags past 16 bits as struct does (struct.error), a port
    past 16 bits as htons does (OverflowError)."""
    htonl, htons, v4 = socket.htonl, socket.htons, ipaddress.IPv4Address
    port_shift, flags_shift = _PORT_SHIFT, _FLAGS_SHIFT
    words = array.array("I")          # each int freed once appended: no list of 400k
    append = words.append
    for o in batch:
        b = o.backend
        address, flags = b.address, o.flags
        append(htonl(address._ip) if address.__class__ is v4 else _be32(address))
        if not 0 <= flags <= 0xFFFF:
            raise struct.error(f"backend flags {flags:#x} do not fit in 16 bits")
        append(htons(b.port) << port_shift | flags << flags_shift)
    return bytearray(words)


def _packed6(address: ipaddress.IPv6Address) -> bytes:
    if address.version != 6:
        raise ValueError(f"{address} is not IPv6: the IPv6 maps cannot hold it")
    return address.packed


def _backend4(b: planner.BackendAddr, flags: int) -> tuple:
    address = b.address     # _be32 inlined: a full sync packs 200k of these at 10k x 10
    if address.__class__ is not ipaddress.IPv4Address:
        return (_be32(address), socket.htons(b.port), flags)      # raises as _be32 does
    return (socket.htonl(address._ip), socket.htons(b.port), flags)


_BACKEND_ROW = {
    4: _backend4,
    6: lambda b, flags: (_packed6(b.address), socket.htons(b.port), flags)}
_SVC_KEY_ROW = {
    4: lambda f: (_be32(f.address), socket.htons(f.port), f.protocol.number, f.scope),
    6: lambda f: (_packed6(f.address), socket.htons(f.port), f.protocol.number, f.scope)}


_TC_OPS = {planner.PutRange: BpfServiceMaps._put_ranges,
           planner.DeleteRange: BpfServiceMaps._delete_ranges,
           planner.PutMaglev: BpfServiceMaps._put_maglev,
           planner.DeleteMaglev: BpfServiceMaps._delete_maglev}


def _addr16(address: IPAddress) -> layout.Addr6:
    """Either family in the TC maps' layout: IPv4 in word 0, the rest zero."""
    return layout.Addr6.from_buffer_copy(address.packed.ljust(16, b"\0"))


def _ct_addr(family: int, value: layout.Addr6) -> IPAddress:
    raw = bytes(value)
    return ipaddress.IPv4Address(raw[:4]) if family == 4 else ipaddress.IPv6Address(raw)


def _range_key(svc_id: int, network: IPNetwork) -> layout.SrcrangeKey:
    return layout.SrcrangeKey(32 + network.prefixlen, svc_id, _addr16(network.network_address))


def _range_of(key: layout.SrcrangeKey, family: int | None) -> IPNetwork:
    """The key names no family: its svc_id's frontends or slots do. Ranges left alone by
    an interrupted delete have neither: IPv4 when the range fits in the first word."""
    raw = bytes(key.addr)
    if family is None:
        family = 4 if key.prefixlen - 32 <= 32 and raw[4:] == bytes(12) else 6
    if family == 4:
        return ipaddress.IPv4Network((raw[:4], key.prefixlen - 32))
    return ipaddress.IPv6Network((raw, key.prefixlen - 32))
