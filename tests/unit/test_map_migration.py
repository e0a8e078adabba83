"""Carrying map entries from one layout version to the next (agent/datapath/migrate.py),
and reading a map's layout from BTF (agent/datapath/btf.py): pure parts, no kernel."""
from __future__ import annotations

import ctypes
import re
import struct
from pathlib import Path

import pytest

from agent.datapath import btf, layout, migrate
from agent.datapath.migrate import MigrationError, Shape

MAPS_H = Path(__file__).resolve().parents[2] / "bpf" / "maps.h"


def shape(struct_type: type) -> Shape:
    return Shape(layout.struct_fields(struct_type), ctypes.sizeof(struct_type))


def shapes(key: type, value: type) -> tuple[Shape, Shape]:
    return shape(key), shape(value)


class SvcValueGrown(ctypes.Structure):       # what a version 2 could make of svc_value
    _fields_ = [*layout.SvcValue._fields_, ("generation", ctypes.c_uint64)]


class CtValueReordered(ctypes.Structure):     # a field inserted in the middle, one dropped
    _fields_ = [("saddr", layout.Addr6), ("daddr", layout.Addr6), ("zone", ctypes.c_uint32),
                ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16),
                ("svc_id", ctypes.c_uint32), ("expires", ctypes.c_uint64),
                ("flags", ctypes.c_uint32)]


class Revnat4ValueWide(ctypes.Structure):     # port widened: needs a converter
    _fields_ = [("addr", ctypes.c_uint32), ("port", ctypes.c_uint32)]


def convert(table: str, key, value, new_value: type, new_key: type | None = None):
    old = shapes(type(key), type(value))
    new = shapes(new_key or type(key), new_value)
    return migrate.convert_entry(table, 1, bytes(key), bytes(value), old, new)


# --- pin names and versions ---------------------------------------------------------------

@pytest.mark.parametrize("name, want", [
    ("bpfp_svc4_v1", ("bpfp_svc4", 1)),
    ("bpfp_affinity_ext_v12", ("bpfp_affinity_ext", 12)),
    ("bpfp_svc4", None), ("links", None), ("bpfp_svc4_v1.tmp", None), ("svc4_v1", None)])
def test_pin_names_split_into_table_and_version(name, want):
    assert migrate.split_pin(name) == want


def test_this_builds_version_is_the_one_maps_h_declares():
    declared = int(re.search(r"#define BPFP_MAPS_VERSION (\d+)", MAPS_H.read_text()).group(1))
    assert migrate.build_version() == declared


def test_pins_of_other_versions_are_found_newest_first(tmp_path):
    for name in ("bpfp_svc4_v0", "bpfp_svc4_v2", "bpfp_svc4_v1", "bpfp_slot4_v1",
                 "bpfp_gone_v0", "bpfp_ct_v3", "bpfp_ct_v2", "other_v0"):
        (tmp_path / name).touch()
    (tmp_path / "links").mkdir()
    found = migrate.other_pins(tmp_path)       # this build is version 1
    assert found == {"bpfp_svc4": tmp_path / "bpfp_svc4_v2", "bpfp_ct": tmp_path / "bpfp_ct_v3"}
    assert migrate.other_pins(tmp_path / "absent") == {}


def test_a_layout_table_with_mixed_versions_is_refused():
    mixed = {**layout.MAPS, "bpfp_svc4": layout.MapLayout("bpfp_svc4", "bpfp_svc4_v2",
                                                          layout.SvcKey4, layout.SvcValue)}
    with pytest.raises(MigrationError, match="several versions"):
        migrate.build_version(mixed)


# --- converting entries -------------------------------------------------------------------

def test_a_grown_struct_keeps_every_field_and_the_new_one_is_zero():
    key = layout.SvcKey4(0x0A60000A, 0x5000, 6, 1)
    value = layout.SvcValue(7, 3, 2, 10800, 0xFEEDFACE12345678)
    new_key, new_value = convert("bpfp_svc4", key, value, SvcValueGrown)
    assert new_key == bytes(key)
    grown = SvcValueGrown.from_buffer_copy(new_value)
    assert (grown.svc_id, grown.count, grown.flags, grown.affinity_sec, grown.name_hash,
            grown.generation) == (7, 3, 2, 10800, 0xFEEDFACE12345678, 0)


def test_fields_are_matched_by_name_not_position_and_dropped_ones_go():
    key = layout.CtKey(layout.Addr6(1, 0, 0, 0), layout.Addr6(2, 0, 0, 0), 1000, 80, 6, 4, 0)
    value = layout.CtValue(layout.Addr6(3, 0, 0, 0), layout.Addr6(4, 0, 0, 0), 2000, 8080, 9,
                           123456789, layout.CT_REPLY | layout.CT_ESTABLISHED, 77)
    _, raw = convert("bpfp_ct", key, value, CtValueReordered)
    new = CtValueReordered.from_buffer_copy(raw)
    assert (list(new.saddr), list(new.daddr), new.sport, new.dport, new.svc_id, new.expires,
            new.flags, new.zone) == ([3, 0, 0, 0], [4, 0, 0, 0], 2000, 8080, 9, 123456789,
                                     layout.CT_REPLY | layout.CT_ESTABLISHED, 0)


def test_a_field_that_changed_size_needs_a_converter():
    key = layout.Revnat4Key(0xC00C1E, 0x0100000A, 0x901F, 0)
    value = layout.Revnat4Value(0x0A60000A, 0x3500, 0)
    with pytest.raises(MigrationError, match="port is 2 bytes .* 4 in the new one.*CONVERTERS"):
        convert("bpfp_revnat4", key, value, Revnat4ValueWide)


def test_a_converter_reshapes_or_drops_entries(monkeypatch):
    def widen_port(key, value):
        if value["addr"] == bytes(4):
            return None                 # an entry the new version does not want
        return key, {**value, "port": value["port"] + bytes(2)}

    monkeypatch.setitem(migrate.CONVERTERS, ("bpfp_revnat4", 1), widen_port)
    key = layout.Revnat4Key(0xC00C1E, 0x0100000A, 0x901F, 0)
    _, raw = convert("bpfp_revnat4", key, layout.Revnat4Value(0x0A60000A, 0x3500, 0),
                     Revnat4ValueWide)
    assert Revnat4ValueWide.from_buffer_copy(raw).port == 0x3500
    assert convert("bpfp_revnat4", key, layout.Revnat4Value(0, 0x3500, 0),
                   Revnat4ValueWide) is None


def test_padding_in_a_converted_key_is_zero():
    # a hash key compares every byte: garbage in a pad would make a key nobody looks up
    class KeyWithPad(ctypes.Structure):
        _fields_ = [("cookie", ctypes.c_uint64), ("addr", ctypes.c_uint32)]  # 4 pad bytes
    raw = bytes(layout.Revnat4Key(0xABCDEF, 0x0100000A, 0x901F, 0xFFFF))
    old = shapes(layout.Revnat4Key, layout.Revnat4Value)
    new = (shape(KeyWithPad), shape(layout.Revnat4Value))
    new_key, _ = migrate.convert_entry("x", 1, raw, bytes(8), old, new)
    assert new_key == struct.pack("=QI4x", 0xABCDEF, 0x0100000A)


def test_per_cpu_counters_are_converted_cpu_by_cpu():
    class StatsGrown(ctypes.Structure):            # 48 bytes: strides of 8 stay whole
        _fields_ = [*layout.StatsValue._fields_, ("wrong_source", ctypes.c_uint64)]
    cpus = 3
    values = b"".join(bytes(layout.StatsValue(10 * cpu + 1, 10 * cpu + 2, 10 * cpu + 3, 0, 0))
                      for cpu in range(cpus))
    key = bytes(layout.StatsKey(5, 4, 0, 0x5000))
    old = shapes(layout.StatsKey, layout.StatsValue)
    new = shapes(layout.StatsKey, StatsGrown)
    new_key, raw = migrate.convert_per_cpu("bpfp_stats", 1, key, values, old, new, cpus)
    assert new_key == key and len(raw) == 48 * cpus
    got = [StatsGrown.from_buffer_copy(raw, 48 * cpu) for cpu in range(cpus)]
    assert [(g.connections, g.packets, g.bytes, g.wrong_source) for g in got] == [
        (1, 2, 3, 0), (11, 12, 13, 0), (21, 22, 23, 0)]


def test_a_scalar_value_is_one_nameless_field():
    old = shapes(layout.SrcrangeKey, ctypes.c_uint8)
    key = bytes(layout.SrcrangeKey(56, 3, layout.Addr6(0x000010AC, 0, 0, 0)))
    assert migrate.convert_entry("bpfp_srcrange", 1, key, b"\x01", old, old) == (key, b"\x01")


# --- BTF ------------------------------------------------------------------------------------

class _BtfBuilder:
    """Just enough BTF to describe C structs: ints, typedefs, arrays, structs."""

    def __init__(self) -> None:
        self.types: list[bytes] = []
        self.strings = bytearray(b"\0")

    def _name(self, name: str) -> int:
        if not name:
            return 0
        offset = len(self.strings)
        self.strings += name.encode() + b"\0"
        return offset

    def _add(self, data: bytes) -> int:
        self.types.append(data)
        return len(self.types)

    def int(self, name: str, size: int) -> int:
        return self._add(struct.pack("=3I", self._name(name), 1 << 24, size) +
                         struct.pack("=I", size * 8))

    def typedef(self, name: str, target: int) -> int:
        return self._add(struct.pack("=3I", self._name(name), 8 << 24, target))

    def array(self, element: int, count: int, index: int) -> int:
        return self._add(struct.pack("=3I", 0, 3 << 24, 0) +
                         struct.pack("=3I", element, index, count))

    def struct(self, name: str, size: int, members: list[tuple[str, int, int]]) -> int:
        head = struct.pack("=3I", self._name(name), (4 << 24) | len(members), size)
        return self._add(head + b"".join(struct.pack("=3I", self._name(n), t, offset * 8)
                                         for n, t, offset in members))

    def blob(self) -> bytes:
        types = b"".join(self.types)
        header = struct.pack("=HBBI4I", 0xEB9F, 1, 0, 24, 0, len(types), len(types),
                             len(self.strings))
        return header + types + bytes(self.strings)


def test_btf_struct_fields_are_what_the_ctypes_mirror_says():
    b = _BtfBuilder()
    u32 = b.int("unsigned int", 4)
    u16 = b.int("unsigned short", 2)
    be32 = b.typedef("__be32", b.typedef("__u32", u32))
    be16 = b.typedef("__be16", u16)
    addr = b.array(be32, 4, u32)
    backend6 = b.struct("backend6", 20, [("addr", addr, 0), ("port", be16, 16),
                                         ("flags", u16, 18)])
    types = btf.parse(b.blob())
    assert btf.fields(types, backend6) == layout.struct_fields(layout.Backend6)
    assert btf.fields(types, be32) == (("", 0, 4),)
    assert btf.size_of(types, addr) == 16


@pytest.mark.parametrize("blob, message", [
    (b"\0" * 8, "shorter than its header"),
    (struct.pack("=HBBI4I", 0x1234, 1, 0, 24, 0, 0, 0, 1) + b"\0", "not BTF"),
    (struct.pack("=HBBI4I", 0xEB9F, 1, 0, 24, 0, 100, 0, 1), "run past"),
])
def test_bad_btf_is_refused_with_a_reason(blob, message):
    with pytest.raises(btf.BtfError, match=message):
        btf.parse(blob)


def test_a_missing_btf_type_is_an_error_not_a_guess():
    with pytest.raises(btf.BtfError, match="does not exist"):
        btf.fields({}, 7)
