"""`bpfproxy cleanup --kube-proxy`: what it would remove from kube-proxy's real rule layout
(bench.kubeproxy renders it), and the commands it runs, against a scripted tool runner."""
from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

from agent import kubeproxy_cleanup as kpc
from agent.model.types import Backend, Frontend, Protocol, ServicePortName, ServicePortState
from bench.kubeproxy import iptables as kp_iptables

KUBELET_CHAINS = ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-MARK-DROP")


def desired(count: int = 3) -> dict:
    state = {}
    for i in range(count):
        name = ServicePortName("default", f"svc-{i}", "http", Protocol.TCP)
        backends = tuple(Backend(ipaddress.ip_address(f"10.244.1.{10 + k}"), 8080)
                         for k in range(2)) if i else ()
        state[name, 4] = ServicePortState(
            name, 4, (Frontend(ipaddress.ip_address(f"10.96.0.{10 + i}"), 80,
                               Protocol.TCP),), backends)
    return state


def saved(table: str, extra_chains: tuple[str, ...] = ()) -> str:
    """iptables-save -t TABLE of a node carrying kube-proxy's layout, kubelet's chains and
    someone else's (DOCKER)."""
    text = kp_iptables.render_iptables(desired())
    parts = text.split(f"*{table}\n")
    section = parts[1].split("COMMIT")[0] if len(parts) > 1 else ""
    builtin = {"nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
               "filter": ("INPUT", "FORWARD", "OUTPUT"),
               "mangle": ("PREROUTING", "OUTPUT")}[table]
    lines = [f"*{table}", *(f":{c} ACCEPT [0:0]" for c in builtin)]
    lines += [line for line in section.splitlines() if line.startswith(":")]
    lines += [f":{c} - [0:0]" for c in extra_chains]
    lines += [line for line in section.splitlines() if line.startswith("-A")]
    return "\n".join([*lines, "COMMIT"]) + "\n"


def test_jump_rules_are_kube_proxys_minus_kubelets():
    ours = {(j.table, j.source, j.args()) for j in kpc.JUMP_RULES}
    bench = {(t, src, args) for t, src, args in kp_iptables.JUMP_RULES}
    kubelet = {(t, src, args) for t, src, args in bench if args[-1] == "KUBE-FIREWALL"}
    assert len(kubelet) == 2
    # the bench mirrors what kube-proxy ensures; cleanup removes all of it but kubelet's,
    # plus the pre-1.20 filter INPUT -> KUBE-SERVICES jump
    assert ours - (bench - kubelet) == {("filter", "INPUT", (
        "-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
        "kubernetes service portals", "-j", "KUBE-SERVICES"))}
    assert bench - kubelet <= ours


def test_nat_chains_of_the_real_layout_are_removed_and_nothing_else():
    chains = kpc.chains_in(saved("nat", ("KUBE-MARK-DROP", "KUBE-KUBELET-CANARY", "DOCKER",
                                          "KUBE-EXT-ABC", "KUBE-SVL-ABC", "KUBE-FW-ABC",
                                          "KUBE-XLB-ABC", "KUBE-PROXY-CANARY")))
    doomed = kpc.chains_to_remove("nat", chains)
    assert doomed[:5] == ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING",
                          "KUBE-MARK-MASQ", "KUBE-PROXY-CANARY"]
    assert {c for c in chains if c.startswith(("KUBE-SVC-", "KUBE-SEP-"))} <= set(doomed)
    assert sum(c.startswith("KUBE-SVC-") for c in doomed) == 2      # svc-0 has no endpoints
    assert sum(c.startswith("KUBE-SEP-") for c in doomed) == 4
    assert {"KUBE-EXT-ABC", "KUBE-SVL-ABC", "KUBE-FW-ABC", "KUBE-XLB-ABC"} <= set(doomed)
    assert not set(doomed) & {"KUBE-MARK-DROP", "KUBE-KUBELET-CANARY", "DOCKER", "PREROUTING",
                              "OUTPUT", "POSTROUTING", "INPUT"}


def test_filter_keeps_kubelets_firewall():
    chains = kpc.chains_in(saved("filter", ("KUBE-KUBELET-CANARY",)))
    assert "KUBE-FIREWALL" in chains            # the layout has kube-proxy's copy of it
    assert kpc.chains_to_remove("filter", chains) == [
        "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL"]
    assert kpc.chains_to_remove("mangle", ["KUBE-PROXY-CANARY"]) == []   # -X'd on its own


def test_restore_input_flushes_every_chain_before_deleting_any():
    text = kpc.restore_input("nat", ["KUBE-SERVICES", "KUBE-SVC-X", "KUBE-SEP-Y"])
    assert text == ("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n:KUBE-SEP-Y - [0:0]\n"
                    "-X KUBE-SERVICES\n-X KUBE-SVC-X\n-X KUBE-SEP-Y\nCOMMIT\n")
    assert kpc.restore_input("nat", []) == ""


def test_only_jumps_whose_target_exists_are_tried():
    jumps = kpc.jumps_to_remove("nat", ["PREROUTING", "KUBE-SERVICES"])
    assert [(j.source, j.target) for j in jumps] == [("OUTPUT", "KUBE-SERVICES"),
                                                      ("PREROUTING", "KUBE-SERVICES")]
    assert kpc.jumps_to_remove("filter", ["INPUT", "KUBE-FIREWALL"]) == []


def test_nft_deletion_keeps_a_nat_chain_in_the_same_transaction():
    assert kpc.nft_delete_input("ip6 kube-proxy") == (
        "add table ip6 bpfproxy-nat\n"
        "add chain ip6 bpfproxy-nat keepalive { type nat hook postrouting priority 1000 ; "
        "policy accept ; }\n"
        "flush chain ip6 bpfproxy-nat keepalive\n"
        "add rule ip6 bpfproxy-nat keepalive ct state established,related accept\n"
        "delete table ip6 kube-proxy\n")


def test_nft_tables_of_kube_proxy_only():
    listing = "table ip filter\ntable ip kube-proxy\ntable ip6 kube-proxy\ntable inet kube-x\n"
    assert kpc.nft_tables_to_delete(listing) == ["ip kube-proxy", "ip6 kube-proxy"]
    assert kpc.nft_tables_to_delete("table ip nat\n") == []


class ScriptedTools:
    """Answers like the tools would on a node whose iptables-nft holds kube-proxy's IPv4
    layout (jump rules present twice in nat OUTPUT) and whose nftables holds its table."""

    def __init__(self, nft_tables: str = "table ip filter\ntable ip kube-proxy\n") -> None:
        self.calls: list[list[str]] = []
        self.stdin_of: dict[tuple, str | None] = {}
        self.jumps_left = {("nat", "OUTPUT"): 2}
        self.nft_tables = nft_tables

    def __call__(self, argv: list[str], stdin: str | None) -> subprocess.CompletedProcess:
        self.calls.append(argv)
        self.stdin_of[tuple(argv)] = stdin
        tool = argv[0]
        out, code = "", 0
        if tool == "iptables-nft-save":
            out = saved(argv[2], ("KUBE-KUBELET-CANARY", "KUBE-PROXY-CANARY")
                        if argv[2] != "filter" else ())
        elif tool.endswith("-save"):
            out = f"*{argv[2]}\n:INPUT ACCEPT [0:0]\nCOMMIT\n"
        elif tool == "iptables-nft" and ("-C" in argv or "-D" in argv):
            key = (argv[4], argv[6])
            code = 0 if self.jumps_left.get(key, 1) > 0 else 1
            if "-D" in argv and code == 0:
                self.jumps_left[key] = self.jumps_left.get(key, 1) - 1
        elif tool == "nft" and argv[1] == "list":
            out = self.nft_tables
        return subprocess.CompletedProcess(argv, code, out, "")


def test_cleanup_runs_the_tools_by_argument_list():
    tools = ScriptedTools()
    which = {"iptables-nft": "/x", "ip6tables-nft": "/x", "iptables-legacy": "/x",
             "nft": "/x"}.get
    legacy_tables = {Path("/proc/net/ip_tables_names"): ""}     # legacy holds nothing here
    report = kpc.cleanup(tools, which, lambda p: legacy_tables.get(p, ""), lambda family: 3)
    assert report.errors == []
    commands = [" ".join(c) for c in tools.calls]
    # legacy: nothing is listed, so not even iptables-legacy-save runs (it would create it)
    assert not any(c.startswith(("iptables-legacy", "ip6tables-legacy")) for c in commands)
    assert "ip6tables-legacy" not in str(tools.calls)
    # both nat OUTPUT copies are deleted; every deletion follows a successful check
    assert commands.count("iptables-nft -w 5 -t nat -D OUTPUT -m comment --comment "
                          "kubernetes service portals -j KUBE-SERVICES") == 2
    (nft,) = [c for c in tools.calls if c[:2] == ["nft", "-f"]]
    assert tools.stdin_of[tuple(nft)] == kpc.nft_delete_input("ip kube-proxy")
    assert "iptables-nft -w 5 -t mangle -X KUBE-PROXY-CANARY" in commands
    restores = [c for c in tools.calls if c[0] == "iptables-nft-restore"]
    assert [c[1:] for c in restores] == [["-w", "5", "--noflush"]] * 2
    removed = "\n".join(report.removed)
    assert "KUBE-KUBELET-CANARY" not in removed and "KUBE-FIREWALL" not in removed
    assert "iptables-nft nat chain KUBE-SERVICES" in removed
    assert "nftables table ip kube-proxy" in removed
    assert not any("KUBE-FIREWALL" in c for c in commands if not c.endswith("-save -t filter"))


def test_a_failed_restore_is_reported_and_the_rest_still_runs():
    class Failing(ScriptedTools):
        def __call__(self, argv, stdin):
            if argv[0] == "iptables-nft-restore" and stdin.startswith("*nat"):
                self.calls.append(argv)
                return subprocess.CompletedProcess(argv, 4, "", "iptables-restore: line 9 "
                                                   "failed\nmore")
            return super().__call__(argv, stdin)

    tools = Failing()
    report = kpc.cleanup(tools, {"iptables-nft": "/x", "nft": "/x"}.get, lambda p: "",
                         lambda family: 0)
    assert report.errors == ["iptables-nft-restore (nat): iptables-restore: line 9 failed"]
    assert "iptables-nft filter chain KUBE-FORWARD" in report.removed
    assert any(r.startswith("nftables table ip kube-proxy") for r in report.removed)


# --- the NAT keepalive table goes once no flow kube-proxy DNATed is open (issue 14.4) --------

NFT_ONLY = {"nft": "/x"}.get


def test_the_keepalive_stays_while_flows_kube_proxy_dnated_are_open_and_says_so():
    tools = ScriptedTools()
    asked = []
    report = kpc.cleanup(tools, NFT_ONLY, lambda p: "", lambda family: asked.append(family) or 8)
    assert report.errors == [] and asked == [4]
    assert report.removed == ["nftables table ip kube-proxy"]
    assert report.kept == ["nftables table ip bpfproxy-nat: it keeps NAT of 8 open IPv4 flows "
                           "DNATed before kube-proxy's rules went; run `bpfproxy cleanup "
                           "--kube-proxy` again once they ended to remove it"]
    assert not any(c[:2] == ["nft", "delete"] for c in tools.calls)


def test_the_keepalive_goes_in_the_same_run_when_no_dnated_flow_is_open():
    tools = ScriptedTools()
    report = kpc.cleanup(tools, NFT_ONLY, lambda p: "", lambda family: 0)
    assert report.errors == [] and report.kept == []
    assert report.removed == ["nftables table ip kube-proxy",
                              "nftables table ip bpfproxy-nat (no flow kube-proxy DNATed is "
                              "open)"]
    # after kube-proxy's table went (with the keepalive added in that transaction)
    nft = [c for c in tools.calls if c[0] == "nft" and c[1] != "list"]
    assert nft == [["nft", "-f", "-"], ["nft", "delete", "table", "ip", "bpfproxy-nat"]]


def test_a_later_run_removes_the_keepalive_once_the_flows_ended():
    tools = ScriptedTools("table ip filter\ntable ip6 bpfproxy-nat\ntable ip bpfproxy-nat\n")
    open_flows = {4: 0, 6: 2}
    report = kpc.cleanup(tools, NFT_ONLY, lambda p: "", open_flows.__getitem__)
    assert report.removed == ["nftables table ip bpfproxy-nat (no flow kube-proxy DNATed is "
                              "open)"]
    assert report.kept[0].startswith("nftables table ip6 bpfproxy-nat: it keeps NAT of 2 "
                                     "open IPv6 flows")
    assert ["nft", "delete", "table", "ip6", "bpfproxy-nat"] not in tools.calls


def test_unreadable_conntrack_keeps_the_keepalive():
    def unreadable(family):
        raise PermissionError(1, "Operation not permitted")

    report = kpc.cleanup(ScriptedTools(), NFT_ONLY, lambda p: "", unreadable)
    assert report.errors == [] and len(report.kept) == 1
    assert "conntrack unreadable" in report.kept[0]


def test_only_open_dnated_flows_count():
    from agent.datapath.nf_conntrack import IPS_DST_NAT, is_open_dnat
    assert is_open_dnat(IPS_DST_NAT | 0x8, 3)            # established TCP
    assert is_open_dnat(IPS_DST_NAT, None)                # UDP: open until it expires
    assert not is_open_dnat(IPS_DST_NAT, 7)               # TIME_WAIT: over
    assert not is_open_dnat(0x10 | 0x8, 3)                # SNAT only: not kube-proxy's DNAT
