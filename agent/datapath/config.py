"""Datapath configuration: the one table from which every -D macro given to bpf/*.c comes.

A unit test checks that these defaults equal the #ifndef defaults in bpf/maps.h."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PIN_DIR = Path("/sys/fs/bpf/bpfproxy")


@dataclass(frozen=True, slots=True)
class DatapathConfig:
    pin_dir: Path = DEFAULT_PIN_DIR
    max_frontends: int = 262144       # service address:port/protocol entries
    max_slots: int = 2097152          # backend slots over all service ports
    max_revnat: int = 524288          # live UDP flows/sockets remembered for reverse NAT
    max_affinity: int = 262144        # (client, service port) pairs with session affinity
    max_stats: int = 131072           # counted service ports and backends (LRU)

    def macros(self) -> dict[str, str]:
        """C macro name -> C literal."""
        return {
            "BPFP_PIN_DIR": f'"{self.pin_dir}"',
            "BPFP_MAX_FRONTENDS": str(self.max_frontends),
            "BPFP_MAX_SLOTS": str(self.max_slots),
            "BPFP_MAX_REVNAT": str(self.max_revnat),
            "BPFP_MAX_AFFINITY": str(self.max_affinity),
            "BPFP_MAX_STATS": str(self.max_stats),
        }

    def to_json(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v
                           for k, v in dataclasses.asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> DatapathConfig:
        fields = json.loads(text)
        fields["pin_dir"] = Path(fields["pin_dir"])
        return cls(**fields)

    def cflags(self) -> list[str]:
        return [f"-D{name}={value}" for name, value in self.macros().items()]
