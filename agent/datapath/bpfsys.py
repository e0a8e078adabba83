"""bpf(2) operations BCC does not offer (links, pins, queries, batches), through Debian's libbpf.

Thin ctypes wrappers that raise OSError with the errno; nothing here knows our layouts. The
process's one libbpf handle: every prototype is declared here, once."""
from __future__ import annotations

import ctypes
import ctypes.util
import enum
import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path

_libbpf = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)

_libbpf.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_libbpf.bpf_link_update.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_libbpf.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
_libbpf.bpf_obj_get.argtypes = [ctypes.c_char_p]
_libbpf.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p,
                                           ctypes.POINTER(ctypes.c_uint32)]
_libbpf.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
_libbpf.bpf_btf_get_fd_by_id.argtypes = [ctypes.c_uint32]
_libbpf.bpf_map_update_batch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
_libbpf.bpf_map_delete_batch.argtypes = [ctypes.c_int, ctypes.c_void_p,
                                         ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
_libbpf.bpf_map_lookup_batch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
_libbpf.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libbpf.bpf_map_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_uint64]
_libbpf.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libbpf.bpf_map_get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libbpf.bpf_prog_query.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint32,
                                   ctypes.POINTER(ctypes.c_uint32),
                                   ctypes.POINTER(ctypes.c_uint32),
                                   ctypes.POINTER(ctypes.c_uint32)]


# enum bpf_map_type values whose lookups return one value per possible CPU
PER_CPU_MAP_TYPES = frozenset({5, 6, 10})      # percpu_hash, percpu_array, lru_percpu_hash
ENOTSUPP = 524                  # the kernel's internal "not supported" (no batch ops)
NO_BATCH = (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP)   # what a map without batch ops says
BPF_NOEXIST = 1                 # map_update flag: only when the key is absent


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """How many values a per-CPU map lookup returns: one per possible CPU ("0-3,6")."""
    count = 0
    for part in Path(path).read_text().strip().split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


class AttachType(enum.IntEnum):
    """enum bpf_attach_type values of the cgroup hooks we use (uapi/linux/bpf.h)."""
    CGROUP_INET4_CONNECT = 10
    CGROUP_INET6_CONNECT = 11
    CGROUP_UDP4_SENDMSG = 14
    CGROUP_UDP6_SENDMSG = 15
    CGROUP_UDP4_RECVMSG = 19
    CGROUP_UDP6_RECVMSG = 20
    CGROUP_INET4_GETPEERNAME = 29
    CGROUP_INET6_GETPEERNAME = 30
    CGROUP_INET_SOCK_RELEASE = 34
    XDP = 37
    TCX_INGRESS = 46
    TCX_EGRESS = 47


def _check(ret: int, what: str) -> int:
    if ret < 0:
        # libbpf returns -errno and also sets errno
        err = -ret if ret != -1 else ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class _LinkCreateOpts(ctypes.Structure):
    """The head of libbpf's struct bpf_link_create_opts: its size, then flags."""
    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


# XDP attach flags (uapi/linux/if_link.h): the driver's own XDP, never the generic one
XDP_FLAGS_DRV_MODE = 1 << 2


def link_create(prog_fd: int, target_fd: int, attach_type: AttachType, flags: int = 0) -> int:
    opts = _LinkCreateOpts(ctypes.sizeof(_LinkCreateOpts), flags) if flags else None
    return _check(_libbpf.bpf_link_create(prog_fd, target_fd, int(attach_type),
                                          ctypes.byref(opts) if opts else None),
                  f"bpf_link_create({attach_type.name})")


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """Atomically swap the program behind a link: no moment without a program."""
    _check(_libbpf.bpf_link_update(link_fd, new_prog_fd, None), "bpf_link_update")


def obj_pin(fd: int, path: str) -> None:
    _check(_libbpf.bpf_obj_pin(fd, path.encode()), f"bpf_obj_pin({path})")


def obj_get(path: str) -> int:
    return _check(_libbpf.bpf_obj_get(path.encode()), f"bpf_obj_get({path})")


def map_update_batch(fd: int, keys, values, count: int) -> tuple[int, int]:
    """BPF_MAP_UPDATE_BATCH of ctypes arrays; returns how many were written before any
    error, and the errno (0 when all were)."""
    n = ctypes.c_uint32(count)
    ret = _libbpf.bpf_map_update_batch(fd, ctypes.byref(keys), ctypes.byref(values),
                                       ctypes.byref(n), None)
    return n.value, (0 if ret == 0 else (-ret if ret < -1 else ctypes.get_errno()))


def map_delete_batch(fd: int, keys, count: int, offset_bytes: int = 0) -> tuple[int, int]:
    """BPF_MAP_DELETE_BATCH from keys (skipping offset_bytes); (deleted, errno)."""
    n = ctypes.c_uint32(count)
    ret = _libbpf.bpf_map_delete_batch(fd, ctypes.byref(keys, offset_bytes), ctypes.byref(n),
                                       None)
    return n.value, (0 if ret == 0 else (-ret if ret < -1 else ctypes.get_errno()))


def map_lookup_batch(fd: int, token, first: bool, keys, values, count: int) -> tuple[int, int]:
    """One BPF_MAP_LOOKUP_BATCH step; (entries read, errno: ENOENT at the end)."""
    n = ctypes.c_uint32(count)
    ret = _libbpf.bpf_map_lookup_batch(fd, None if first else ctypes.byref(token),
                                       ctypes.byref(token), ctypes.byref(keys),
                                       ctypes.byref(values), ctypes.byref(n), None)
    return n.value, (0 if ret == 0 else (-ret if ret < -1 else ctypes.get_errno()))


def lookup_batches(fd: int, keys, values, count: int, what: str) -> Iterator[int]:
    """The whole map, by BPF_MAP_LOOKUP_BATCH into keys and values (ctypes arrays of count
    entries, refilled for each batch): yields how many entries each batch holds. Maps
    without batch lookup raise OSError (errno in NO_BATCH); what names the map in errors."""
    # the position token: a u32 for hash maps, a whole key for the kernel's generic batch
    # code (arrays, LPM tries)
    token = ctypes.create_string_buffer(max(8, ctypes.sizeof(keys) // count))
    first = True
    while True:
        done, err = map_lookup_batch(fd, token, first, keys, values, count)
        if done:
            yield done
        if err == errno.ENOENT:
            return
        if err:
            raise OSError(err, f"reading {what}: {os.strerror(err)}")
        first = False


def raw_batches(fd: int, key_size: int, value_size: int, what: str, count: int = 4096
                ) -> Iterator[tuple[ctypes.Array, ctypes.Array, int]]:
    """lookup_batches into byte buffers: (keys, values, entries) per batch, for callers
    that know the map's sizes but not its layout (per-CPU: value_size covers every CPU)."""
    keys = ctypes.create_string_buffer(key_size * count)
    values = ctypes.create_string_buffer(max(value_size, 1) * count)
    for done in lookup_batches(fd, keys, values, count, what):
        yield keys, values, done


def map_lookup(fd: int, key, value) -> bool:
    """BPF_MAP_LOOKUP_ELEM into value; False when the key is absent."""
    return _libbpf.bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value)) == 0


def map_update(fd: int, key, value, flags: int = 0) -> None:
    """flags BPF_NOEXIST: OSError(EEXIST) when the key is there already."""
    _check(_libbpf.bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), flags),
           "bpf_map_update_elem")


def map_delete(fd: int, key) -> bool:
    """False when the key was already gone."""
    return _libbpf.bpf_map_delete_elem(fd, ctypes.byref(key)) == 0


def map_keys(fd: int, key_type) -> list:
    """Every key, one BPF_MAP_GET_NEXT_KEY at a time: for maps without batch lookups (LPM
    tries), which are small."""
    keys, current = [], None
    while True:
        nxt = key_type()
        if _libbpf.bpf_map_get_next_key(fd, None if current is None else ctypes.byref(current),
                                        ctypes.byref(nxt)) != 0:
            return keys
        keys.append(nxt)
        current = nxt


def obj_info(fd: int, buffer) -> int:
    """BPF_OBJ_GET_INFO_BY_FD into buffer (which may hold pointers the kernel fills, as
    struct bpf_btf_info's); returns the length the kernel wrote."""
    length = ctypes.c_uint32(ctypes.sizeof(buffer))
    _check(_libbpf.bpf_obj_get_info_by_fd(fd, ctypes.byref(buffer), ctypes.byref(length)),
           "bpf_obj_get_info_by_fd")
    return length.value


def _info(fd: int, size: int = 256) -> bytes:
    buf = ctypes.create_string_buffer(size)
    length = obj_info(fd, buf)
    return buf.raw[:length]


def btf_get_fd_by_id(btf_id: int) -> int:
    return _check(_libbpf.bpf_btf_get_fd_by_id(btf_id), f"BTF {btf_id}")


def link_cgroup_id(link_fd: int) -> int:
    """struct bpf_link_info: type, id, prog_id, then (8-aligned) cgroup.cgroup_id."""
    info = _info(link_fd)
    return struct.unpack_from("=Q", info, 16)[0]


def link_program_id(link_fd: int) -> int:
    """struct bpf_link_info: type, id, then prog_id."""
    return struct.unpack_from("=I", _info(link_fd, 64), 8)[0]


def link_ifindex(link_fd: int) -> int:
    """A tcx or XDP link's device: bpf_link_info's tcx.ifindex (xdp.ifindex, the same
    place), after type, id and prog_id."""
    return struct.unpack_from("=I", _info(link_fd), 16)[0]


def map_info(map_fd: int) -> dict[str, int]:
    """The fields of struct bpf_map_info that describe a map's layout."""
    map_type, map_id, key_size, value_size, max_entries, map_flags = \
        struct.unpack_from("=6I", _info(map_fd))
    return {"type": map_type, "id": map_id, "key_size": key_size,
            "value_size": value_size, "max_entries": max_entries, "flags": map_flags}


def program_ids(target: int, attach_type: AttachType) -> list[int]:
    """BPF_PROG_QUERY: ids of the programs attached to target (a cgroup's fd; for tcx, the
    interface's index) at one hook."""
    ids = (ctypes.c_uint32 * 64)()
    count = ctypes.c_uint32(64)
    flags = ctypes.c_uint32(0)
    _check(_libbpf.bpf_prog_query(target, int(attach_type), 0, ctypes.byref(flags), ids,
                                  ctypes.byref(count)), f"bpf_prog_query({attach_type.name})")
    return list(ids[:count.value])


def cgroup_program_ids(cgroup_dir: str, attach_type: AttachType) -> list[int]:
    """Ids of the programs attached directly to a cgroup for one hook."""
    fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return program_ids(fd, attach_type)
    finally:
        os.close(fd)


def program_name(prog_id: int) -> str:
    """struct bpf_prog_info.name (16 bytes at offset 64); "" when the program is gone."""
    ret = _libbpf.bpf_prog_get_fd_by_id(prog_id)
    if ret < 0:
        return ""
    try:
        return _info(ret)[64:80].split(b"\0", 1)[0].decode()
    finally:
        os.close(ret)


def cgroup_id(cgroup_dir: str) -> int:
    """The kernel's cgroup id is the inode number of its cgroup2 directory."""
    return os.stat(cgroup_dir).st_ino
