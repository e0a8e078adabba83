"""Datapath configuration: the one table from which every -D macro given to bpf/*.c comes.

A unit test checks that these defaults equal the #ifndef defaults in bpf/maps.h."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PIN_DIR = Path("/sys/fs/bpf/bpfproxy")

# --acceleration: XDP beside the TC programs (bpf/xdp.c), as Cilium names the modes
ACCELERATIONS = ("disabled", "native", "best-effort")
# --nodeport-mode: how a flow from outside reaches a backend on another node, as Cilium's
# bpf.lbMode; passed as BPFP_NODEPORT_MODE, the index here (bpf/maps.h BPFP_NODEPORT_<NAME>)
NODEPORT_MODES = ("snat", "dsr", "hybrid")
# --lb-algorithm: backend choice for flows from outside the node; maglev is passed as
# BPFP_MAGLEV_M (the table size), random as 0
LB_ALGORITHMS = ("random", "maglev")

# DatapathConfig field -> the bpf/maps.h macro it is passed as (-D); layout.MapLayout.size
# names these fields, and tests/unit/test_datapath_config.py checks both against maps.h
MACROS = {
    "pin_dir": "BPFP_PIN_DIR",
    "max_frontends": "BPFP_MAX_FRONTENDS",
    "max_slots": "BPFP_MAX_SLOTS",
    "max_revnat": "BPFP_MAX_REVNAT",
    "max_affinity": "BPFP_MAX_AFFINITY",
    "max_stats": "BPFP_MAX_STATS",
    "ct_max": "BPFP_CT_MAX",
    "ct_tcp_timeout": "BPFP_CT_TCP_TIMEOUT",
    "ct_tcp_close_timeout": "BPFP_CT_TCP_CLOSE_TIMEOUT",
    "ct_udp_timeout": "BPFP_CT_UDP_TIMEOUT",
    "snat_port_min": "BPFP_SNAT_PORT_MIN",
    "snat_port_max": "BPFP_SNAT_PORT_MAX",
    "max_source_ranges": "BPFP_MAX_SOURCE_RANGES",
    "maglev_m": "BPFP_MAGLEV_M",
    "max_maglev_rows": "BPFP_MAX_MAGLEV_ROWS",
    "nodeport_mode": "BPFP_NODEPORT_MODE",
}


@dataclass(frozen=True, slots=True)
class DatapathConfig:
    pin_dir: Path = DEFAULT_PIN_DIR
    max_frontends: int = 262144       # service address:port/protocol entries
    max_slots: int = 2097152          # backend slots over all service ports
    max_revnat: int = 524288          # live UDP flows/sockets remembered for reverse NAT
    max_affinity: int = 262144        # (client, service port) pairs with session affinity
    max_stats: int = 131072           # counted service ports and backends (LRU)
    ct_max: int = 262144              # flows from outside the node (two entries each)
    ct_tcp_timeout: int = 21600       # seconds an idle established TCP flow is kept
    ct_tcp_close_timeout: int = 10    # ... once it saw an RST or a FIN each way
    ct_udp_timeout: int = 60          # ... an idle UDP flow
    snat_port_min: int = 61000        # source ports of flows SNATed to the node: above
    snat_port_max: int = 65535        # Linux's default ephemeral range (32768-60999)
    max_source_ranges: int = 65536    # loadBalancerSourceRanges entries
    maglev_m: int = 1021              # Maglev table size per service port: a prime
    max_maglev_rows: int = 1048576    # rows of 32 table entries over all service ports
    interfaces: tuple[str, ...] = ()  # where the TC programs attach
    acceleration: str = "disabled"    # XDP on the interfaces too: native, best-effort
    nodeport_mode: str = "snat"       # remote backends: snat, dsr, hybrid (DSR for TCP)

    def macros(self) -> dict[str, str]:
        """C macro name -> C literal."""
        def literal(field: str, value) -> str:
            if field == "nodeport_mode":
                return str(NODEPORT_MODES.index(value))
            return f'"{value}"' if isinstance(value, Path) else str(value)
        return {macro: literal(field, getattr(self, field)) for field, macro in MACROS.items()}

    def to_json(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v
                           for k, v in dataclasses.asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> DatapathConfig:
        fields = json.loads(text)
        fields["pin_dir"] = Path(fields["pin_dir"])
        fields["interfaces"] = tuple(fields["interfaces"])
        return cls(**fields)

    def cflags(self) -> list[str]:
        return [f"-D{name}={value}" for name, value in self.macros().items()]
