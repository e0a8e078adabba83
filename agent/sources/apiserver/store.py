"""Allocations remembered where a restarted agent finds them: one small JSON file beside the
pins' lifetime (/run/bpfproxy: bpffs holds no regular files, and both end at reboot)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from agent.logfmt import kv

log = logging.getLogger(__name__)

STATE_DIRECTORY = Path("/run/bpfproxy")
MAX_BYTES = 64 * 1024 * 1024


def path_for(pin_dir: Path) -> Path:
    """One file per pin directory: agents of several labs on one host keep theirs apart."""
    return STATE_DIRECTORY / f"{Path(pin_dir).name}.allocations.json"


def load(path: Path | None) -> dict[str, dict]:
    """Service "namespace/name" -> {"ips": [...], "nodePorts": {port: nodePort},
    "healthCheckNodePort": n}; {} when absent or unreadable (logged: allocation then
    starts afresh, deterministic as before)."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_BYTES))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning(kv(event="allocations_unreadable", file=path, error=e))
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        log.warning(kv(event="allocations_unreadable", file=path, error="not ours"))
        return {}
    return {k: v for k, v in data["services"].items() if isinstance(v, dict)}


def save(path: Path | None, services: dict[str, dict]) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"services": services}, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        log.warning(kv(event="allocations_not_saved", file=path, error=e))
