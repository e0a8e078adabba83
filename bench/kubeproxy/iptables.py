"""kube-proxy's iptables-mode rules for a desired state, as one `iptables-restore` input.
Pure: a mirror of kubernetes/kubernetes pkg/proxy/iptables/proxier.go syncProxyRules (IPv4).

What is mirrored (ClusterIP, NodePort, ExternalIP and LoadBalancer with Cluster traffic
policies, no session affinity, no loadBalancerSourceRanges):
  - filter and nat chain lines and rules in the order syncProxyRules writes them (chain lines
    first, then rules), with KUBE-NODEPORTS jumped to last from nat KUBE-SERVICES by
    `-m addrtype --dst-type LOCAL` (nodePortAddresses unset, localhostNodePorts=true);
  - KUBE-SVC-/KUBE-SEP- names from portProtoHash (sha256, base32, first 16 characters);
  - `-m statistic --mode random --probability 1/(n-i)` formatted %0.10f; the last endpoint
    has no statistic match; endpoints in kube-proxy's order (sorted by "ip:port" string);
  - comments as kube-proxy writes them, including largeClusterMode: above 1000 endpoints in
    total, SVC->SEP and SEP rules carry no comment (KUBE-SERVICES rules always do);
  - the `! -s <clusterCIDR> -j KUBE-MARK-MASQ` rule (LocalDetector by cluster CIDR), or the
    unconditional one with masquerade_all; hairpin `-s <endpoint IP>` KUBE-MARK-MASQ;
  - REJECT in filter KUBE-SERVICES for a service port with no endpoints;
  - KUBE-POSTROUTING / KUBE-MARK-MASQ with mark 0x4000 (masqueradeBit 14) and MASQUERADE
    --random-fully (kube-proxy adds it when iptables supports it; 1.8.9 here does);
  - KUBE-FORWARD, and KUBE-FIREWALL's localnet rule (localhostNodePorts=true);
  - external destinations of externalTrafficPolicy Cluster: `KUBE-SERVICES -d <external or
    load balancer IP> -j KUBE-EXT-<hash>`, `KUBE-NODEPORTS --dport <nodePort> -j KUBE-EXT-`,
    and KUBE-EXT-<hash> marking everything for masquerade ("masquerade traffic for ...
    external destinations") before jumping to KUBE-SVC-; with no endpoints, REJECTs in
    filter KUBE-EXTERNAL-SERVICES (NodePorts matched with `--dst-type LOCAL`).
  The jump rules from the built-in chains are not in the restore input (kube-proxy ensures
  them with `iptables -C`/`-I` before each full sync): JUMP_RULES lists them for the loader.

Differences kept on purpose:
  - Service order in KUBE-SERVICES is fixed (service_order), not Go's random map order.
  - No `-m nfacct` on the INVALID drop rule by default: kube-proxy adds it only when the
    nfacct counter can be created, and this kernel has no xt_nfacct (nfacct=True restores it).
  - No KUBE-FW (source ranges) or KUBE-SVL/KUBE-SVC-local chains, no session affinity
    (`-m recent`), no Local traffic policies (rendering one raises ValueError); IPv6
    entries are skipped (kube-proxy runs one proxier per family).
  - A full sync only: no `-X` of stale chains (nothing is stale in a fresh namespace).
  - The mark is written "0x4000"; kube-proxy formats 1<<14 as "%#08x" ("0x004000"), which
    iptables stores as the same value.
"""

from __future__ import annotations

import base64
import hashlib

from agent.model.types import DesiredState, FrontendKind, ServicePortName
from bench.kubeproxy.names import (
    endpoint_string,
    port_name_string,
    port_views,
    protocol_lower,
    service_order,
)

__all__ = [
    "JUMP_RULES",
    "KUBE_CHAINS",
    "endpoint_chain_name",
    "external_chain_name",
    "port_proto_hash",
    "probability",
    "render_iptables",
    "service_chain_name",
    "service_order",
]

MASQUERADE_MARK = "0x4000"  # 1 << masqueradeBit (default 14)
# the KUBE-SERVICES comment of an external destination: "<port name> <label>"
EXTERNAL_LABELS = {FrontendKind.EXTERNAL_IP: "external IP",
                   FrontendKind.LOAD_BALANCER: "loadbalancer IP"}

# kube-proxy's largeClusterEndpointsThreshold: above it, per-endpoint comments are dropped.
LARGE_CLUSTER_ENDPOINTS_THRESHOLD = 1000

FILTER_CHAINS = (
    "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS",
    "KUBE-PROXY-FIREWALL",
)  # fmt: skip
NAT_CHAINS = ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ")
KUBE_CHAINS = {"filter": (*FILTER_CHAINS, "KUBE-FIREWALL"), "nat": NAT_CHAINS}

_NEW = ("-m", "conntrack", "--ctstate", "NEW")

# iptablesJumpChains then iptablesKubeletJumpChains, as (table, built-in chain, rule args).
# kube-proxy puts each at the top of its chain (EnsureRule(Prepend)) when it is missing.
JUMP_RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = tuple(
    (table, src, (*extra, *(("-m", "comment", "--comment", comment) if comment else ()),
                  "-j", dst))
    for table, dst, src, comment, extra in (
        ("filter", "KUBE-EXTERNAL-SERVICES", "INPUT",
         "kubernetes externally-visible service portals", _NEW),
        ("filter", "KUBE-EXTERNAL-SERVICES", "FORWARD",
         "kubernetes externally-visible service portals", _NEW),
        ("filter", "KUBE-NODEPORTS", "INPUT", "kubernetes health check service ports", ()),
        ("filter", "KUBE-SERVICES", "FORWARD", "kubernetes service portals", _NEW),
        ("filter", "KUBE-SERVICES", "OUTPUT", "kubernetes service portals", _NEW),
        ("filter", "KUBE-FORWARD", "FORWARD", "kubernetes forwarding rules", ()),
        ("filter", "KUBE-PROXY-FIREWALL", "INPUT", "kubernetes load balancer firewall", _NEW),
        ("filter", "KUBE-PROXY-FIREWALL", "OUTPUT", "kubernetes load balancer firewall", _NEW),
        ("filter", "KUBE-PROXY-FIREWALL", "FORWARD", "kubernetes load balancer firewall", _NEW),
        ("nat", "KUBE-SERVICES", "OUTPUT", "kubernetes service portals", ()),
        ("nat", "KUBE-SERVICES", "PREROUTING", "kubernetes service portals", ()),
        ("nat", "KUBE-POSTROUTING", "POSTROUTING", "kubernetes postrouting rules", ()),
        ("filter", "KUBE-FIREWALL", "INPUT", "", ()),
        ("filter", "KUBE-FIREWALL", "OUTPUT", "", ()),
    )
)  # fmt: skip


def port_proto_hash(service_port_name: str, protocol: str) -> str:
    """portProtoHash: base32(sha256(name + protocol))[:16]."""
    digest = hashlib.sha256((service_port_name + protocol).encode()).digest()
    return base64.b32encode(digest).decode()[:16]


def service_chain_name(name: ServicePortName) -> str:
    """servicePortPolicyClusterChain: KUBE-SVC-<hash of "ns/name:port" + "tcp">."""
    return "KUBE-SVC-" + port_proto_hash(port_name_string(name), protocol_lower(name))


def external_chain_name(name: ServicePortName) -> str:
    """servicePortExternalChainName: KUBE-EXT-<the same hash as KUBE-SVC->."""
    return "KUBE-EXT-" + port_proto_hash(port_name_string(name), protocol_lower(name))


def endpoint_chain_name(name: ServicePortName, endpoint: str) -> str:
    """servicePortEndpointChainName: KUBE-SEP-<hash of name + protocol + "ip:port">."""
    digest = hashlib.sha256(
        (port_name_string(name) + protocol_lower(name) + endpoint).encode()
    ).digest()
    return "KUBE-SEP-" + base64.b32encode(digest).decode()[:16]


def probability(n: int) -> str:
    """computeProbability: 1/n as %0.10f."""
    return f"{1.0 / n:0.10f}"


def render_iptables(
    desired: DesiredState,
    cluster_cidr: str | None = "10.244.0.0/16",
    masquerade_all: bool = False,
    *,
    random_fully: bool = True,
    nfacct: bool = False,
    localhost_nodeports: bool = True,
    masquerade_mark: str = MASQUERADE_MARK,
) -> str:
    """The `iptables-restore --noflush` input of one full kube-proxy sync (filter, then nat).

    cluster_cidr=None means no local-traffic detector (no `! -s CIDR` masquerade rule)."""
    views = port_views(desired)
    total_endpoints = sum(len(v.backends) for v in views)
    large_cluster = total_endpoints > LARGE_CLUSTER_ENDPOINTS_THRESHOLD
    mark = masquerade_mark

    filter_chains = [f":{chain} - [0:0]" for chain in FILTER_CHAINS]
    filter_rules: list[str] = []
    nat_chains = [f":{chain} - [0:0]" for chain in NAT_CHAINS]
    nat_rules = [
        f"-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN",
        # Clears the mark so a packet that re-traverses the stack is not masqueraded again.
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {mark}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT"'
        " -j MASQUERADE" + (" --random-fully" if random_fully else ""),
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {mark}",
    ]
    if localhost_nodeports:
        # route_localnet hole mitigation (issue 90259), a copy of kubelet's rule.
        filter_chains.append(":KUBE-FIREWALL - [0:0]")
        filter_rules.append(
            '-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections"'
            " -d 127.0.0.0/8 ! -s 127.0.0.0/8"
            " -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
        )

    for view in views:
        name, proto, port_name, backends = view.name, view.proto, view.port_name, view.backends
        svc_chain = service_chain_name(name)
        for frontend in view.cluster_ips:
            match = (
                f'-m comment --comment "{port_name} cluster IP" -m {proto} -p {proto}'
                f" -d {frontend.address} --dport {frontend.port}"
            )
            if not backends:
                filter_rules.append(
                    f'-A KUBE-SERVICES -m comment --comment "{port_name} has no endpoints"'
                    f" -m {proto} -p {proto} -d {frontend.address} --dport {frontend.port}"
                    " -j REJECT"
                )
                continue
            nat_rules.append(f"-A KUBE-SERVICES {match} -j {svc_chain}")
        ext_chain = external_chain_name(name)
        for frontend in view.externals:
            dest = f"-m {proto} -p {proto} -d {frontend.address} --dport {frontend.port}"
            if backends:
                nat_rules.append(f'-A KUBE-SERVICES -m comment --comment "{port_name} '
                                 f'{EXTERNAL_LABELS[frontend.kind]}" {dest} -j {ext_chain}')
            else:
                filter_rules.append(f'-A KUBE-EXTERNAL-SERVICES -m comment --comment '
                                    f'"{port_name} has no endpoints" {dest} -j REJECT')
        for node_port in view.node_ports:
            if backends:
                nat_rules.append(f"-A KUBE-NODEPORTS -m comment --comment {port_name}"
                                 f" -m {proto} -p {proto} --dport {node_port} -j {ext_chain}")
            else:
                filter_rules.append(
                    f'-A KUBE-EXTERNAL-SERVICES -m comment --comment "{port_name} has no '
                    f'endpoints" -m addrtype --dst-type LOCAL -m {proto} -p {proto}'
                    f" --dport {node_port} -j REJECT")
        if not backends:
            continue

        nat_chains.append(f":{svc_chain} - [0:0]")
        for frontend in view.cluster_ips:
            match = (
                f'-m comment --comment "{port_name} cluster IP" -m {proto} -p {proto}'
                f" -d {frontend.address} --dport {frontend.port}"
            )
            if masquerade_all:
                nat_rules.append(f"-A {svc_chain} {match} -j KUBE-MARK-MASQ")
            elif cluster_cidr:
                # Off-cluster sources reaching a service VIP through this node get SNAT.
                nat_rules.append(f"-A {svc_chain} {match} ! -s {cluster_cidr} -j KUBE-MARK-MASQ")
        if view.has_external:
            # externalTrafficPolicy Cluster: the backend may be on another node, so every
            # packet to an external destination is masqueraded (the client address is lost).
            nat_chains.append(f":{ext_chain} - [0:0]")
            nat_rules.append(f'-A {ext_chain} -m comment --comment "masquerade traffic for '
                             f'{port_name} external destinations" -j KUBE-MARK-MASQ')
            nat_rules.append(f"-A {ext_chain} -j {svc_chain}")

        sep_chains = [endpoint_chain_name(name, endpoint_string(b)) for b in backends]
        count = len(backends)
        for i, (backend, sep) in enumerate(zip(backends, sep_chains, strict=True)):
            rule = f"-A {svc_chain}"
            if not large_cluster:
                rule += f' -m comment --comment "{port_name} -> {endpoint_string(backend)}"'
            if i < count - 1:
                rule += f" -m statistic --mode random --probability {probability(count - i)}"
            nat_rules.append(f"{rule} -j {sep}")

        for backend, sep in zip(backends, sep_chains, strict=True):
            nat_chains.append(f":{sep} - [0:0]")
            head = f"-A {sep}" + ("" if large_cluster else f" -m comment --comment {port_name}")
            # Hairpin: a backend reaching itself through the VIP must be SNATed.
            nat_rules.append(f"{head} -s {backend.address} -j KUBE-MARK-MASQ")
            nat_rules.append(
                f"{head} -m {proto} -p {proto} -j DNAT --to-destination {endpoint_string(backend)}"
            )

    nat_rules.append(
        "-A KUBE-SERVICES -m comment --comment"
        ' "kubernetes service nodeports; NOTE: this must be the last rule in this chain"'
        " -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    )
    filter_rules.append(
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID"
        + (" -m nfacct --nfacct-name ct_state_invalid_dropped_pkts" if nfacct else "")
        + " -j DROP"
    )
    filter_rules.append(
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules"'
        f" -m mark --mark {mark}/{mark} -j ACCEPT"
    )
    filter_rules.append(
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule"'
        " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    )
    lines = [
        "*filter", *filter_chains, *filter_rules, "COMMIT",
        "*nat", *nat_chains, *nat_rules, "COMMIT",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"
