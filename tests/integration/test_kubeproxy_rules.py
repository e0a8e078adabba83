"""kube-proxy's rule layouts from bench.kubeproxy in a real kernel: they load with
iptables-restore and nft -f inside throwaway namespaces, and real traffic reaches backends."""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from agent.model import desired_state
from agent.model.objects import parse_endpoint_slice, parse_service
from agent.model.types import Backend, Frontend, Protocol, ServicePortName, ServicePortState
from bench.kubeproxy import load
from bench.kubeproxy.iptables import JUMP_RULES, render_iptables, service_chain_name, service_order
from bench.kubeproxy.nftables import render_nftables, service_chain_base

pytestmark = [pytest.mark.integration]


def synthetic_state(
    count: int, endpoints: int = 3, first_ip: str = "10.96.0.10", first_backend: str = "10.244.1.0"
) -> dict:
    """count ClusterIP services (from first_ip up) with `endpoints` backends each."""
    desired = {}
    ip, backend = ipaddress.ip_address(first_ip), ipaddress.ip_address(first_backend)
    for i in range(count):
        name = ServicePortName("bench", f"svc-{i}", "http", Protocol.TCP)
        frontend = Frontend(ip + i, 80, Protocol.TCP)
        backends = tuple(
            Backend(backend + (i * endpoints + k) % 65000, 8080) for k in range(endpoints)
        )
        desired[name, 4] = ServicePortState(name, 4, (frontend,), backends)
    return desired


@pytest.fixture
def netns():
    """A throwaway network namespace bpfp-kpr-<random>, deleted (with its rules) afterwards."""
    name = f"bpfp-kpr-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)
        assert not Path("/run/netns", name).exists()


def test_loader_refuses_namespaces_it_did_not_make():
    for name in ("", "host", "../bpfp-x", "bpfp-kpr-does-not-exist"):
        with pytest.raises(ValueError):
            load.load_nftables("", name)


def test_iptables_50_services_load_and_show(netns):
    desired = synthetic_state(49)
    desired.update(
        desired_state(
            [
                parse_service(
                    {
                        "apiVersion": "v1",
                        "kind": "Service",
                        "metadata": {"namespace": "bench", "name": "empty"},
                        "spec": {
                            "clusterIP": "10.96.200.1",
                            "ports": [{"port": 80, "protocol": "TCP"}],
                        },
                    }
                )
            ],
            [],
        )
    )
    order = [name for name in service_order(desired) if desired[name, 4].backends]
    text = render_iptables(desired)
    seconds = load.load_iptables(text, netns)
    print(f"\niptables-restore of 50 services: {seconds * 1000:.1f} ms")

    nat = load.iptables_save(netns, table="nat")
    assert '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in nat
    assert '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in nat
    assert "-j KUBE-POSTROUTING" in nat
    for name in (order[0], order[-1]):
        assert f":{service_chain_name(name)} - " in nat
    services = [line for line in nat.splitlines() if line.startswith("-A KUBE-SERVICES")]
    assert len(services) == 50  # 49 with endpoints and the NodePort jump
    assert services[-1].endswith("-j KUBE-NODEPORTS") and "--dst-type LOCAL" in services[-1]
    assert "--probability 0.3333333" in nat and "--probability 0.5000000" in nat
    assert "-j MASQUERADE --random-fully" in nat
    filt = load.iptables_save(netns, table="filter")
    assert "bench/empty has no endpoints" in filt and "-j REJECT" in filt
    rules = load.rule_count(netns, "iptables")
    assert rules == sum(line.startswith("-A ") for line in text.splitlines()) + 14  # + jumps

    # A reload replaces the chains rather than adding to them.
    load.load_iptables(text, netns)
    assert load.rule_count(netns, "iptables") == rules
    load.flush_iptables(netns)
    assert load.rule_count(netns, "iptables") == 0
    assert "KUBE-" not in load.iptables_save(netns)


def test_nftables_50_services_load_and_show(netns):
    desired = synthetic_state(50)
    order = service_order(desired)
    text = render_nftables(desired, node_ips=["10.244.1.1"], service_cidrs=["10.96.0.0/12"])
    seconds = load.load_nftables(text, netns)
    print(f"\nnft -f of 50 services: {seconds * 1000:.1f} ms")

    ruleset = load.nft_list(netns)
    assert "table ip kube-proxy" in ruleset
    assert "ip daddr . meta l4proto . th dport vmap @service-ips" in ruleset
    for name in (order[0], order[-1]):
        assert f"chain service-{service_chain_base(name)} {{" in ruleset
    assert "numgen random mod 3 vmap" in ruleset
    assert "masquerade fully-random" in ruleset
    rules = load.rule_count(netns, "nftables")
    assert rules == sum(line.startswith("add rule") for line in text.splitlines())

    load.load_nftables(text, netns)  # the file replaces the table: same rules again
    assert load.rule_count(netns, "nftables") == rules
    load.flush_nftables(netns)
    assert "kube-proxy" not in load.nft_list(netns)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("count", [1000])
def test_load_times(netns, count):
    """Every load, reload and removal of a sizeable rule set succeeds, with the rule counts
    kube-proxy's layout implies (times are printed; 10k services is the bench's business:
    it takes minutes with the nf_tables backend)."""
    desired = synthetic_state(count)
    ipt = render_iptables(desired)
    nft = render_nftables(desired, node_ips=["10.244.1.1"], service_cidrs=["10.96.0.0/12"])
    times = {
        "iptables-restore (nft backend)": load.load_iptables(ipt, netns),
        "iptables-restore again": load.load_iptables(ipt, netns),
    }
    # 11 nat rules per service (1 in KUBE-SERVICES, 4 in KUBE-SVC, 2 in each of 3 KUBE-SEP).
    assert load.rule_count(netns, "iptables") == count * 11 + 9 + len(JUMP_RULES)
    times["iptables removal"] = load.flush_iptables(netns)
    times["nft -f"] = load.load_nftables(nft, netns)
    times["nft -f again (replaces the table)"] = load.load_nftables(nft, netns)
    # 8 rules per service (2 in the service chain, 2 in each of 3 endpoint chains).
    assert load.rule_count(netns, "nftables") == count * 8 + 23
    times["nft removal"] = load.flush_nftables(netns)
    print(f"\n{count} services x 3 endpoints:")
    for what, seconds in times.items():
        print(f"  {what:36s} {seconds:8.3f} s")


def test_bridge_nf_call_iptables_is_per_namespace(netns):
    """The lab's pods share one bridge: backends answer clients over it, so the node's
    conntrack sees replies only through br_netfilter. Its switch is per namespace here."""
    knob = "/proc/sys/net/bridge/bridge-nf-call-iptables"
    host = Path(knob).read_text().strip()

    def in_netns(cmd: str) -> str:
        return subprocess.run(
            ["nsenter", f"--net=/run/netns/{netns}", "--", "sh", "-c", cmd],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    assert in_netns(f"cat {knob}") == "1"  # a new namespace starts with it on
    assert in_netns(f"echo 0 > {knob}; cat {knob}") == "0"
    assert Path(knob).read_text().strip() == host


# --- real traffic through the rules, in a lab ------------------------------------------

CLUSTER_IP, EMPTY_IP = "10.96.0.10", "10.96.0.11"


def lab_state(backends: list[str]) -> dict:
    services = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "default", "name": n},
         "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                              "protocol": "TCP"},
                                             {"name": "dns", "port": 53, "targetPort": 8080,
                                              "protocol": "UDP"}]}}
        for n, ip in (("web", CLUSTER_IP), ("empty", EMPTY_IP))
    ]  # fmt: skip
    web_slice = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "default", "name": "web-1",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip]} for ip in backends],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "dns", "port": 8080, "protocol": "UDP"}],
    }  # fmt: skip
    desired = desired_state([parse_service(s) for s in services],
                            [parse_endpoint_slice(web_slice)])  # fmt: skip
    # Services ahead of and behind "web" in KUBE-SERVICES, as in a real node.
    filler = synthetic_state(48, first_ip="10.96.1.0", first_backend="10.244.100.0")
    desired.update(filler)
    return desired


@pytest.fixture
def traffic_lab(lab):
    a, b, client = lab.add_pod("pod-a"), lab.add_pod("pod-b"), lab.add_pod("client")
    for server in (a, b):
        server.start_server(ports=[8080], udp=True)
    # Replies from a backend reach the client over the bridge; br_netfilter hands them to the
    # node's conntrack for the reverse NAT. On by default in a new namespace; made explicit.
    subprocess.run(["nsenter", f"--net=/run/netns/{lab.node_netns}", "--", "sysctl", "-qw",
                    "net.bridge.bridge-nf-call-iptables=1"], check=True)  # fmt: skip
    return lab, a, b, client


def check_traffic(a, b, client) -> None:
    tcp = client.tcp(CLUSTER_IP, 80, count=40)
    assert not tcp.errors and tcp.wrong_peer == 0, tcp
    assert set(tcp.answers) == {f"{a.name}:8080", f"{b.name}:8080"}, tcp
    udp = client.udp(CLUSTER_IP, 53, count=40)
    # wrong_source would mean the reply skipped the reverse NAT (bridge bypassing conntrack).
    assert not udp.errors and udp.wrong_source == 0, udp
    assert set(udp.answers) == {f"{a.name}:8080", f"{b.name}:8080"}, udp
    # A service without endpoints never reaches a pod. (The lab routes the service CIDR as
    # unreachable, so the node answers before kube-proxy's REJECT in FORWARD would.)
    empty = client.tcp(EMPTY_IP, 80, count=2)
    assert not empty.answers and sum(empty.errors.values()) == 2, empty


@pytest.mark.timeout(240)
def test_iptables_rules_carry_real_traffic(traffic_lab):
    lab, a, b, client = traffic_lab
    text = render_iptables(lab_state([a.ip, b.ip]), cluster_cidr="10.244.0.0/16")
    try:
        load.load_iptables(text, lab.node_netns)
        check_traffic(a, b, client)
    finally:
        load.flush_iptables(lab.node_netns)
    after = client.tcp(CLUSTER_IP, 80, count=2)
    assert not after.answers, after


@pytest.mark.timeout(240)
def test_nftables_rules_carry_real_traffic(traffic_lab):
    lab, a, b, client = traffic_lab
    text = render_nftables(lab_state([a.ip, b.ip]), cluster_cidr="10.244.0.0/16",
                           node_ips=[lab.node_ip], service_cidrs=["10.96.0.0/12"])  # fmt: skip
    try:
        load.load_nftables(text, lab.node_netns)
        check_traffic(a, b, client)
    finally:
        load.flush_nftables(lab.node_netns)
    after = client.tcp(CLUSTER_IP, 80, count=2)
    assert not after.answers, after


@pytest.mark.timeout(240)
def test_without_bridge_netfilter_replies_bypass_the_node(traffic_lab):
    """Why the lab needs bridge-nf-call-iptables=1 for these contestants: without it the
    backend's reply is switched straight to the client, un-NATed, and the connection fails."""
    lab, a, b, client = traffic_lab
    text = render_iptables(lab_state([a.ip, b.ip]), cluster_cidr="10.244.0.0/16")
    sysctl = ["nsenter", f"--net=/run/netns/{lab.node_netns}", "--", "sysctl", "-qw"]
    try:
        load.load_iptables(text, lab.node_netns)
        subprocess.run([*sysctl, "net.bridge.bridge-nf-call-iptables=0"], check=True)
        time.sleep(0.1)
        tcp = client.tcp(CLUSTER_IP, 80, count=3, timeout=1.0)
        assert not tcp.answers, tcp
        udp = client.udp(CLUSTER_IP, 53, count=3, timeout=1.0)
        assert udp.answered and udp.wrong_source == udp.answered, udp  # replies from pod IPs
    finally:
        subprocess.run([*sysctl, "net.bridge.bridge-nf-call-iptables=1"], check=True)
        load.flush_iptables(lab.node_netns)
