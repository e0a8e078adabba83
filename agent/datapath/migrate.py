"""Carries pinned maps over to a build whose bpf/maps.h changed the layout version, while
the old programs keep serving. Runs in the loader child, around the compile and the swap.

- share_unchanged (before compiling): an old map whose layout this build keeps is pinned
  again under the new name; BCC adopts it, so old and new programs share that one map
  across the swap and nothing it holds (live sockets' reverse NAT, flows) is ever copied.
- fill (after compiling, before attaching): each map whose layout changed was created empty
  by BCC; it is filled from the old one, entry by entry, converted field by field by name
  (CONVERTERS for anything else), so no new program ever sees an empty map.
- finish (after every hook runs the new programs): entries the old programs wrote since the
  fill are copied too, then every pin of another version is removed.
Both copies read each map in batches and write what the new map lacks in batches (a few
syscalls per thousand entries), so the late copy ends soon after the swap.
The old layout comes from the old map's BTF: no build keeps another build's structs."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.datapath import bpfsys, btf, layout

log = logging.getLogger(__name__)

Record = dict[str, bytes]            # a key or value: each field's bytes, by field name
# (old key, old value) -> (new key, new value) by field name, or None to drop the entry.
# Fields the result leaves out are zero; fields the new layout lacks are dropped.
Converter = Callable[[Record, Record], "tuple[Record, Record] | None"]

# (table, the version converted from) -> how its entries change. Tables not listed are
# copied by field name, new fields zero: what a field added to a struct needs.
CONVERTERS: dict[tuple[str, int], Converter] = {}

_PIN = re.compile(r"(bpfp_\w+?)_v(\d+)")
_PER_CPU = bpfsys.PER_CPU_MAP_TYPES
_FULL = (errno.E2BIG, errno.ENOSPC, errno.ENOMEM)
_LPM_TRIE = 11                       # no batch ops: entry by entry (such maps are small)
_WRITE_CHUNK = 4096                  # entries per BPF_MAP_UPDATE_BATCH
# bpf_link_update returns before program runs already under way on other CPUs end (RCU):
# give them this long before the last copy of what old programs wrote
_IN_FLIGHT_SECONDS = 0.05


class MigrationError(RuntimeError):
    """A map cannot be carried over; the old programs and maps stay as they were."""


@dataclass(frozen=True)
class Shape:
    """A key or value layout: its fields and its size in bytes."""
    fields: btf.Fields
    size: int


@dataclass(frozen=True)
class Carried:
    table: str
    old: Path
    new: Path
    shared: bool       # one map under both names: nothing to copy


def split_pin(name: str) -> tuple[str, int] | None:
    """'bpfp_svc4_v1' -> ('bpfp_svc4', 1); None for anything else."""
    match = _PIN.fullmatch(name)
    return (match.group(1), int(match.group(2))) if match else None


def build_version(layouts: Mapping[str, layout.MapLayout] = layout.MAPS) -> int:
    versions = {split_pin(spec.pin)[1] for spec in layouts.values()}
    if len(versions) != 1:
        raise MigrationError(f"layout.MAPS pins carry several versions: {sorted(versions)}")
    return versions.pop()


def other_pins(pin_dir: Path, layouts: Mapping[str, layout.MapLayout] = layout.MAPS
               ) -> dict[str, Path]:
    """table -> its pin of another layout version (the newest, when several are)."""
    ours = build_version(layouts)
    found: dict[str, tuple[int, Path]] = {}
    for pin in sorted(pin_dir.glob("bpfp_*")) if pin_dir.is_dir() else ():
        parsed = split_pin(pin.name)
        if parsed is None or parsed[1] == ours or parsed[0] not in layouts:
            continue
        table, version = parsed
        if table not in found or version > found[table][0]:
            found[table] = (version, pin)
    return {table: pin for table, (_, pin) in found.items()}


def mirrored(spec: layout.MapLayout) -> tuple[Shape, Shape]:
    """This build's key and value layouts, from layout.py (the loader checks them against
    what BCC compiles)."""
    return tuple(Shape(layout.struct_fields(t), ctypes.sizeof(t)) for t in (spec.key, spec.value))


def share_unchanged(pin_dir: Path, layouts: Mapping[str, layout.MapLayout] = layout.MAPS
                    ) -> list[str]:
    """Before compiling: pin each old map whose key and value layouts this build keeps under
    this build's name. Returns the tables shared."""
    shared = []
    for table, old in other_pins(pin_dir, layouts).items():
        new = pin_dir / layouts[table].pin
        if new.exists():
            continue
        key, value = mirrored(layouts[table])
        fd = bpfsys.obj_get(str(old))
        try:
            shape = btf.map_shape(fd)
            if (_shape_of(shape.key, shape.key_size), _shape_of(shape.value, shape.value_size)) \
                    != (key, value):
                continue
            bpfsys.obj_pin(fd, str(new))
        finally:
            os.close(fd)
        shared.append(table)
    if shared:
        log.info("event=maps_carried how=shared to_version=%d maps=%s",
                 build_version(layouts), ",".join(shared))
    return shared


def unshare_retyped(pin_dir: Path, shared: list[str], compiled_types: Mapping[str, int],
                    layouts: Mapping[str, layout.MapLayout] = layout.MAPS) -> list[str]:
    """After compiling: a shared map whose map type this build changed (same fields, say
    hash -> lru_hash) is unpinned from the new name; compile again and it is made anew and
    filled. Returns those tables."""
    retyped = []
    for table in shared:
        new = pin_dir / layouts[table].pin
        fd = bpfsys.obj_get(str(new))
        try:
            pinned_type = btf.map_shape(fd).type
        finally:
            os.close(fd)
        if pinned_type != compiled_types[table]:
            new.unlink()
            retyped.append(table)
            log.info("event=map_not_shared map=%s reason=map_type old=%d new=%d", table,
                     pinned_type, compiled_types[table])
    return retyped


def fill(pin_dir: Path, layouts: Mapping[str, layout.MapLayout] = layout.MAPS
         ) -> list[Carried]:
    """After compiling, before attaching: fill each new map from its old-version pin."""
    carried = []
    for table, old in other_pins(pin_dir, layouts).items():
        new = pin_dir / layouts[table].pin
        with _opened(old) as old_fd, _opened(new) as new_fd:
            old_shape, new_shape = btf.map_shape(old_fd), btf.map_shape(new_fd)
            if old_shape.id == new_shape.id:
                carried.append(Carried(table, old, new, shared=True))
                continue
            copied, present = copy_entries(table, split_pin(old.name)[1], old_fd, old_shape,
                                           new_fd, new_shape)
        carried.append(Carried(table, old, new, shared=False))
        log.info("event=map_carried map=%s from=%s to=%s how=converted entries=%d "
                 "already_there=%d", table, old.name, new.name, copied, present)
    return carried


def finish(pin_dir: Path, carried: list[Carried],
           layouts: Mapping[str, layout.MapLayout] = layout.MAPS) -> list[str]:
    """After the swap: copy what old programs wrote since fill(), then unpin every map of
    another version (the maps themselves go with the last program that used them).
    Returns the pins removed."""
    if any(not c.shared for c in carried):
        time.sleep(_IN_FLIGHT_SECONDS)
    for c in carried:
        if c.shared:
            continue
        with _opened(c.old) as old_fd, _opened(c.new) as new_fd:
            copied, _ = copy_entries(c.table, split_pin(c.old.name)[1], old_fd,
                                     btf.map_shape(old_fd), new_fd, btf.map_shape(new_fd))
        if copied:
            log.info("event=map_carried map=%s late_entries=%d", c.table, copied)
    ours, removed = build_version(layouts), []
    for pin in sorted(pin_dir.glob("bpfp_*")):
        parsed = split_pin(pin.name)
        if parsed is not None and parsed[1] != ours and not pin.is_dir():
            pin.unlink()
            removed.append(pin.name)
    if removed:
        log.info("event=old_pins_removed count=%d pins=%s", len(removed), ",".join(removed))
    return removed


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[int]:
    """A pinned map's fd for a with-block."""
    fd = bpfsys.obj_get(str(path))
    try:
        yield fd
    finally:
        os.close(fd)


def _shape_of(fields: btf.Fields | None, size: int) -> Shape | None:
    return None if fields is None else Shape(fields, size)


# --- converting entries (pure) ---------------------------------------------------------

def unpack(raw: bytes, shape: Shape) -> Record:
    return {name: raw[offset:offset + size] for name, offset, size in shape.fields}


def pack(record: Record, shape: Shape, what: str) -> bytes:
    """Fields by name into a zeroed buffer (padding too: hash keys compare every byte)."""
    out = bytearray(shape.size)
    for name, offset, size in shape.fields:
        value = record.get(name)
        if value is None:
            continue
        if len(value) != size:
            raise MigrationError(f"{what}: field {name or '(value)'} is {len(value)} bytes in "
                                 f"the old layout and {size} in the new one; add a converter "
                                 f"to agent/datapath/migrate.py CONVERTERS")
        out[offset:offset + size] = value
    return bytes(out)


def convert_entry(table: str, version: int, key: bytes, value: bytes,
                  old: tuple[Shape, Shape], new: tuple[Shape, Shape]
                  ) -> tuple[bytes, bytes] | None:
    """One entry from the old layout to the new one; None when the converter drops it."""
    converter = CONVERTERS.get((table, version))
    old_key, old_value = unpack(key, old[0]), unpack(value, old[1])
    if converter is not None:
        converted = converter(old_key, old_value)
        if converted is None:
            return None
        old_key, old_value = converted
    return pack(old_key, new[0], f"{table} key"), pack(old_value, new[1], f"{table} value")


def convert_per_cpu(table: str, version: int, key: bytes, values: bytes,
                    old: tuple[Shape, Shape], new: tuple[Shape, Shape], cpus: int
                    ) -> tuple[bytes, bytes] | None:
    """A per-CPU entry: one value per possible CPU, each padded to 8 bytes."""
    old_stride, new_stride = _stride(old[1].size), _stride(new[1].size)
    new_key, out = None, bytearray()
    for cpu in range(cpus):
        chunk = values[cpu * old_stride:cpu * old_stride + old[1].size]
        converted = convert_entry(table, version, key, chunk, old, new)
        if converted is None:
            return None
        new_key = converted[0]
        out += converted[1].ljust(new_stride, b"\0")
    return new_key, bytes(out)


def _stride(size: int) -> int:
    return (size + 7) // 8 * 8


# --- copying between maps ----------------------------------------------------------------

def copy_entries(table: str, version: int, old_fd: int, old: btf.MapShape, new_fd: int,
                 new: btf.MapShape) -> tuple[int, int]:
    """Insert every converted entry of the old map that the new one lacks (an entry the new
    programs or an earlier, interrupted run wrote is theirs). Returns (copied, present).

    The new map's keys are read in batches and what it lacks is written in batches
    (BPF_MAP_UPDATE_BATCH takes no BPF_NOEXIST): an entry new programs write for one of
    those keys in the moment between that read and the write is replaced by the old one,
    the entry its flow, socket or client started with."""
    if old.key is None or old.value is None:
        raise MigrationError(f"{table}: the old map carries no BTF, so its layout is "
                             f"unknown; run `bpfproxy cleanup` and start again")
    olds = (Shape(old.key, old.key_size), Shape(old.value, old.value_size))
    news = (Shape(new.key, new.key_size), Shape(new.value, new.value_size))
    per_cpu = old.type in _PER_CPU
    cpus = bpfsys.possible_cpus() if per_cpu else 1
    entries = []
    for key, value in _entries(old_fd, old, cpus):
        if per_cpu:
            converted = convert_per_cpu(table, version, key, value, olds, news, cpus)
        else:
            converted = convert_entry(table, version, key, value, olds, news)
        if converted is not None:
            entries.append(converted)
    if new.type == _LPM_TRIE:
        copied = sum(_insert(new_fd, *entry) for entry in entries)
        return copied, len(entries) - copied
    cpus = bpfsys.possible_cpus() if new.type in _PER_CPU else 1
    there = {key for key, _ in _entries(new_fd, new, cpus)} if entries else set()
    missing = [entry for entry in entries if entry[0] not in there]
    return _insert_batched(new_fd, missing), len(entries) - len(missing)


def _insert_batched(fd: int, entries: list[tuple[bytes, bytes]]) -> int:
    """Write entries the map lacks, a chunk per syscall; entry by entry where the map has
    no batch update. Returns how many were written."""
    for start in range(0, len(entries), _WRITE_CHUNK):
        chunk = entries[start:start + _WRITE_CHUNK]
        keys = ctypes.create_string_buffer(b"".join(k for k, _ in chunk))
        values = ctypes.create_string_buffer(b"".join(v for _, v in chunk))
        done, err = bpfsys.map_update_batch(fd, keys, values, len(chunk))
        if err in _FULL:
            raise MigrationError(f"the new map is full: {os.strerror(err)}; raise its size")
        if err in bpfsys.NO_BATCH and done == 0:
            for entry in entries[start:]:
                _insert(fd, *entry)
            return len(entries)
        if err:
            raise OSError(err, f"copying map entries: {os.strerror(err)}")
    return len(entries)


def _insert(fd: int, key: bytes, value: bytes) -> bool:
    """BPF_NOEXIST: False when the key is there already."""
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value,
                                                                                   len(value))
    try:
        bpfsys.map_update(fd, k, v, bpfsys.BPF_NOEXIST)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return False
        if exc.errno in _FULL:
            raise MigrationError(f"the new map is full: {os.strerror(exc.errno)}; raise its "
                                 f"size") from exc
        raise OSError(exc.errno, f"copying a map entry: {os.strerror(exc.errno)}") from exc
    return True


def _entries(fd: int, shape: btf.MapShape, cpus: int) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) as bytes: batch lookups, or key by key for maps without them."""
    value_bytes = _stride(shape.value_size) * cpus if shape.type in _PER_CPU \
        else shape.value_size
    try:
        for keys, values, count in bpfsys.raw_batches(fd, shape.key_size, value_bytes,
                                                      f"map {shape.id}"):
            raw_keys, raw_values = keys.raw, values.raw
            for i in range(count):
                yield (raw_keys[i * shape.key_size:(i + 1) * shape.key_size],
                       raw_values[i * value_bytes:(i + 1) * value_bytes])
        return
    except OSError as exc:
        if exc.errno not in bpfsys.NO_BATCH:
            raise
    # LPM tries have no batch lookup
    for key in bpfsys.map_keys(fd, ctypes.c_char * shape.key_size):
        value = ctypes.create_string_buffer(max(value_bytes, 1))
        if bpfsys.map_lookup(fd, key, value):
            yield bytes(key), value.raw[:value_bytes]
