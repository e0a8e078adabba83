"""Who owns a lab name, and removal of what crashed runs left behind (bpfp-* netns and cgroups).
A live Lab holds an flock on /run/bpfp-lab/NAME.lock; resources of unlocked names are stale."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sys
from collections.abc import Collection
from pathlib import Path

from lab import cgroups, netns

LOCK_DIR = Path("/run/bpfp-lab")


def claim(lab_name: str) -> int | None:
    """Lock lab_name for this process; the fd holds the lock. None if a live lab has it."""
    LOCK_DIR.mkdir(exist_ok=True)
    fd = os.open(LOCK_DIR / f"{lab_name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def release(lab_name: str, fd: int) -> None:
    (LOCK_DIR / f"{lab_name}.lock").unlink(missing_ok=True)
    os.close(fd)


def workdir(lab_name: str) -> Path:
    """Where a lab keeps its logs; it goes with the lab (and with cleanup_stale)."""
    return LOCK_DIR / lab_name


def lab_name_of(resource: str) -> str:
    """bpfp-LAB-node, bpfp-LAB-POD and the cgroup bpfp-LAB all belong to LAB (no dash in LAB);
    so do a cluster's bpfp-LAB-wire and bpfp-LAB-ext (the cluster locks LAB like a lab)."""
    return resource.removeprefix(netns.PREFIX).split("-")[0]


def remove_lab(lab_name: str) -> list[str]:
    """Remove the namespaces and cgroup of lab_name; the caller must own (or have claimed) it."""
    removed = []
    owned = f"{netns.PREFIX}{lab_name}-"
    # Pods before the node: the node's veth ends vanish with the pod namespaces anyway.
    for name in sorted(netns.names(), key=lambda n: n.endswith("-node")):
        if name.startswith(owned) or name == owned[:-1]:
            netns.delete(name)
            removed.append(f"netns {name}")
    mount = cgroups.cgroup2_mount()
    cgroup = mount / f"{netns.PREFIX}{lab_name}"
    if cgroup.is_dir():
        cgroups.remove_tree(cgroup, refuge=mount)
        removed.append(f"cgroup {cgroup}")
    if workdir(lab_name).is_dir():
        shutil.rmtree(workdir(lab_name))
        removed.append(f"workdir {workdir(lab_name)}")
    return removed


def remove_cluster(cluster_name: str) -> list[str]:
    """A cluster's own namespaces (bpfp-C-wire, bpfp-C-ext: remove_lab(C), the caller owns C)
    and its node labs CnI that no live lab holds, whatever node count a crashed run had."""
    node_lab = re.compile(rf"{re.escape(cluster_name)}n[0-9]+")
    mount = cgroups.cgroup2_mount()
    found = [n for n in netns.names() if n.startswith(netns.PREFIX)]
    found += [p.name for p in mount.iterdir() if p.is_dir() and p.name.startswith(netns.PREFIX)]
    node_labs = {name for name in map(lab_name_of, found) if node_lab.fullmatch(name)}
    return remove_lab(cluster_name) + cleanup_stale(lab_names=node_labs)


def cleanup_stale(prefix: str = "bpfp-", *, lab_names: Collection[str] | None = None) -> list[str]:
    """Remove namespaces and cgroup dirs named prefix* whose lab is not running; say what went.

    lab_names narrows it to those labs (a test cleaning up only after itself).
    """
    if not prefix.startswith(netns.PREFIX):
        raise ValueError(f"cleanup_stale: prefix {prefix!r} must start with {netns.PREFIX!r}")
    mount = cgroups.cgroup2_mount()
    found = [n for n in netns.names() if n.startswith(prefix)]
    found += [p.name for p in mount.iterdir() if p.is_dir() and p.name.startswith(prefix)]
    removed = []
    for lab_name in sorted({lab_name_of(name) for name in found}):
        if lab_names is not None and lab_name not in lab_names:
            continue
        fd = claim(lab_name)
        if fd is None:
            continue  # a live lab: not stale
        try:
            removed += remove_lab(lab_name)
        finally:
            release(lab_name, fd)
    return removed


if __name__ == "__main__":
    for line in cleanup_stale(*sys.argv[1:2]):
        print("removed", line)
