"""Loads and removes the kube-proxy rule sets inside a bench network namespace, and times it.
Only ever enters /run/netns/bpfp-*: nothing here can touch the host's own rules."""

from __future__ import annotations

import functools
import json
import subprocess
import tempfile
import time
from pathlib import Path

from bench.kubeproxy.iptables import JUMP_RULES, KUBE_CHAINS
from bench.kubeproxy.nftables import TABLE

__all__ = [
    "BACKENDS",
    "flush_iptables",
    "flush_nftables",
    "iptables_save",
    "load_iptables",
    "load_nftables",
    "nft_list",
    "rule_count",
]

NETNS_DIR = Path("/run/netns")
NETNS_PREFIX = "bpfp-"

# kube-proxy runs the node's `iptables`, which on Debian 12 is the nf_tables backend; pick
# one explicitly so a changed alternative cannot silently switch what the bench measures:
# here the nft backend's restore of 10k services takes about 50 s, the legacy one about 1 s.
BACKENDS = {
    "nft": ("iptables-nft", "iptables-nft-restore", "iptables-nft-save"),
    "legacy": ("iptables-legacy", "iptables-legacy-restore", "iptables-legacy-save"),
}


class LoadError(RuntimeError):
    """A rule load or removal failed; the message carries the tool's stderr."""


def _enter(netns: str) -> list[str]:
    # Refuse anything but a namespace a bench or test created: never the host's rules.
    if not netns.startswith(NETNS_PREFIX) or "/" in netns:
        raise ValueError(f"netns {netns!r}: only {NETNS_PREFIX}* namespaces may get rules")
    path = NETNS_DIR / netns
    if not path.exists():
        raise ValueError(f"netns {netns!r}: {path} does not exist")
    return ["nsenter", f"--net={path}", "--"]


def _run(
    netns: str,
    argv: list[str],
    stdin: str | None = None,
    check: bool = True,
    timeout: float = 600.0,
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [*_enter(netns), *argv], input=stdin, capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip
    if check and done.returncode != 0:
        raise LoadError(f"netns {netns}: {' '.join(argv)}: exit {done.returncode}: "
                        f"{done.stderr.strip()[:2000]}")  # fmt: skip
    return done


def _tools(backend: str) -> tuple[str, str, str]:
    try:
        return BACKENDS[backend]
    except KeyError:
        raise ValueError(f"iptables backend {backend!r}: use one of {sorted(BACKENDS)}") from None


def load_iptables(text: str, netns: str, backend: str = "nft", jumps: bool = True) -> float:
    """`iptables-restore -w --noflush --counters` of text in netns, as kube-proxy runs it;
    returns its wall time in seconds (nsenter's exec included, a millisecond or so).

    Then, untimed, ensures the jump rules from the built-in chains (JUMP_RULES) exist, with
    `-C` and `-I` as kube-proxy's EnsureRule does; kube-proxy does that before its restore,
    but a chain must exist before a rule can jump to it, and the restore creates them."""
    iptables, restore, _ = _tools(backend)
    start = time.perf_counter()
    _run(netns, [restore, "-w", "5", "--noflush", "--counters"], stdin=text)
    elapsed = time.perf_counter() - start
    if jumps:
        for table, chain, args in JUMP_RULES:
            if _run(netns, [iptables, "-w", "5", "-t", table, "-C", chain, *args],
                    check=False).returncode != 0:  # fmt: skip
                _run(netns, [iptables, "-w", "5", "-t", table, "-I", chain, *args])
    return elapsed


def flush_iptables(netns: str, backend: str = "nft") -> float:
    """Remove the jump rules and every KUBE-* chain from nat and filter (others are left);
    returns the wall time of the whole removal."""
    iptables, restore, _ = _tools(backend)
    start = time.perf_counter()
    for table, chain, args in JUMP_RULES:
        while _run(netns, [iptables, "-w", "5", "-t", table, "-D", chain, *args],
                   check=False).returncode == 0:  # fmt: skip
            pass  # a rule inserted twice is removed twice
    lines = []
    for table in KUBE_CHAINS:
        chains = [c for c in _chains(netns, backend, table) if c.startswith("KUBE-")]
        if chains:
            # Declaring a chain in a --noflush restore flushes it; then none is referenced.
            lines += [f"*{table}", *(f":{c} - [0:0]" for c in chains),
                      *(f"-X {c}" for c in chains), "COMMIT"]  # fmt: skip
    if lines:
        _run(netns, [restore, "-w", "5", "--noflush"], stdin="\n".join(lines) + "\n")
    return time.perf_counter() - start


def iptables_save(netns: str, backend: str = "nft", table: str | None = None) -> str:
    _, _, save = _tools(backend)
    return _run(netns, [save, *(["-t", table] if table else [])]).stdout


def _chains(netns: str, backend: str, table: str) -> list[str]:
    return [line[1:].split()[0] for line in iptables_save(netns, backend, table).splitlines()
            if line.startswith(":")]  # fmt: skip


def load_nftables(text: str, netns: str) -> float:
    """`nft -f` of text in netns (the file replaces table ip kube-proxy); returns its wall
    time in seconds (nsenter's exec included)."""
    with tempfile.NamedTemporaryFile("w", prefix="bpfp-kpr-", suffix=".nft") as rules:
        rules.write(text)
        rules.flush()
        start = time.perf_counter()
        _run(netns, ["nft", "-f", rules.name])
        return time.perf_counter() - start


def flush_nftables(netns: str) -> float:
    """Delete table ip kube-proxy if it exists; returns the wall time."""
    start = time.perf_counter()
    _run(netns, ["nft", "-f", "-"], stdin=f"add table {TABLE}\ndelete table {TABLE}\n")
    return time.perf_counter() - start


def nft_list(netns: str) -> str:
    """`nft list ruleset` inside netns."""
    return _run(netns, ["nft", "list", "ruleset"]).stdout


def rule_count(netns: str, tool: str, backend: str = "nft") -> int:
    """Rules the kernel holds in netns: for "iptables" every `-A` of nat and filter (the
    KUBE-* chains and the jumps), for "nftables" the rules of table ip kube-proxy (map
    elements are data, not rules, and are not counted)."""
    if tool == "iptables":
        return sum(line.startswith("-A ")
                   for table in KUBE_CHAINS
                   for line in iptables_save(netns, backend, table).splitlines())  # fmt: skip
    if tool == "nftables":
        listing = _run(netns, ["nft", "-j", "list", "table", *TABLE.split()], check=False)
        if listing.returncode != 0:
            return 0  # no table: nothing loaded
        return sum("rule" in item for item in json.loads(listing.stdout)["nftables"])
    raise ValueError(f"tool {tool!r}: use 'iptables' or 'nftables'")


# The bench's iptables contestant uses the legacy (x_tables) backend: with the nf_tables
# backend iptables-restore of 10k services x 2 ports ran over 5 minutes here (superlinear),
# the legacy one takes about a second; and x_tables' linear rule walk per new connection
# is the cost kube-proxy's iptables mode is known for.
BENCH_IPTABLES_BACKEND = "legacy"
LOAD = {"iptables": functools.partial(load_iptables, backend=BENCH_IPTABLES_BACKEND),
        "nftables": load_nftables}
FLUSH = {"iptables": functools.partial(flush_iptables, backend=BENCH_IPTABLES_BACKEND),
         "nftables": flush_nftables}
