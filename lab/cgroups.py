"""cgroup v2 directories for the lab: find the cgroup2 mount, create a directory, remove a tree.
Removal moves leftover processes to a refuge cgroup first, then rmdirs children before parents."""

from __future__ import annotations

import os
from pathlib import Path


def cgroup2_mount() -> Path:
    """Where cgroup v2 is mounted; hybrid hosts mount it at e.g. /sys/fs/cgroup/unified."""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                return Path(fields[1])
    raise RuntimeError(
        "no cgroup2 filesystem in /proc/mounts; mount one (mount -t cgroup2 none PATH)"
    )


def create(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path


def pids(path: Path) -> list[int]:
    try:
        return [int(line) for line in (path / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def move_pids(source: Path, refuge: Path) -> None:
    """Move every process of source into refuge; a cgroup with processes cannot be removed."""
    for pid in pids(source):
        try:
            (refuge / "cgroup.procs").write_text(str(pid))
        except ProcessLookupError:
            pass  # it exited meanwhile


def remove_tree(path: Path, refuge: Path) -> None:
    """rmdir path and every cgroup below it, deepest first (a cgroup with children cannot go)."""
    if not path.is_dir():
        return
    for dirpath, _dirnames, _files in sorted(os.walk(path), key=lambda w: -w[0].count("/")):
        move_pids(Path(dirpath), refuge)
        os.rmdir(dirpath)
