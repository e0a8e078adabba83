"""A pinned map's layout as the kernel describes it: its type, sizes, and the fields of its
key and value (name, offset, size) from the BTF that BCC loaded with the map.

How a new build reads maps an older build wrote without carrying the older build's code."""
from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass

from agent.datapath import bpfsys

Fields = tuple[tuple[str, int, int], ...]      # (name, offset, size), as layout.struct_fields

_MAGIC = 0xEB9F
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM = 1, 2, 3, 4, 5, 6
_ALIASES = {8, 9, 10, 11, 18}       # typedef, volatile, const, restrict, type_tag
# bytes after each 12-byte struct btf_type, by kind: (fixed, per vlen item)
_TRAILER = {_INT: (4, 0), _ARRAY: (12, 0), _STRUCT: (0, 12), _UNION: (0, 12), _ENUM: (0, 8),
            13: (0, 8), 14: (4, 0), 15: (0, 12), 17: (4, 0), 19: (0, 12)}


class BtfError(ValueError):
    """BTF we cannot read: the map's layout stays unknown."""


@dataclass(frozen=True)
class BtfType:
    kind: int
    name: str
    size_or_type: int                 # size for ints, structs, enums; else the type it wraps
    array: tuple[int, int] = (0, 0)   # (element type, count) of an array
    members: tuple[tuple[str, int, int], ...] = ()   # (name, type, bit offset) of a struct
    bitfields: bool = False


def parse(raw: bytes) -> dict[int, BtfType]:
    """Type id -> type, from a BTF blob (ids start at 1; 0 is void)."""
    if len(raw) < 24:
        raise BtfError(f"BTF blob of {len(raw)} bytes is shorter than its header")
    magic, _version, _flags, hdr_len = struct.unpack_from("=HBBI", raw)
    if magic != _MAGIC:
        raise BtfError(f"not BTF (magic {magic:#x})")
    type_off, type_len, str_off, str_len = struct.unpack_from("=4I", raw, 8)
    at, end, strings_at = hdr_len + type_off, hdr_len + type_off + type_len, hdr_len + str_off
    if end > len(raw) or strings_at + str_len > len(raw):
        raise BtfError("BTF sections run past the blob")
    strings = raw[strings_at:strings_at + str_len]

    def name(offset: int) -> str:
        return strings[offset:strings.index(b"\0", offset)].decode() if offset else ""

    types: dict[int, BtfType] = {}
    while at + 12 <= end:
        name_off, info, size_or_type = struct.unpack_from("=3I", raw, at)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        fixed, per_item = _TRAILER.get(kind, (0, 0))
        trailer = at + 12
        array, members = (0, 0), ()
        if kind == _ARRAY:
            element, _index, count = struct.unpack_from("=3I", raw, trailer)
            array = (element, count)
        elif kind in (_STRUCT, _UNION):
            members = tuple((name(n), t, off) for n, t, off in
                            (struct.unpack_from("=3I", raw, trailer + 12 * i)
                             for i in range(vlen)))
        types[len(types) + 1] = BtfType(kind, name(name_off), size_or_type, array, members,
                                        bool(info >> 31))
        at = trailer + fixed + vlen * per_item
    return types


def _resolve(types: dict[int, BtfType], type_id: int) -> BtfType:
    """Through typedefs and qualifiers to the type they name."""
    for _ in range(64):
        t = types.get(type_id)
        if t is None:
            raise BtfError(f"BTF type {type_id} does not exist")
        if t.kind not in _ALIASES:
            return t
        type_id = t.size_or_type
    raise BtfError(f"BTF type {type_id}: typedefs loop")


def size_of(types: dict[int, BtfType], type_id: int) -> int:
    t = _resolve(types, type_id)
    if t.kind == _ARRAY:
        return t.array[1] * size_of(types, t.array[0])
    return 8 if t.kind == _PTR else t.size_or_type


def fields(types: dict[int, BtfType], type_id: int) -> Fields:
    """A struct's fields; a scalar is one nameless field, as layout.struct_fields gives it."""
    t = _resolve(types, type_id)
    if t.kind not in (_STRUCT, _UNION):
        return (("", 0, size_of(types, type_id)),)
    out = []
    for member, member_type, offset in t.members:
        if t.bitfields and offset >> 24:
            raise BtfError(f"{t.name}.{member} is a bitfield: field copies need whole bytes")
        out.append((member, (offset & 0xFFFFFF) // 8, size_of(types, member_type)))
    return tuple(out)


# --- reading it from the kernel --------------------------------------------------------

@dataclass(frozen=True)
class MapShape:
    """What a map is, as the kernel reports it; fields are None when it has no BTF."""
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    key: Fields | None
    value: Fields | None


def map_shape(map_fd: int) -> MapShape:
    """struct bpf_map_info: type, id, sizes, max_entries, flags at 0; btf_id, btf_key_type_id
    and btf_value_type_id at 64."""
    info = ctypes.create_string_buffer(256)
    bpfsys.obj_info(map_fd, info)
    map_type, map_id, key_size, value_size, max_entries, flags = \
        struct.unpack_from("=6I", info.raw)
    btf_id, key_type, value_type = struct.unpack_from("=3I", info.raw, 64)
    key = value = None
    if btf_id and key_type and value_type:
        types = parse(_btf_blob(btf_id))
        key, value = fields(types, key_type), fields(types, value_type)
    return MapShape(map_id, map_type, key_size, value_size, max_entries, flags, key, value)


def _btf_blob(btf_id: int) -> bytes:
    """struct bpf_btf_info {u64 btf; u32 btf_size; ...}: asked once for the size, then
    for the bytes."""
    fd = bpfsys.btf_get_fd_by_id(btf_id)
    try:
        info = ctypes.create_string_buffer(32)
        bpfsys.obj_info(fd, info)
        size = struct.unpack_from("=I", info.raw, 8)[0]
        blob = ctypes.create_string_buffer(size)
        info = ctypes.create_string_buffer(32)
        struct.pack_into("=QI", info, 0, ctypes.addressof(blob), size)
        bpfsys.obj_info(fd, info)
        return blob.raw
    finally:
        os.close(fd)
