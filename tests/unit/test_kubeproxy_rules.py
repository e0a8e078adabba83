"""The bench's kube-proxy rule generators against kube-proxy's own expected rule sets.
Cases are copied from kubernetes/kubernetes pkg/proxy/{iptables,nftables}/proxier_test.go."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from agent.model import desired_state
from agent.model.objects import parse_endpoint_slice, parse_service
from agent.model.types import (
    Backend,
    Frontend,
    NodeContext,
    Protocol,
    ServicePortName,
    ServicePortState,
)
from bench.kubeproxy.iptables import (
    JUMP_RULES,
    endpoint_chain_name,
    port_proto_hash,
    probability,
    render_iptables,
    service_chain_name,
    service_order,
)
from bench.kubeproxy.nftables import (
    endpoint_chain_base,
    render_nftables,
    service_chain_base,
)
from lab import manifests

# --- building inputs the way kube-proxy's tests do (makeTestService / makeTestEndpointSlice)


def service(ns: str, name: str, cluster_ip: str, ports: list[tuple[str, int, str]]) -> dict:
    return manifests.service(name, cluster_ip, _ports(ports), ns)


def endpoint_slice(ns: str, name: str, ips: list[str], ports: list[tuple[str, int, str]]) -> dict:
    return manifests.endpoint_slice(name, ips, _ports(ports), ns, name=f"{name}-1",
                                    node_name=None)


def _ports(ports: list[tuple[str, int, str]]) -> list[dict]:
    return [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports]


def state(services: list[dict], slices: list[dict]):
    return desired_state(
        [parse_service(s) for s in services], [parse_endpoint_slice(s) for s in slices]
    )


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


# --- a port of proxier_test.go's sortIPTablesRules (its expectations are in that order) -------


def sort_iptables_rules(data: str) -> str:
    """Tables by name; chains KUBE-NODEPORTS, KUBE-SERVICES, other KUBE-* alphabetically, then
    the rest; rules grouped by chain, keeping their order, except KUBE-SERVICES and
    KUBE-NODEPORTS sorted (stably) by the service name in the comment, the "must be the last
    rule" rule staying last."""
    tables: dict[str, tuple[list[str], dict[str, list[str]]]] = {}
    current = None
    for line in data.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:], ([], {}))
        elif line.startswith(":"):
            current[0].append(line)
        elif line.startswith("-A "):
            current[1].setdefault(line.split()[1], []).append(line)
        elif line and line != "COMMIT":
            raise AssertionError(f"unexpected line {line!r}")

    def chain_key(chain_line: str) -> tuple:
        name = chain_line[1:].split()[0]
        rank = {"KUBE-NODEPORTS": 0, "KUBE-SERVICES": 1}.get(name)
        return (rank, "") if rank is not None else (2 if name.startswith("KUBE-") else 3, name)

    def service_name(rule: str) -> str:
        if "must be the last rule" in rule:
            return "\U0010ffff"
        comment = rule.split("--comment ", 1)[1].lstrip('"')
        end = min((i for i in (comment.find(" "), comment.find(":")) if i != -1), default=None)
        return comment[:end]

    out = []
    for table in sorted(tables):
        chain_lines, rules = tables[table]
        chain_lines = sorted(chain_lines, key=chain_key)
        out += [f"*{table}", *chain_lines]
        for chain_line in chain_lines:
            chain = chain_line[1:].split()[0]
            chain_rules = rules.get(chain, [])
            if chain in ("KUBE-SERVICES", "KUBE-NODEPORTS"):
                chain_rules = sorted(chain_rules, key=service_name)
            out += chain_rules
        out.append("COMMIT")
    return "\n".join(out) + "\n"


# --- iptables ----------------------------------------------------------------------------

# TestSyncProxyRulesRepeated (pkg/proxy/iptables/proxier_test.go), the first full sync:
# ns1/svc1:p80 172.30.0.41 -> 10.0.1.1:80 and ns2/svc2:p8080 172.30.0.42 -> 10.0.2.1:8080,
# with the fake proxier's pod CIDR 10.0.0.0/8, nfacct counters present and an iptables fake
# without --random-fully.
SYNC_PROXY_RULES_REPEATED_EXPECTED = dedent("""
    *filter
    :KUBE-NODEPORTS - [0:0]
    :KUBE-SERVICES - [0:0]
    :KUBE-EXTERNAL-SERVICES - [0:0]
    :KUBE-FIREWALL - [0:0]
    :KUBE-FORWARD - [0:0]
    :KUBE-PROXY-FIREWALL - [0:0]
    -A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
    -A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
    -A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
    -A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
    COMMIT
    *nat
    :KUBE-NODEPORTS - [0:0]
    :KUBE-SERVICES - [0:0]
    :KUBE-MARK-MASQ - [0:0]
    :KUBE-POSTROUTING - [0:0]
    :KUBE-SEP-SNQ3ZNILQDEJNDQO - [0:0]
    :KUBE-SEP-UHEGFW77JX3KXTOV - [0:0]
    :KUBE-SVC-2VJB64SDSIJUP5T6 - [0:0]
    :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
    -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
    -A KUBE-SERVICES -m comment --comment "ns2/svc2:p8080 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 8080 -j KUBE-SVC-2VJB64SDSIJUP5T6
    -A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
    -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
    -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
    -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
    -A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
    -A KUBE-SEP-SNQ3ZNILQDEJNDQO -m comment --comment ns1/svc1:p80 -s 10.0.1.1 -j KUBE-MARK-MASQ
    -A KUBE-SEP-SNQ3ZNILQDEJNDQO -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.1.1:80
    -A KUBE-SEP-UHEGFW77JX3KXTOV -m comment --comment ns2/svc2:p8080 -s 10.0.2.1 -j KUBE-MARK-MASQ
    -A KUBE-SEP-UHEGFW77JX3KXTOV -m comment --comment ns2/svc2:p8080 -m tcp -p tcp -j DNAT --to-destination 10.0.2.1:8080
    -A KUBE-SVC-2VJB64SDSIJUP5T6 -m comment --comment "ns2/svc2:p8080 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 8080 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-2VJB64SDSIJUP5T6 -m comment --comment "ns2/svc2:p8080 -> 10.0.2.1:8080" -j KUBE-SEP-UHEGFW77JX3KXTOV
    -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.0.1.1:80" -j KUBE-SEP-SNQ3ZNILQDEJNDQO
    COMMIT
""")  # noqa: E501


def sync_proxy_rules_repeated_state():
    return state(
        [service("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP")]),
         service("ns2", "svc2", "172.30.0.42", [("p8080", 8080, "TCP")])],
        [endpoint_slice("ns1", "svc1", ["10.0.1.1"], [("p80", 80, "TCP")]),
         endpoint_slice("ns2", "svc2", ["10.0.2.1"], [("p8080", 8080, "TCP")])],
    )  # fmt: skip


def test_iptables_matches_test_sync_proxy_rules_repeated():
    rendered = render_iptables(
        sync_proxy_rules_repeated_state(), cluster_cidr="10.0.0.0/8",
        random_fully=False, nfacct=True,
    )  # fmt: skip
    assert sort_iptables_rules(rendered) == SYNC_PROXY_RULES_REPEATED_EXPECTED


# TestSyncProxyRulesRepeated, the full resync at its end: ns3/svc3:p80 with two endpoints
# (the probability ladder) next to ns1/svc1:p80. Only svc3's rules are compared: that sync
# also deletes svc4's stale chains (-X), which a fresh full sync never has.
SVC3_TWO_ENDPOINTS_EXPECTED = dedent("""
    -A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
    -A KUBE-SEP-DKCFIS26GWF2WLWC -m comment --comment ns3/svc3:p80 -s 10.0.3.2 -j KUBE-MARK-MASQ
    -A KUBE-SEP-DKCFIS26GWF2WLWC -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.3.2:80
    -A KUBE-SEP-JVVZVJ7BSEPPRNBS -m comment --comment ns3/svc3:p80 -s 10.0.3.3 -j KUBE-MARK-MASQ
    -A KUBE-SEP-JVVZVJ7BSEPPRNBS -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.3.3:80
    -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.0.3.2:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-DKCFIS26GWF2WLWC
    -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.0.3.3:80" -j KUBE-SEP-JVVZVJ7BSEPPRNBS
""")  # noqa: E501


def test_iptables_two_endpoints_match_test_sync_proxy_rules_repeated():
    desired = state(
        [service("ns3", "svc3", "172.30.0.43", [("p80", 80, "TCP")])],
        [endpoint_slice("ns3", "svc3", ["10.0.3.3", "10.0.3.2"], [("p80", 80, "TCP")])],
    )
    rendered = sort_iptables_rules(render_iptables(desired, cluster_cidr="10.0.0.0/8"))
    svc3 = [line for line in rendered.splitlines() if "ns3/svc3" in line]
    assert "\n".join(svc3) + "\n" == SVC3_TWO_ENDPOINTS_EXPECTED


# Chain names that appear in kube-proxy's expected outputs (TestSortIPTablesRules,
# TestSyncProxyRulesRepeated, TestOverallIPTablesRules).
@pytest.mark.parametrize(
    "name, protocol, endpoint, want",
    [
        ("ns1/svc1:p80", "tcp", None, "KUBE-SVC-XPGD46QRK7WJZT7O"),
        ("ns2/svc2:p80", "tcp", None, "KUBE-SVC-GNZBNJ2PO5MGZ6GT"),
        ("ns3/svc3:p80", "tcp", None, "KUBE-SVC-X27LE4BHSL4DOUIK"),
        ("ns4/svc4:p80", "tcp", None, "KUBE-SVC-4SW47YFZTEDKD3PK"),
        ("ns2/svc2:p8080", "tcp", None, "KUBE-SVC-2VJB64SDSIJUP5T6"),
        ("ns1/svc1:p80", "tcp", "10.180.0.1:80", "KUBE-SEP-SXIVWICOYRO3J4NJ"),
        ("ns4/svc4:p80", "tcp", "10.180.0.4:80", "KUBE-SEP-UKSFD7AGPMPPLUHC"),
        ("ns4/svc4:p80", "tcp", "10.180.0.5:80", "KUBE-SEP-C6EBXVWJJZMIWKLZ"),
        ("ns4/svc4:p80", "tcp", "10.0.4.1:80", "KUBE-SEP-AYCN5HPXMIRJNJXU"),
    ],
)
def test_chain_names_equal_kube_proxy(name, protocol, endpoint, want):
    ns, rest = name.split("/")
    svc, port = rest.split(":")
    spn = ServicePortName(ns, svc, port, Protocol(protocol.upper()))
    got = service_chain_name(spn) if endpoint is None else endpoint_chain_name(spn, endpoint)
    assert got == want
    if endpoint is None:
        assert want == "KUBE-SVC-" + port_proto_hash(name, protocol)


def test_unnamed_port_hashes_without_colon():
    # ServicePortName.String() omits ":" for an unnamed port.
    spn = ServicePortName("default", "web", "", Protocol.TCP)
    assert service_chain_name(spn) == "KUBE-SVC-" + port_proto_hash("default/web", "tcp")


def test_probability_ladder():
    assert [probability(n) for n in (4, 3, 2)] == ["0.2500000000", "0.3333333333", "0.5000000000"]
    desired = state(
        [service("ns", "web", "10.96.0.10", [("http", 80, "TCP")])],
        [endpoint_slice("ns", "web", ["10.244.1.2", "10.244.1.10", "10.244.1.3"],
                        [("http", 8080, "TCP")])],
    )  # fmt: skip
    rules = [line for line in render_iptables(desired).splitlines()
             if line.startswith("-A KUBE-SVC-") and "KUBE-SEP-" in line]  # fmt: skip
    # Endpoints in kube-proxy's order: by "ip:port" string, so .10 comes before .2.
    assert [r.split("-> ")[1].split('"')[0] for r in rules] == [
        "10.244.1.10:8080",
        "10.244.1.2:8080",
        "10.244.1.3:8080",
    ]
    assert "--probability 0.3333333333" in rules[0]
    assert "--probability 0.5000000000" in rules[1]
    assert "statistic" not in rules[2]


def test_no_endpoints_rejected_in_filter_and_absent_from_nat():
    desired = state([service("ns6", "svc6", "172.30.0.46", [("p80", 80, "TCP")])], [])
    rendered = render_iptables(desired, cluster_cidr="10.0.0.0/8")
    assert (
        '-A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp'
        " -d 172.30.0.46 --dport 80 -j REJECT"
    ) in rendered
    nat = rendered.split("*nat\n")[1]
    assert "ns6/svc6" not in nat and "KUBE-SVC-" not in nat


def test_nodeports_jump_is_last_and_random_fully_by_default():
    rendered = render_iptables(sync_proxy_rules_repeated_state())
    nat_services = [line for line in rendered.split("*nat\n")[1].splitlines()
                    if line.startswith("-A KUBE-SERVICES ")]  # fmt: skip
    assert nat_services[-1].endswith("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
    assert ":KUBE-NODEPORTS - [0:0]" in rendered.split("*nat\n")[1]
    assert "-j MASQUERADE --random-fully" in rendered
    assert "nfacct" not in rendered
    assert "! -s 10.244.0.0/16 -j KUBE-MARK-MASQ" in rendered


def test_masquerade_all_and_no_cluster_cidr():
    desired = sync_proxy_rules_repeated_state()
    all_masq = render_iptables(desired, masquerade_all=True)
    assert (
        '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP"'
        " -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-MARK-MASQ"
    ) in all_masq
    no_detector = render_iptables(desired, cluster_cidr=None)
    assert not any(line.startswith("-A KUBE-SVC-") and "KUBE-MARK-MASQ" in line
                   for line in no_detector.splitlines())  # fmt: skip


def test_large_cluster_mode_drops_endpoint_comments():
    # largeClusterEndpointsThreshold is 1000 endpoints in total.
    services = [service("ns", f"s{i}", f"10.96.{i // 250}.{i % 250 + 1}", [("p", 80, "TCP")])
                for i in range(334)]  # fmt: skip
    slices = [endpoint_slice("ns", f"s{i}", [f"10.244.{i // 80}.{3 * (i % 80) + k + 1}"
                                             for k in range(3)], [("p", 80, "TCP")])
              for i in range(334)]  # fmt: skip
    small = render_iptables(state(services[:333], slices[:333]))  # 999 endpoints
    large = render_iptables(state(services, slices))  # 1002 endpoints
    assert any(line.startswith("-A KUBE-SEP-") and "--comment" in line
               for line in small.splitlines())  # fmt: skip
    for line in large.splitlines():
        if line.startswith(("-A KUBE-SEP-", "-A KUBE-SVC-")) and "KUBE-SEP-" in line.split()[-1]:
            assert "--comment" not in line
        if line.startswith("-A KUBE-SERVICES") or (
            line.startswith("-A KUBE-SVC-") and "KUBE-MARK-MASQ" in line
        ):
            assert "--comment" in line  # KUBE-SERVICES and masquerade rules keep theirs


def test_service_order_is_sorted_and_used_for_kube_services():
    desired = state(
        [service("b", "web", "10.96.0.3", [("http", 80, "TCP")]),
         service("a", "web", "10.96.0.2", [("http", 80, "TCP"), ("dns", 53, "UDP")]),
         service("a", "db", "10.96.0.1", [("", 5432, "TCP")])],
        [endpoint_slice("b", "web", ["10.244.1.2"], [("http", 80, "TCP")]),
         endpoint_slice("a", "web", ["10.244.1.3"], [("http", 80, "TCP"), ("dns", 53, "UDP")]),
         endpoint_slice("a", "db", ["10.244.1.4"], [("", 5432, "TCP")])],
    )  # fmt: skip
    order = service_order(desired)
    assert [str(n) for n in order] == [
        "a/db/TCP",
        "a/web:dns/UDP",
        "a/web:http/TCP",
        "b/web:http/TCP",
    ]
    services_rules = [
        line
        for line in render_iptables(desired).splitlines()
        if line.startswith("-A KUBE-SERVICES") and "cluster IP" in line
    ]
    assert [r.split('"')[1].split()[0] for r in services_rules] == [
        "a/db",
        "a/web:dns",
        "a/web:http",
        "b/web:http",
    ]


def test_ipv6_entries_are_skipped():
    spn = ServicePortName("ns", "v6", "p", Protocol.TCP)
    v6 = ServicePortState(
        spn,
        6,
        (Frontend(ipaddress.ip_address("fd00::10"), 80, Protocol.TCP),),
        (Backend(ipaddress.ip_address("fd00::1:2"), 80),),
    )
    desired = {(spn, 6): v6}
    assert service_order(desired) == []
    assert "v6" not in render_iptables(desired)
    assert "v6" not in render_nftables(desired)


def test_jump_rules_mirror_iptables_jump_chains():
    assert ("nat", "PREROUTING",
            ("-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES")
            ) in JUMP_RULES  # fmt: skip
    assert ("nat", "OUTPUT",
            ("-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES")
            ) in JUMP_RULES  # fmt: skip
    assert ("nat", "POSTROUTING",
            ("-m", "comment", "--comment", "kubernetes postrouting rules",
             "-j", "KUBE-POSTROUTING")) in JUMP_RULES  # fmt: skip
    assert len(JUMP_RULES) == 14


# --- nftables ------------------------------------------------------------------------------

# baseRules (pkg/proxy/nftables/proxier_test.go): the fake proxier has pod CIDR 10.0.0.0/8,
# node IP 192.168.0.2 as its only NodePort address, and service CIDR 172.30.0.0/16.
NFT_BASE_RULES = dedent("""
    add table ip kube-proxy { comment "rules for kube-proxy" ; }

    add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
    add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }

    add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
    add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }
    add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }
    add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }
    add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }

    add chain ip kube-proxy cluster-ips-check
    add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }
    add chain ip kube-proxy filter-output-pre-dnat { type filter hook output priority -110 ; }
    add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }
    add chain ip kube-proxy filter-input { type filter hook input priority 0 ; }
    add chain ip kube-proxy filter-output { type filter hook output priority 0 ; }
    add chain ip kube-proxy firewall-check
    add chain ip kube-proxy mark-for-masquerade
    add chain ip kube-proxy masquerading
    add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
    add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
    add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
    add chain ip kube-proxy nodeport-endpoints-check
    add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }
    add chain ip kube-proxy services
    add chain ip kube-proxy service-endpoints-check

    add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
    add rule ip kube-proxy cluster-ips-check ip daddr { 172.30.0.0/16 } drop comment "Drop traffic to unallocated ClusterIPs"
    add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check
    add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
    add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
    add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
    add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
    add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
    add rule ip kube-proxy filter-output-pre-dnat ct state new jump firewall-check
    add rule ip kube-proxy filter-output ct state new jump cluster-ips-check
    add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
    add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
    add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
    add rule ip kube-proxy masquerading mark set mark xor 0x4000
    add rule ip kube-proxy masquerading masquerade fully-random
    add rule ip kube-proxy nat-output jump services
    add rule ip kube-proxy nat-postrouting jump masquerading
    add rule ip kube-proxy nat-prerouting jump services
    add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
    add rule ip kube-proxy reject-chain reject
    add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
    add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports

    add element ip kube-proxy nodeport-ips { 192.168.0.2 }
    add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
""")  # noqa: E501

# TestOverallNFTablesRules, its two ClusterIP-only services: "# svc1" (one endpoint) and
# "# svc6" (no endpoints).
NFT_OVERALL_SVC1_SVC6 = dedent("""
    # svc1
    add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
    add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
    add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }

    add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
    add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade
    add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80

    add element ip kube-proxy cluster-ips { 172.30.0.41 }
    add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }

    # svc6
    add element ip kube-proxy cluster-ips { 172.30.0.46 }
    add element ip kube-proxy no-endpoint-services { 172.30.0.46 . tcp . 80 comment "ns6/svc6:p80" : goto reject-chain }
""")  # noqa: E501

_OBJECT_ORDER = {"table": 10, "chain": 9, "rule": 8, "set": 7, "map": 6, "element": 5}


def sort_nftables_transaction(tx: str) -> list[str]:
    """A port of proxier_test.go's sortNFTablesTransaction: drop blanks and comments, then
    order by object type, then object name; rules keep their order within a chain."""
    from functools import cmp_to_key

    lines = [line for line in tx.splitlines() if line and not line.startswith("#")]

    def less(li: str, lj: str) -> bool:
        wi, wj = li.split(" "), lj.split(" ")
        if len(wi) < 5 or len(wj) < 5:
            return False
        if wi[1] != wj[1]:
            return _OBJECT_ORDER.get(wi[1], 0) >= _OBJECT_ORDER.get(wj[1], 0)
        if wi[4] != wj[4]:
            return wi[4] < wj[4]
        if wi[1] == "rule":
            return False
        return li < lj

    # Go's sort.SliceStable with a "less"; Python's sort is stable too.
    return sorted(
        lines, key=cmp_to_key(lambda a, b: -1 if less(a, b) else (1 if less(b, a) else 0))
    )


def overall_nftables_state():
    return state(
        [service("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP")]),
         service("ns6", "svc6", "172.30.0.46", [("p80", 80, "TCP")])],
        [endpoint_slice("ns1", "svc1", ["10.180.0.1"], [("p80", 80, "TCP")])],
    )  # fmt: skip


def test_nftables_matches_test_overall_nftables_rules():
    rendered = render_nftables(
        overall_nftables_state(), cluster_cidr="10.0.0.0/8",
        node_ips=["192.168.0.2"], service_cidrs=["172.30.0.0/16"],
    )  # fmt: skip
    # Our file first replaces the table (add + delete) so one `nft -f` reloads it; kube-proxy
    # instead flushes what it owns inside the transaction. Everything after is compared.
    head, body = rendered.split("\n", 2)[:2], rendered.split("\n", 2)[2]
    assert head == ["add table ip kube-proxy", "delete table ip kube-proxy"]
    assert sort_nftables_transaction(body) == sort_nftables_transaction(
        NFT_BASE_RULES + NFT_OVERALL_SVC1_SVC6
    )


def test_nftables_two_endpoints_match_test_overall_nftables_rules_svc4():
    # TestOverallNFTablesRules "# svc4", its ClusterIP part (svc4 is also a NodePort service
    # with an external IP there, whose external- chain and elements we do not render).
    desired = state(
        [service("ns4", "svc4", "172.30.0.44", [("p80", 80, "TCP")])],
        [endpoint_slice("ns4", "svc4", ["10.180.0.5", "10.180.0.4"], [("p80", 80, "TCP")])],
    )
    rendered = render_nftables(desired, cluster_cidr="10.0.0.0/8").splitlines()
    expected = dedent("""
        add chain ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80
        add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 ip daddr 172.30.0.44 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
        add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 , 1 : goto endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 }
        add chain ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80
        add rule ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 ip saddr 10.180.0.5 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 meta l4proto tcp dnat to 10.180.0.5:80
        add chain ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80
        add rule ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 ip saddr 10.180.0.4 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 meta l4proto tcp dnat to 10.180.0.4:80

        add element ip kube-proxy cluster-ips { 172.30.0.44 }
        add element ip kube-proxy service-ips { 172.30.0.44 . tcp . 80 : goto service-LAUZTJTB-ns4/svc4/tcp/p80 }
    """)  # noqa: E501
    svc4 = [line for line in rendered if "ns4/svc4" in line or "172.30.0.44" in line]
    assert sort_nftables_transaction("\n".join(svc4)) == sort_nftables_transaction(expected)


@pytest.mark.parametrize(
    "name, endpoint, want",
    [
        (("ns1", "svc1", "p80", "TCP"), None, "ULMVA6XW-ns1/svc1/tcp/p80"),
        (("ns2", "svc2", "p80", "TCP"), None, "42NFTM6N-ns2/svc2/tcp/p80"),
        (("ns5", "svc5", "p80", "TCP"), None, "HVFWP5L3-ns5/svc5/tcp/p80"),
        (("ns1", "svc1", "p80", "TCP"), "10.180.0.1:80",
         "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"),
        (("ns4", "svc4", "p80", "TCP"), "10.180.0.4:80",
         "UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80"),
    ],
)  # fmt: skip
def test_nftables_chain_names_equal_kube_proxy(name, endpoint, want):
    ns, svc, port, proto = name
    spn = ServicePortName(ns, svc, port, Protocol(proto))
    got = service_chain_base(spn) if endpoint is None else endpoint_chain_base(spn, endpoint)
    assert got == want


def test_nftables_match_all_nodeports_without_node_ips():
    rendered = render_nftables(overall_nftables_state())
    assert (
        "add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8"
        " meta l4proto . th dport vmap @service-nodeports"
    ) in rendered
    assert "nodeport-ips" not in rendered
    assert "Drop traffic to unallocated ClusterIPs" not in rendered
    assert "ip saddr != 10.244.0.0/16 jump mark-for-masquerade" in rendered


# --- external destinations (NodePort, ExternalIP, LoadBalancer) with eTP Cluster ------------
# Expected lines from proxier_test.go (TestOverallIPTablesRules / TestOverallNFTablesRules):
# svc3 has nodePort 3002, svc4 the external IP 192.168.99.33; a load balancer IP without
# source ranges goes to the same KUBE-EXT chain as they do.


def external_state(service_type="NodePort", lb_ip=None, external_ip=None, endpoints=True):
    spec = {"type": service_type, "clusterIP": "172.30.0.43",
            "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3002}]}
    if external_ip:
        spec["externalIPs"] = [external_ip]
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"namespace": "ns3", "name": "svc3"}, "spec": spec}
    if lb_ip:
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}
    slices = [endpoint_slice("ns3", "svc3", ["10.180.0.3"], [("p80", 80, "TCP")])] \
        if endpoints else []
    node = NodeContext("node1", (ipaddress.ip_address("192.168.0.2"),))
    return desired_state([parse_service(svc)], [parse_endpoint_slice(s) for s in slices], node)


def test_iptables_nodeport_goes_through_kube_ext_with_masquerade():
    rendered = render_iptables(external_state(), cluster_cidr="10.0.0.0/8")
    for line in dedent("""
        :KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
        -A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3002 -j KUBE-EXT-X27LE4BHSL4DOUIK
        -A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
        -A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
        -A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
        """).splitlines():  # noqa: E501 - kube-proxy's lines verbatim
        assert line in rendered.splitlines(), line
    nat = rendered.split("*nat\n")[1].splitlines()
    # the masquerade mark comes before the jump to the service chain, in KUBE-EXT's order
    ext = [line for line in nat if line.startswith("-A KUBE-EXT-")]
    assert ext[0].endswith("-j KUBE-MARK-MASQ") and ext[1].endswith("-j KUBE-SVC-X27LE4BHSL4DOUIK")


def test_iptables_load_balancer_and_external_ips_jump_to_kube_ext():
    rendered = render_iptables(external_state("LoadBalancer", lb_ip="5.6.7.8",
                                              external_ip="192.168.99.33"))
    assert ('-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 loadbalancer IP" -m tcp -p tcp'
            " -d 5.6.7.8 --dport 80 -j KUBE-EXT-X27LE4BHSL4DOUIK") in rendered
    assert ('-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 external IP" -m tcp -p tcp'
            " -d 192.168.99.33 --dport 80 -j KUBE-EXT-X27LE4BHSL4DOUIK") in rendered
    services = [line for line in rendered.splitlines() if line.startswith("-A KUBE-SERVICES")]
    assert services[-1].endswith("-j KUBE-NODEPORTS")   # still the last rule


def test_iptables_external_destinations_without_endpoints_are_rejected_in_filter():
    rendered = render_iptables(external_state("LoadBalancer", lb_ip="5.6.7.8", endpoints=False))
    filt, nat = rendered.split("*nat\n")
    assert ('-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns3/svc3:p80 has no endpoints"'
            " -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3002 -j REJECT") in filt
    assert ('-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns3/svc3:p80 has no endpoints"'
            " -m tcp -p tcp -d 5.6.7.8 --dport 80 -j REJECT") in filt
    assert "KUBE-EXT-" not in nat


def test_nftables_nodeport_and_load_balancer_go_through_the_external_chain():
    rendered = render_nftables(external_state("LoadBalancer", lb_ip="1.2.3.4"),
                               cluster_cidr="10.0.0.0/8", node_ips=["192.168.0.2"])
    for line in dedent("""
        add chain ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80
        add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 jump mark-for-masquerade
        add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 goto service-4AT6LBPK-ns3/svc3/tcp/p80
        add element ip kube-proxy service-nodeports { tcp . 3002 : goto external-4AT6LBPK-ns3/svc3/tcp/p80 }
        add element ip kube-proxy service-ips { 1.2.3.4 . tcp . 80 : goto external-4AT6LBPK-ns3/svc3/tcp/p80 }
        add element ip kube-proxy nodeport-ips { 192.168.0.2 }
        """).splitlines():  # noqa: E501 - kube-proxy's lines verbatim
        assert line in rendered.splitlines(), line


def test_nftables_external_destinations_without_endpoints_reject():
    rendered = render_nftables(external_state("LoadBalancer", lb_ip="1.2.3.4", endpoints=False))
    assert ('add element ip kube-proxy no-endpoint-nodeports { tcp . 3002 comment "ns3/svc3:p80"'
            " : goto reject-chain }") in rendered
    assert ('add element ip kube-proxy no-endpoint-services { 1.2.3.4 . tcp . 80 comment '
            '"ns3/svc3:p80" : goto reject-chain }') in rendered
    assert "external-" not in rendered


def test_local_traffic_policy_is_refused_rather_than_rendered_wrongly():
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "ns3", "name": "svc3"},
           "spec": {"type": "NodePort", "clusterIP": "172.30.0.43",
                    "externalTrafficPolicy": "Local",
                    "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3002}]}}
    sl = endpoint_slice("ns3", "svc3", ["10.180.0.3"], [("p80", 80, "TCP")])
    node = NodeContext("node1", (ipaddress.ip_address("192.168.0.2"),))
    desired = desired_state([parse_service(svc)], [parse_endpoint_slice(sl)], node)
    for render in (render_iptables, render_nftables):
        with pytest.raises(ValueError, match="externalTrafficPolicy Local"):
            render(desired)
