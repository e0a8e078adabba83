"""Named network namespaces through iproute2 (`ip netns add` so they appear in /run/netns).
Every name must carry the bpfp prefix; commands raise with ip's stderr when they fail."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

NETNS_DIR = Path("/run/netns")
PREFIX = "bpfp-"


def ip(*args: str, netns: str | None = None, timeout: float = 10.0) -> str:
    """Run `ip [-n netns] args...` and return its stdout."""
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def path(name: str) -> Path:
    return NETNS_DIR / name


def add(name: str) -> None:
    _check_prefix(name)
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", netns=name)


def delete(name: str) -> None:
    """Delete the namespace; its interfaces (and the veth peers of them) go with it."""
    _check_prefix(name)
    if path(name).exists():
        ip("netns", "delete", name)


def names() -> list[str]:
    return sorted(entry.name for entry in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []


def sysctl(name: str, settings: dict[str, str | int]) -> None:
    """Set net sysctls inside the namespace: /proc/sys/net is per namespace of the writer."""
    assignments = [f"{key}={value}" for key, value in settings.items()]
    argv = [nsenter(), f"--net={path(name)}", "--", "sysctl", "-qw", *assignments]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"sysctl in netns {name}: {done.stderr.strip()}")


def nsenter() -> str:
    found = shutil.which("nsenter")
    if not found:
        raise RuntimeError("nsenter not found; install util-linux")
    return found


def _check_prefix(name: str) -> None:
    # The lab only ever touches what it named; refusing anything else keeps a bug harmless.
    if not name.startswith(PREFIX):
        raise ValueError(f"netns {name!r}: lab namespaces must start with {PREFIX!r}")
