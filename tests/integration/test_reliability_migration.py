"""Migration from kube-proxy (issue 9, point 9): a node whose kube-proxy rules (its real
iptables or nftables layout, bench.kubeproxy) carry connections; bpfproxy starts, then
`bpfproxy cleanup --kube-proxy` removes kube-proxy's chains and tables and nothing else.
No established connection breaks and no new one fails."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from agent.model import desired_state
from agent.sources.manifests import ManifestSource
from bench.kubeproxy import load
from bench.kubeproxy.iptables import render_iptables
from bench.kubeproxy.nftables import render_nftables
from lab import manifests
from lab.agent_runner import BPFPROXY, AgentRunner
from tests import reliability_report, reliability_traffic

pytestmark = pytest.mark.integration

VIP = "10.96.0.90"
PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
         {"name": "hold", "port": 90, "targetPort": 9090, "protocol": "TCP"}]
SLICE_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"},
               {"name": "hold", "port": 9090, "protocol": "TCP"}]

# What is not kube-proxy's and must survive its cleanup: kubelet's chains and jumps, and
# someone else's chain with a rule (iptables-restore --noflush input, filter then nat).
OTHERS_IPTABLES = """*filter
:BPFP-USER - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
-A BPFP-USER -p tcp --dport 7 -j ACCEPT
-A INPUT -j BPFP-USER
COMMIT
*nat
:KUBE-MARK-DROP - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
-A KUBE-MARK-DROP -j MARK --or-mark 0x8000
COMMIT
*mangle
:KUBE-PROXY-CANARY - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
"""
OTHERS_NFT = """table inet bpfp-user {
  chain input { type filter hook input priority 10; policy accept; tcp dport 7 accept; }
}
"""


def render(kind: str, directory, node_ip: str) -> str:
    source = ManifestSource(directory)
    objects = [c.obj for c in source.rescan()]
    desired = desired_state([o for o in objects if o.key.kind == "Service"],
                            [o for o in objects if o.key.kind == "EndpointSlice"])
    if kind == "nftables":
        return render_nftables(desired, cluster_cidr="10.244.0.0/16", node_ips=[node_ip],
                               service_cidrs=["10.96.0.0/12"])
    return render_iptables(desired, cluster_cidr="10.244.0.0/16")


def node_tool(lab, *argv: str) -> str:
    done = lab.node_run(list(argv), timeout=60)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind,backend", [("iptables", "nft"), ("iptables", "legacy"),
                                          ("nftables", None)],
                         ids=["iptables-nft", "iptables-legacy", "nftables"])
def test_migration_from_kube_proxy_keeps_every_connection(make_lab, tmp_path, kind, backend):
    lab = make_lab(name=f"r9mig{kind[:3]}{(backend or '')[:3]}")
    backends = [lab.add_pod(f"backend-{c}") for c in "ab"]
    for pod in backends:
        pod.start_server([8080])
        reliability_traffic.start_server(pod, 9090)
    client = lab.add_pod("client")
    directory = tmp_path / "manifests"
    manifests.write(directory, "web.yaml", manifests.service("web", VIP, PORTS),
                    manifests.endpoint_slice("web", [p.ip for p in backends], SLICE_PORTS))
    # kube-proxy's replies come back over the pods' bridge: br_netfilter hands them to the
    # node's conntrack for the reverse NAT (on by default in a new namespace; made explicit)
    node_tool(lab, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1")
    text = render(kind, directory, lab.node_ip)
    if kind == "nftables":
        load.load_nftables(text + OTHERS_NFT, lab.node_netns)
    else:
        load.load_iptables(text, lab.node_netns, backend=backend)
    restore = "iptables-legacy-restore" if backend == "legacy" else "iptables-nft-restore"
    subprocess.run(["nsenter", f"--net=/run/netns/{lab.node_netns}", "--", restore,
                    "--noflush"], input=OTHERS_IPTABLES, text=True, check=True, timeout=60)
    before = saved_rules(lab, kind, backend)

    warm = client.tcp(VIP, 80, count=20)
    assert warm.errors == {} and warm.backends() == {p.name for p in backends}, \
        "kube-proxy's rules must carry the traffic before the migration starts"

    # both run until stopped: each makes its last round or request after the stop
    held = reliability_traffic.start_hold(client, VIP, 90, connections=8, duration=120,
                                          until_stopped=True)
    fresh = client.start_client("tcp", VIP, 80, duration=120, interval=0.02,
                                until_stopped=True)
    agent = AgentRunner(lab, directory)
    try:
        held.wait_round()                     # through kube-proxy's rules alone
        fresh.wait_started()
        agent.start()
        started_at = time.monotonic()
        held.wait_round(begun_after=started_at)      # through both
        cleanup = lab.node_run([*BPFPROXY, "cleanup", "--kube-proxy"], timeout=60)
        cleaned_at = time.monotonic()
        assert cleanup.returncode == 0, cleanup.stderr
        after_cleanup = client.tcp(VIP, 80, count=30)   # bpfproxy alone
        hold_result, fresh_result = held.stop(), fresh.stop()
    finally:
        agent.close()
    after = saved_rules(lab, kind, backend)

    conns = hold_result["connections"]
    failures = fresh_result.failed + after_cleanup.failed + \
        sum(c["error"] is not None for c in conns) + len(hold_result["connect_failures"])
    reliability_report.record(
        "9", f"migration-{kind}{'-' + backend if backend else ''}",
        f"kube-proxy {kind} rules{' (' + backend + ' backend)' if backend else ''} carrying "
        "8 held connections and a stream of new ones; bpfproxy started, then "
        "`bpfproxy cleanup --kube-proxy`",
        connections=fresh_result.total + after_cleanup.total + len(conns), failures=failures,
        held_connections=len(conns), new_connections=fresh_result.total + after_cleanup.total,
        cleanup_removed=cleanup.stdout.count("removed "),
        seconds_from_agent_start_to_cleanup=round(cleaned_at - started_at, 1))

    assert fresh_result.errors == {}, f"new connections failed: {fresh_result.errors}"
    assert fresh_result.backends() == {p.name for p in backends}
    assert after_cleanup.errors == {} and after_cleanup.backends() == {p.name for p in backends}
    assert len(conns) == 8 and hold_result["connect_failures"] == []
    for conn in conns:
        # every connection opened through kube-proxy's DNAT lived on after its rules went
        assert conn["error"] is None and conn["wrong_answers"] == 0, conn
        assert conn["last_ok"] > cleaned_at, conn
    # kube-proxy's own is gone, nothing else is
    assert "removed" in cleanup.stdout
    assert_only_kube_proxys_went(kind, before, after)
    if kind == "nftables":
        # the held connections were open: the table keeping their NAT stays, and says so;
        # once they ended (TIME_WAIT), the next cleanup removes it (issue 14.4)
        assert "kept nftables table ip bpfproxy-nat: it keeps NAT of " in cleanup.stdout, \
            cleanup.stdout
        again = lab.node_run([*BPFPROXY, "cleanup", "--kube-proxy"], timeout=60)
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == ("removed nftables table ip bpfproxy-nat (no flow "
                                        "kube-proxy DNATed is open)"), again.stdout
        assert "bpfproxy-nat" not in node_tool(lab, "nft", "list", "tables")


def saved_rules(lab, kind: str, backend: str | None) -> dict[str, str]:
    save = "iptables-legacy-save" if backend == "legacy" else "iptables-nft-save"
    rules = {table: node_tool(lab, save, "-t", table) for table in ("filter", "nat", "mangle")}
    rules["nft"] = node_tool(lab, "nft", "list", "tables")
    return rules


KUBE_PROXY_PATTERNS = ("KUBE-SERVICES", "KUBE-SVC-", "KUBE-SEP-", "KUBE-POSTROUTING",
                       "KUBE-MARK-MASQ", "KUBE-NODEPORTS", "KUBE-FORWARD",
                       "KUBE-EXTERNAL-SERVICES", "KUBE-PROXY-FIREWALL", "KUBE-PROXY-CANARY")


def _lines(text: str) -> set[str]:
    """Chains (without their packet counters) and rules of an iptables-save output."""
    return {" ".join(line.split()[:2]) if line.startswith(":") else line
            for line in text.splitlines() if line.startswith((":", "-A"))}


def assert_only_kube_proxys_went(kind: str, before: dict, after: dict) -> None:
    for table in ("filter", "nat", "mangle"):
        gone = {line.split()[0] + " " + line.split()[1] for line in
                _lines(before[table]) - _lines(after[table])}
        kept = _lines(after[table])
        assert not [line for line in kept if any(p in line for p in KUBE_PROXY_PATTERNS)], \
            f"{table}: kube-proxy rules left: {kept}"
        # whatever went was kube-proxy's
        assert all(any(p in line for p in KUBE_PROXY_PATTERNS) for line in
                   _lines(before[table]) - _lines(after[table])), (table, gone)
    assert ":BPFP-USER - " in after["filter"] and "-A INPUT -j BPFP-USER" in after["filter"]
    assert ":KUBE-KUBELET-CANARY" in after["filter"] and ":KUBE-MARK-DROP" in after["nat"]
    assert ":KUBE-KUBELET-CANARY" in after["mangle"]
    if kind == "iptables":
        # the layout carries kube-proxy's copy of kubelet's KUBE-FIREWALL: kubelet's, kept
        assert ":KUBE-FIREWALL" in after["filter"]
        assert "-A INPUT -j KUBE-FIREWALL" in after["filter"]
    assert "table ip kube-proxy" not in after["nft"]
    if kind == "nftables":
        assert "table ip kube-proxy" in before["nft"]
        assert "table inet bpfp-user" in after["nft"]
        # the empty nat chain that keeps NAT of the flows kube-proxy DNATed
        assert "table ip bpfproxy-nat" in after["nft"]


def test_cleanup_kube_proxy_with_nothing_to_remove(make_lab):
    lab = make_lab(name="r9migempty")
    done = lab.node_run([sys.executable, "-m", "agent.cli", "cleanup", "--kube-proxy"],
                        timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "nothing of kube-proxy's to remove"
    # listing legacy tables it did not find must not have created them
    tables = lab.node_run(["cat", "/proc/net/ip_tables_names"]).stdout.split()
    assert tables == [], tables
