"""The map layouts of bpf/maps.h as ctypes structures, for the agent's map writer.

The agent never loads BCC itself (its compiler is a separate process), so these mirror the
C structs; the loader compares them field by field with what BCC compiles. bpf/maps.h is
the source of everything here: tests/unit/test_datapath_config.py checks the map names,
pins and sizes, the flags and the event slots against it."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from agent.datapath.config import DatapathConfig
from agent.planner.kernel import MAGLEV_ROW


def struct_fields(struct: type) -> tuple[tuple[str, int, int], ...]:
    """(name, offset, size) of each field, what must agree between C and Python; a scalar
    value (ctypes.c_uint8) is one nameless field."""
    if not hasattr(struct, "_fields_"):
        return (("", 0, ctypes.sizeof(struct)),)
    return tuple((name, getattr(struct, name).offset, getattr(struct, name).size)
                 for name, *_ in struct._fields_)


class SvcKey4(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32), ("port", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("scope", ctypes.c_uint8)]


class SvcValue(ctypes.Structure):
    _fields_ = [("svc_id", ctypes.c_uint32), ("count", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("affinity_sec", ctypes.c_uint32),
                ("name_hash", ctypes.c_uint64)]


class SlotKey(ctypes.Structure):
    _fields_ = [("svc_id", ctypes.c_uint32), ("slot", ctypes.c_uint32)]


class Backend4(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32), ("port", ctypes.c_uint16),
                ("flags", ctypes.c_uint16)]     # planner.BE_* (bpf/maps.h BPFP_BE_*)


class Revnat4Key(ctypes.Structure):
    _fields_ = [("cookie", ctypes.c_uint64), ("addr", ctypes.c_uint32),
                ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class Revnat4Value(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


# IPv6 addresses as bpf/maps.h holds them: __be32[4], the bytes of the address in network
# order (what ctx->user_ip6 holds). from_buffer_copy(address.packed) writes one, bytes()
# reads it back.
Addr6 = ctypes.c_uint32 * 4


class SvcKey6(ctypes.Structure):
    _fields_ = [("addr", Addr6), ("port", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("scope", ctypes.c_uint8)]


class Backend6(ctypes.Structure):
    _fields_ = [("addr", Addr6), ("port", ctypes.c_uint16), ("flags", ctypes.c_uint16)]


class Revnat6Key(ctypes.Structure):
    _fields_ = [("cookie", ctypes.c_uint64), ("addr", Addr6), ("port", ctypes.c_uint16),
                ("pad", ctypes.c_uint16), ("pad2", ctypes.c_uint32)]


class Revnat6Value(ctypes.Structure):
    _fields_ = [("addr", Addr6), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


# bpfp_sock_revnat: each socket's own reverse NAT entries (socket-local storage, key an int).
# Only the programs read it (userspace needs the socket's fd): mirrored for the loader's
# layout check, not in MAPS (BCC has no table class for it, and nothing copies it).
SOCK_REVNATS = 8                # BPFP_SOCK_REVNATS


class SockRevnat(ctypes.Structure):
    _fields_ = [("backend", Addr6), ("service", Addr6), ("backend_port", ctypes.c_uint16),
                ("service_port", ctypes.c_uint16), ("family", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 3)]


class SockRevnats(ctypes.Structure):
    _fields_ = [("entry", SockRevnat * SOCK_REVNATS), ("next", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


# bpfp_sock_events slots: what the socket LB could not keep, in slot order, named as the API
# reports them: slot i is BPFP_SOCKEV_<SOCK_EVENTS[i] in capitals>
SOCK_EVENTS = ("revnat_failed", "no_socket_storage", "revnat_replaced")
SOCK_EVENT_SLOTS = 8            # BPFP_SOCKEV_SLOTS


class AffinityKey(ctypes.Structure):
    _fields_ = [("client", ctypes.c_uint64), ("svc_id", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


class AffinityValue(ctypes.Structure):
    _fields_ = [("last_ns", ctypes.c_uint64), ("slot", ctypes.c_uint32),
                ("pad", ctypes.c_uint32), ("addr", Addr6), ("port", ctypes.c_uint16),
                ("pad2", ctypes.c_uint16), ("pad3", ctypes.c_uint32)]


class StatsKey(ctypes.Structure):
    _fields_ = [("svc_id", ctypes.c_uint32), ("family", ctypes.c_uint8),
                ("pad", ctypes.c_uint8), ("port", ctypes.c_uint16), ("addr", Addr6)]


class StatsValue(ctypes.Structure):
    """One CPU's counters; a lookup returns one of these per possible CPU."""
    _fields_ = [("connections", ctypes.c_uint64), ("packets", ctypes.c_uint64),
                ("bytes", ctypes.c_uint64), ("refused", ctypes.c_uint64),
                ("dropped", ctypes.c_uint64)]


class CtKey(ctypes.Structure):
    _fields_ = [("saddr", Addr6), ("daddr", Addr6), ("sport", ctypes.c_uint16),
                ("dport", ctypes.c_uint16), ("proto", ctypes.c_uint8),
                ("family", ctypes.c_uint8), ("pad", ctypes.c_uint16)]


class CtValue(ctypes.Structure):
    _fields_ = [("saddr", Addr6), ("daddr", Addr6), ("sport", ctypes.c_uint16),
                ("dport", ctypes.c_uint16), ("svc_id", ctypes.c_uint32),
                ("expires", ctypes.c_uint64), ("flags", ctypes.c_uint32),
                ("partner_refreshed", ctypes.c_uint32)]


# ct_value.flags: BPFP_CT_<name>
CT_REPLY, CT_SNAT, CT_CLOSING, CT_ESTABLISHED, CT_FIN, CT_TIME_WAIT = 1, 2, 4, 8, 16, 32
CT_DSR, CT_DSR_BACKEND = 64, 128
CT_FIN_ACKED, CT_RST_LAST, CT_GONE = 256, 512, 1024

# bpfp_tc_events slots: what the TC path did, per CPU, as SOCK_EVENTS: slot i is
# BPFP_TCEV_<TC_EVENTS[i] in capitals>
TC_EVENTS = ("no_snat_port", "tcp_not_syn", "snat_port_reused", "flow_expired",
             "xdp_forwarded")
TC_EVENT_SLOTS = 8              # BPFP_TCEV_SLOTS


class IfaddrKey(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32), ("family", ctypes.c_uint32)]


class IfaddrValue(ctypes.Structure):
    _fields_ = [("addr", Addr6)]


class AffinityExtKey(ctypes.Structure):
    _fields_ = [("svc_id", ctypes.c_uint32), ("family", ctypes.c_uint32), ("addr", Addr6)]


class SrcrangeKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("svc_id", ctypes.c_uint32), ("addr", Addr6)]


class MaglevKey(ctypes.Structure):
    _fields_ = [("svc_id", ctypes.c_uint32), ("row", ctypes.c_uint32)]


class MaglevRow(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint16 * MAGLEV_ROW)]     # BPFP_MAGLEV_ROW (the planner's)


@dataclass(frozen=True)
class MapLayout:
    table: str          # the name in bpf/maps.h (and BCC's table name)
    pin: str            # file name under the pin directory; carries the layout version
    key: type
    value: type
    # max_entries: the DatapathConfig field that sets it (passed as its -D macro), or a
    # number fixed in bpf/maps.h
    size: str | int = 0

    def max_entries(self, config: DatapathConfig) -> int:
        return getattr(config, self.size) if isinstance(self.size, str) else self.size


MAPS = {
    "bpfp_svc4": MapLayout("bpfp_svc4", "bpfp_svc4_v1", SvcKey4, SvcValue, "max_frontends"),
    "bpfp_slot4": MapLayout("bpfp_slot4", "bpfp_slot4_v1", SlotKey, Backend4, "max_slots"),
    "bpfp_revnat4": MapLayout("bpfp_revnat4", "bpfp_revnat4_v1", Revnat4Key, Revnat4Value,
                              "max_revnat"),
    "bpfp_svc6": MapLayout("bpfp_svc6", "bpfp_svc6_v1", SvcKey6, SvcValue, "max_frontends"),
    "bpfp_slot6": MapLayout("bpfp_slot6", "bpfp_slot6_v1", SlotKey, Backend6, "max_slots"),
    "bpfp_revnat6": MapLayout("bpfp_revnat6", "bpfp_revnat6_v1", Revnat6Key, Revnat6Value,
                              "max_revnat"),
    "bpfp_sock_events": MapLayout("bpfp_sock_events", "bpfp_sock_events_v1", ctypes.c_uint32,
                                  ctypes.c_uint64, SOCK_EVENT_SLOTS),
    "bpfp_affinity": MapLayout("bpfp_affinity", "bpfp_affinity_v1", AffinityKey,
                               AffinityValue, "max_affinity"),
    "bpfp_stats": MapLayout("bpfp_stats", "bpfp_stats_v1", StatsKey, StatsValue, "max_stats"),
    "bpfp_ct": MapLayout("bpfp_ct", "bpfp_ct_v1", CtKey, CtValue, "ct_max"),
    "bpfp_ifaddr": MapLayout("bpfp_ifaddr", "bpfp_ifaddr_v1", IfaddrKey, IfaddrValue, 1024),
    "bpfp_affinity_ext": MapLayout("bpfp_affinity_ext", "bpfp_affinity_ext_v1",
                                   AffinityExtKey, AffinityValue, "max_affinity"),
    "bpfp_srcrange": MapLayout("bpfp_srcrange", "bpfp_srcrange_v1", SrcrangeKey,
                               ctypes.c_uint8, "max_source_ranges"),
    "bpfp_maglev": MapLayout("bpfp_maglev", "bpfp_maglev_v1", MaglevKey, MaglevRow,
                             "max_maglev_rows"),
    "bpfp_tc_events": MapLayout("bpfp_tc_events", "bpfp_tc_events_v1", ctypes.c_uint32,
                                ctypes.c_uint64, TC_EVENT_SLOTS),
}

# socket-local storage: no max_entries (each socket holds its own)
SOCKET_STORAGE = MapLayout("bpfp_sock_revnat", "bpfp_sock_revnat_v1", ctypes.c_int32,
                           SockRevnats, 0)


def sized_by(field: str) -> tuple[str, ...]:
    """The tables whose size the DatapathConfig field sets."""
    return tuple(table for table, spec in MAPS.items() if spec.size == field)
