"""Removes what kube-proxy left in this network namespace, as `kube-proxy --cleanup` does:
its iptables jump rules and chains (IPv4 and IPv6, legacy and nft backends) and its nftables
tables; kubelet's chains (KUBE-FIREWALL, KUBE-KUBELET-CANARY, KUBE-MARK-DROP) stay.

Mirrors pkg/proxy/iptables CleanupLeftovers (iptablesJumpChains, the chains it flushes and
deletes by name and by prefix) and pkg/proxy/nftables CleanupLeftovers (delete table
`ip kube-proxy` and `ip6 kube-proxy`), except that NAT of established flows is kept (see
NAT_KEEPALIVE_TABLE). IPVS mode is not covered (no IPVS here). The rendering is pure;
`cleanup` runs the tools by argument list, never through a shell."""
from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CANARY = "KUBE-PROXY-CANARY"
# The chains kube-proxy removes by name, per table (cleanupLeftoversForFamily).
NAT_CHAINS = ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", CANARY)
FILTER_CHAINS = ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS",
                 "KUBE-PROXY-FIREWALL", CANARY)
# isServiceChainName: per service port and endpoint chains, nat only (KUBE-XLB- is the
# pre-1.24 name of KUBE-EXT-, still removed by the releases that renamed it).
SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-",
                          "KUBE-XLB-")
NFT_TABLES = ("ip kube-proxy", "ip6 kube-proxy")
# A namespace tracks connections only while some rule needs conntrack, and NATs established
# flows only while some nat chain of the family is registered. Deleting kube-proxy's table,
# the last such user on an nftables node, would stall every connection it DNATed to a
# service address. One nat chain of ours, whose only rule reads conntrack state (and never
# matches: a nat chain sees only a flow's first packet), keeps both. Cleanup removes it as
# soon as conntrack holds no open DNATed flow of its family: at once when none is open,
# else on a later `bpfproxy cleanup --kube-proxy`, which says so.
NAT_KEEPALIVE_TABLE = "bpfproxy-nat"

_NEW = ("-m", "conntrack", "--ctstate", "NEW")


@dataclass(frozen=True, slots=True)
class JumpRule:
    """A rule kube-proxy puts in a built-in chain to reach one of its own."""
    table: str
    source: str               # built-in chain holding the jump
    target: str               # kube-proxy chain jumped to
    comment: str
    extra: tuple[str, ...] = ()

    def args(self) -> tuple[str, ...]:
        """The rule spec exactly as kube-proxy writes it (extraArgs, comment, jump)."""
        return (*self.extra, "-m", "comment", "--comment", self.comment, "-j", self.target)


# iptablesJumpChains, in kube-proxy's order. iptablesKubeletJumpChains (KUBE-FIREWALL from
# INPUT and OUTPUT) are kubelet's and are left alone, as kube-proxy leaves them.
JUMP_RULES = (
    JumpRule("filter", "INPUT", "KUBE-EXTERNAL-SERVICES",
             "kubernetes externally-visible service portals", _NEW),
    JumpRule("filter", "FORWARD", "KUBE-EXTERNAL-SERVICES",
             "kubernetes externally-visible service portals", _NEW),
    JumpRule("filter", "INPUT", "KUBE-NODEPORTS", "kubernetes health check service ports"),
    JumpRule("filter", "FORWARD", "KUBE-SERVICES", "kubernetes service portals", _NEW),
    JumpRule("filter", "OUTPUT", "KUBE-SERVICES", "kubernetes service portals", _NEW),
    JumpRule("filter", "FORWARD", "KUBE-FORWARD", "kubernetes forwarding rules"),
    JumpRule("filter", "INPUT", "KUBE-PROXY-FIREWALL", "kubernetes load balancer firewall", _NEW),
    JumpRule("filter", "OUTPUT", "KUBE-PROXY-FIREWALL", "kubernetes load balancer firewall",
             _NEW),
    JumpRule("filter", "FORWARD", "KUBE-PROXY-FIREWALL", "kubernetes load balancer firewall",
             _NEW),
    JumpRule("nat", "OUTPUT", "KUBE-SERVICES", "kubernetes service portals"),
    JumpRule("nat", "PREROUTING", "KUBE-SERVICES", "kubernetes service portals"),
    JumpRule("nat", "POSTROUTING", "KUBE-POSTROUTING", "kubernetes postrouting rules"),
    # iptablesCleanupOnlyChains of kube 1.13-1.19 (#95252 removed it from the jump list)
    JumpRule("filter", "INPUT", "KUBE-SERVICES", "kubernetes service portals", _NEW),
)


@dataclass(frozen=True, slots=True)
class Iptables:
    """One family and backend of the iptables tools."""
    label: str                # e.g. "ip6tables-legacy"
    family: int               # 4 | 6
    backend: str              # "nft" | "legacy"

    @property
    def restore(self) -> str:
        return f"{self.label}-restore"

    @property
    def save(self) -> str:
        return f"{self.label}-save"

    def legacy_tables_file(self) -> Path:
        """Tables the legacy (x_tables) backend holds in this namespace. Checked before any
        legacy tool runs: iptables-legacy-save of a table creates it."""
        return Path("/proc/net/ip_tables_names" if self.family == 4 else
                    "/proc/net/ip6_tables_names")


# kube-proxy uses whichever backend its image's iptables wrapper picked; a node may hold
# rules in either (or both, after a switch), so both are cleaned.
IPTABLES = tuple(Iptables(f"{prefix}-{backend}", family, backend)
                 for backend in ("nft", "legacy")
                 for prefix, family in (("iptables", 4), ("ip6tables", 6)))


def chains_in(save_output: str) -> list[str]:
    """The chain names an `iptables-save -t TABLE` output declares (`:NAME POLICY [..]`)."""
    return [line[1:].split()[0] for line in save_output.splitlines()
            if line.startswith(":") and len(line) > 1]


def chains_to_remove(table: str, existing: Iterable[str]) -> list[str]:
    """kube-proxy's chains among `existing`: the named ones first, then service chains."""
    existing = list(existing)
    if table == "nat":
        named = [c for c in NAT_CHAINS if c in existing]
        return named + sorted(c for c in existing if c.startswith(SERVICE_CHAIN_PREFIXES))
    if table == "filter":
        return [c for c in FILTER_CHAINS if c in existing]
    return []


def restore_input(table: str, chains: Iterable[str]) -> str:
    """`iptables-restore --noflush` input that flushes and deletes chains: declaring a chain
    flushes it, so no rule references another by the time the deletes run."""
    chains = list(chains)
    if not chains:
        return ""
    lines = [f"*{table}", *(f":{c} - [0:0]" for c in chains), *(f"-X {c}" for c in chains),
             "COMMIT"]
    return "\n".join(lines) + "\n"


def jumps_to_remove(table: str, existing: Iterable[str]) -> list[JumpRule]:
    """The jump rules worth trying: their target chain exists (else the rule cannot)."""
    existing = set(existing)
    return [j for j in JUMP_RULES if j.table == table and j.target in existing]


def nft_tables_to_delete(list_tables_output: str) -> list[str]:
    """kube-proxy's nftables tables among `nft list tables` output lines."""
    present = {" ".join(line.split()[1:3]) for line in list_tables_output.splitlines()
               if line.startswith("table ")}
    return [t for t in NFT_TABLES if t in present]


def nft_delete_input(table: str) -> str:
    """`nft -f -` input deleting one of kube-proxy's tables in one transaction with adding a
    nat chain of its family that uses conntrack, so NAT of established flows never stops."""
    family = table.split()[0]
    keepalive = f"{family} {NAT_KEEPALIVE_TABLE}"
    return (f"add table {keepalive}\n"
            f"add chain {keepalive} keepalive {{ type nat hook postrouting priority 1000 ; "
            f"policy accept ; }}\n"
            f"flush chain {keepalive} keepalive\n"
            f"add rule {keepalive} keepalive ct state established,related accept\n"
            f"delete table {table}\n")


# --- running the tools ------------------------------------------------------------------

Run = Callable[[list[str], str | None], subprocess.CompletedProcess]


def run_tool(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120,
                          check=False)


@dataclass
class CleanupReport:
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)     # left on purpose, and until when


def cleanup(run: Run = run_tool, which: Callable[[str], str | None] = shutil.which,
            read_text: Callable[[Path], str] | None = None,
            open_nat_flows: Callable[[int], int] | None = None) -> CleanupReport:
    """Remove kube-proxy's rules from this network namespace; report what went and what
    failed (the rest is still attempted, as kube-proxy does). open_nat_flows(family): the
    open flows netfilter DNATed (agent/datapath/nf_conntrack.py)."""
    report = CleanupReport()
    read_text = read_text or _read_or_empty
    for tools in IPTABLES:
        if which(tools.label) is None:
            continue
        _clean_iptables(tools, run, read_text, report)
    if which("nft") is not None:
        if open_nat_flows is None:
            from agent.datapath.nf_conntrack import open_dnat_flows as open_nat_flows
        _clean_nftables(run, report, open_nat_flows)
    return report


def _clean_iptables(tools: Iptables, run: Run, read_text, report: CleanupReport) -> None:
    if tools.backend == "legacy":
        present = set(read_text(tools.legacy_tables_file()).split())
    else:
        present = {"nat", "filter", "mangle"}   # iptables-nft-save never creates a table
    chains: dict[str, list[str]] = {}
    for table in ("nat", "filter", "mangle"):
        if table not in present:
            continue
        saved = run([tools.save, "-t", table], None)
        if saved.returncode != 0:
            # nft backend: no such table. Anything else is worth saying.
            if "does not exist" not in saved.stderr and "Table does not exist" not in \
                    saved.stderr:
                report.errors.append(f"{tools.save} -t {table}: {_first_line(saved.stderr)}")
            continue
        chains[table] = chains_in(saved.stdout)
    for table in ("filter", "nat"):
        for jump in jumps_to_remove(table, chains.get(table, ())):
            _delete_jump(tools, jump, run, report)
    for table in ("nat", "filter"):
        doomed = chains_to_remove(table, chains.get(table, ()))
        if not doomed:
            continue
        done = run([tools.restore, "-w", "5", "--noflush"], restore_input(table, doomed))
        if done.returncode != 0:
            report.errors.append(f"{tools.restore} ({table}): {_first_line(done.stderr)}")
            log.error("event=kube_proxy_cleanup_failed tool=%s table=%s error=%r",
                      tools.restore, table, done.stderr.strip())
            continue
        report.removed += [f"{tools.label} {table} chain {c}" for c in doomed]
    # kube-proxy ignores an error here: the canary may already be gone
    if CANARY in chains.get("mangle", ()) and \
            run([tools.label, "-w", "5", "-t", "mangle", "-X", CANARY], None).returncode == 0:
        report.removed.append(f"{tools.label} mangle chain {CANARY}")


def _delete_jump(tools: Iptables, jump: JumpRule, run: Run, report: CleanupReport) -> None:
    """Delete the rule while it is there (kube-proxy ensures it once; a duplicate left by a
    racing writer would keep its target chain from being deleted)."""
    base = [tools.label, "-w", "5", "-t", jump.table]
    for _ in range(100):
        if run([*base, "-C", jump.source, *jump.args()], None).returncode != 0:
            return
        done = run([*base, "-D", jump.source, *jump.args()], None)
        if done.returncode != 0:
            report.errors.append(f"{tools.label} -t {jump.table} -D {jump.source} -> "
                                 f"{jump.target}: {_first_line(done.stderr)}")
            return
        report.removed.append(f"{tools.label} {jump.table} rule {jump.source} -> {jump.target}")


def _clean_nftables(run: Run, report: CleanupReport,
                    open_nat_flows: Callable[[int], int]) -> None:
    listed = run(["nft", "list", "tables"], None)
    if listed.returncode != 0:
        report.errors.append(f"nft list tables: {_first_line(listed.stderr)}")
        return
    keepalives = set(keepalive_tables(listed.stdout))
    for table in nft_tables_to_delete(listed.stdout):
        done = run(["nft", "-f", "-"], nft_delete_input(table))
        if done.returncode != 0:
            report.errors.append(f"nft delete table {table}: {_first_line(done.stderr)}")
        else:
            report.removed.append(f"nftables table {table}")
            keepalives.add(f"{table.split()[0]} {NAT_KEEPALIVE_TABLE}")
    for table in sorted(keepalives):
        _remove_keepalive_when_unused(table, run, report, open_nat_flows)


def keepalive_tables(list_tables_output: str) -> list[str]:
    """Our NAT keepalive tables among `nft list tables` output lines (a run before made)."""
    return [t for t in (" ".join(line.split()[1:3]) for line in list_tables_output.splitlines()
                        if line.startswith("table "))
            if t.split()[-1] == NAT_KEEPALIVE_TABLE]


def _remove_keepalive_when_unused(table: str, run: Run, report: CleanupReport,
                                  open_nat_flows: Callable[[int], int]) -> None:
    """The keepalive goes once conntrack holds no open DNATed flow of its family: the
    flows kube-proxy DNATed are over (a TCP flow in TIME_WAIT is)."""
    family = 6 if table.startswith("ip6 ") else 4
    try:
        flows = open_nat_flows(family)
    except OSError as exc:
        report.kept.append(f"nftables table {table}: conntrack unreadable ({exc}); it keeps "
                           f"NAT of the flows kube-proxy DNATed; run `bpfproxy cleanup "
                           f"--kube-proxy` again to remove it")
        return
    if flows:
        report.kept.append(f"nftables table {table}: it keeps NAT of {flows} open IPv{family} "
                           f"flows DNATed before kube-proxy's rules went; run `bpfproxy "
                           f"cleanup --kube-proxy` again once they ended to remove it")
        return
    done = run(["nft", "delete", "table", *table.split()], None)
    if done.returncode != 0:
        report.errors.append(f"nft delete table {table}: {_first_line(done.stderr)}")
    else:
        report.removed.append(f"nftables table {table} (no flow kube-proxy DNATed is open)")


def _read_or_empty(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""      # no legacy tables at all in this namespace (module not loaded)


def _first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.splitlines()[0] if stripped else "(no message)"
