"""kube-proxy's nftables-mode ruleset for a desired state, as one `nft -f` file that replaces
table ip kube-proxy. Pure: a mirror of pkg/proxy/nftables/proxier.go (setupNFTables and
syncProxyRules), in the statement form of knftables' dump that its proxier_test.go expects.

What is mirrored (ClusterIP, NodePort, ExternalIP and LoadBalancer with Cluster traffic
policies, no session affinity, no loadBalancerSourceRanges):
  - the base chains (filter-prerouting-pre-dnat/-output-pre-dnat at -110, filter-input/
    -forward/-output at 0, nat-prerouting/-output at -100, nat-postrouting at 100) and the
    jump rules from them; sets cluster-ips (and nodeport-ips), the verdict maps service-ips,
    service-nodeports, no-endpoint-services, no-endpoint-nodeports, firewall-ips;
  - `services`: `ip daddr . meta l4proto . th dport vmap @service-ips`, then the NodePort
    dispatch (`ip daddr @nodeport-ips ...` when node IPs are given, as kube-proxy's default
    `--nodeport-addresses primary` does; `fib daddr type local ip daddr != 127.0.0.0/8 ...`
    when none are, as for match-all);
  - per service port `service-<HASH8>-ns/name/proto/port` with the `ip saddr != <clusterCIDR>
    jump mark-for-masquerade` rule and `numgen random mod N vmap { 0 : goto endpoint-..., }`;
    per endpoint `endpoint-<HASH8>-ns/name/proto/port__ip/port` with the hairpin masquerade
    and `meta l4proto tcp dnat to ip:port`; names from hashAndTruncate (base32 of sha256,
    8 characters); endpoints in kube-proxy's order (sorted by "ip:port" string);
  - a port with no endpoints: a no-endpoint-services element `goto reject-chain` with the
    service port name as element comment; every ClusterIP in cluster-ips, and with service
    CIDRs given, cluster-ips-check's drop of unallocated ClusterIPs;
  - mark-for-masquerade / masquerading with mark 0x4000 and `masquerade fully-random`;
  - external destinations of externalTrafficPolicy Cluster: service-ips elements of the
    external and load balancer IPs and service-nodeports elements `proto . nodePort`, all
    `goto external-<HASH8>-ns/name/proto/port`, which jumps to mark-for-masquerade and goes
    to the service chain; with no endpoints, no-endpoint-services / no-endpoint-nodeports
    elements `goto reject-chain`.

Differences kept on purpose:
  - The file starts `add table ip kube-proxy` + `delete table ip kube-proxy`, so each load
    replaces everything; kube-proxy keeps the table and flushes what it owns in a transaction
    (and does a one-off add+delete of its base chains at start-up).
  - No firewall-/local- chains, no affinity sets, no firewall elements, no Local traffic
    policies (rendering one raises ValueError); IPv6 entries are skipped (ip6 kube-proxy is
    a separate table).
  - masquerade_all writes `ip daddr <IP> jump mark-for-masquerade` (kube-proxy versions differ
    on whether `tcp dport` follows; the service chain is per port, so either matches alike).
  - No stale-chain bookkeeping: one full sync into a fresh table.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable

from agent.model.types import DesiredState, ServicePortName
from bench.kubeproxy.names import endpoint_string, port_views, protocol_lower, service_order

__all__ = [
    "TABLE",
    "endpoint_chain_base",
    "render_nftables",
    "service_chain_base",
    "service_order",
]

TABLE = "ip kube-proxy"
MASQUERADE_MARK = "0x4000"

# knftables.NameLengthMax (256) minus the longest chain name prefix (16).
CHAIN_NAME_BASE_LENGTH_MAX = 256 - 16

BASE_CHAINS = (
    ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
    ("filter-output-pre-dnat", "filter", "output", -110),
    ("filter-forward", "filter", "forward", 0),
    ("filter-input", "filter", "input", 0),
    ("filter-output", "filter", "output", 0),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
    ("nat-prerouting", "nat", "prerouting", -100),
)
REGULAR_CHAINS = (
    "cluster-ips-check", "firewall-check", "mark-for-masquerade", "masquerading",
    "nodeport-endpoints-check", "services", "service-endpoints-check",
)  # fmt: skip

_DEST = "ip daddr . meta l4proto . th dport"


def hash_and_truncate(name: str) -> str:
    """hashAndTruncate: "<base32(sha256(name))[:8]>-name", cut to 240 characters."""
    digest = hashlib.sha256(name.encode()).digest()
    name = base64.b32encode(digest).decode()[:8] + "-" + name
    if len(name) > CHAIN_NAME_BASE_LENGTH_MAX:
        name = name[: CHAIN_NAME_BASE_LENGTH_MAX - 3] + "..."
    return name


def service_chain_base(name: ServicePortName) -> str:
    """servicePortChainNameBase: HASH-namespace/name/protocol/portName."""
    return hash_and_truncate(
        f"{name.namespace}/{name.name}/{protocol_lower(name)}/{name.port_name}"
    )


def endpoint_chain_base(name: ServicePortName, endpoint: str) -> str:
    """servicePortEndpointChainNameBase: HASH-namespace/name/protocol/portName__ip/port."""
    ip, _, port = endpoint.rpartition(":")
    ip = ip.strip("[]").replace(":", ".")  # chain names cannot hold IPv6 colons
    return hash_and_truncate(
        f"{name.namespace}/{name.name}/{protocol_lower(name)}/{name.port_name}__{ip}/{port}"
    )


def render_nftables(
    desired: DesiredState,
    cluster_cidr: str | None = "10.244.0.0/16",
    masquerade_all: bool = False,
    *,
    node_ips: Iterable[str] = (),
    service_cidrs: Iterable[str] = (),
    masquerade_mark: str = MASQUERADE_MARK,
) -> str:
    """The `nft -f` input of one full kube-proxy sync, replacing table ip kube-proxy.

    node_ips: the NodePort addresses (kube-proxy's default is the node's primary IP); empty
    means match-all. service_cidrs: enables the drop of traffic to unallocated ClusterIPs."""
    node_ips, service_cidrs = list(node_ips), list(service_cidrs)
    mark = masquerade_mark
    out = [f"add table {TABLE}", f"delete table {TABLE}"]

    def add(kind: str, rest: str) -> None:
        out.append(f"add {kind} {TABLE} {rest}")

    add("table", '{ comment "rules for kube-proxy" ; }')
    add("set", 'cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }')
    if node_ips:
        add("set", 'nodeport-ips { type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }')
    triple, pair = (
        "ipv4_addr . inet_proto . inet_service : verdict",
        "inet_proto . inet_service : verdict",
    )
    for map_name, map_type, comment in (
        ("firewall-ips", triple, "destinations that are subject to LoadBalancerSourceRanges"),
        ("no-endpoint-nodeports", pair,
         "vmap to drop or reject packets to service nodeports with no endpoints"),
        ("no-endpoint-services", triple,
         "vmap to drop or reject packets to services with no endpoints"),
        ("service-ips", triple, "ClusterIP, ExternalIP and LoadBalancer IP traffic"),
        ("service-nodeports", pair, "NodePort traffic"),
    ):  # fmt: skip
        add("map", f'{map_name} {{ type {map_type} ; comment "{comment}" ; }}')
    for chain, chain_type, hook, priority in BASE_CHAINS:
        add("chain", f"{chain} {{ type {chain_type} hook {hook} priority {priority} ; }}")
    for chain in REGULAR_CHAINS:
        add("chain", chain)
    add(
        "chain",
        'reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }',
    )

    no_localhost = "ip daddr != 127.0.0.0/8"
    nodeport_dest = "ip daddr @nodeport-ips" if node_ips else no_localhost
    rules = [
        ("cluster-ips-check",
         'ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"'),
    ]  # fmt: skip
    if service_cidrs:
        rules.append(("cluster-ips-check", f"ip daddr {{ {','.join(service_cidrs)} }} drop"
                      ' comment "Drop traffic to unallocated ClusterIPs"'))  # fmt: skip
    rules += [
        ("filter-prerouting-pre-dnat", "ct state new jump firewall-check"),
        ("filter-forward", "ct state new jump service-endpoints-check"),
        ("filter-forward", "ct state new jump cluster-ips-check"),
        ("filter-input", "ct state new jump nodeport-endpoints-check"),
        ("filter-input", "ct state new jump service-endpoints-check"),
        ("filter-output", "ct state new jump service-endpoints-check"),
        ("filter-output-pre-dnat", "ct state new jump firewall-check"),
        ("filter-output", "ct state new jump cluster-ips-check"),
        ("firewall-check", f"{_DEST} vmap @firewall-ips"),
        ("mark-for-masquerade", f"mark set mark or {mark}"),
        ("masquerading", f"mark and {mark} == 0 return"),
        ("masquerading", f"mark set mark xor {mark}"),
        ("masquerading", "masquerade fully-random"),
        ("nat-output", "jump services"),
        ("nat-postrouting", "jump masquerading"),
        ("nat-prerouting", "jump services"),
        ("nodeport-endpoints-check",
         f"{nodeport_dest} meta l4proto . th dport vmap @no-endpoint-nodeports"),
        ("reject-chain", "reject"),
        ("services", f"{_DEST} vmap @service-ips"),
        ("services",
         ("" if node_ips else "fib daddr type local ")
         + f"{nodeport_dest} meta l4proto . th dport vmap @service-nodeports"),
        ("service-endpoints-check", f"{_DEST} vmap @no-endpoint-services"),
    ]  # fmt: skip
    for chain, rule in rules:
        add("rule", f"{chain} {rule}")
    for ip in node_ips:
        add("element", f"nodeport-ips {{ {ip} }}")

    for view in port_views(desired):
        name, proto, backends = view.name, view.proto, view.backends
        svc_chain = "service-" + service_chain_base(name)
        ep_chains = ["endpoint-" + endpoint_chain_base(name, endpoint_string(b))
                     for b in backends]  # fmt: skip
        for chain in ep_chains:
            add("chain", chain)
        if backends:
            add("chain", svc_chain)
        for frontend in view.cluster_ips:
            add("element", f"cluster-ips {{ {frontend.address} }}")
            key = f"{frontend.address} . {proto} . {frontend.port}"
            if backends:
                add("element", f"service-ips {{ {key} : goto {svc_chain} }}")
            else:
                add(
                    "element",
                    f'no-endpoint-services {{ {key} comment "{view.port_name}"'
                    " : goto reject-chain }",
                )
        ext_chain = "external-" + service_chain_base(name)
        if view.has_external and backends:
            add("chain", ext_chain)
        for frontend in view.externals:
            key = f"{frontend.address} . {proto} . {frontend.port}"
            if backends:
                add("element", f"service-ips {{ {key} : goto {ext_chain} }}")
            else:
                add("element", f'no-endpoint-services {{ {key} comment '
                               f'"{view.port_name}" : goto reject-chain }}')
        for node_port in view.node_ports:
            if backends:
                add("element", f"service-nodeports {{ {proto} . {node_port} : goto {ext_chain} }}")
            else:
                add("element", f'no-endpoint-nodeports {{ {proto} . {node_port} comment '
                               f'"{view.port_name}" : goto reject-chain }}')
        if not backends:
            continue
        if view.has_external:
            # externalTrafficPolicy Cluster: every packet to an external destination is
            # masqueraded (the backend may be on another node).
            add("rule", f"{ext_chain} jump mark-for-masquerade")
            add("rule", f"{ext_chain} goto {svc_chain}")
        for frontend in view.cluster_ips:
            if masquerade_all:
                add("rule", f"{svc_chain} ip daddr {frontend.address} jump mark-for-masquerade")
            elif cluster_cidr:
                # Off-cluster sources reaching a service VIP through this node get SNAT.
                add(
                    "rule",
                    f"{svc_chain} ip daddr {frontend.address} ip saddr != {cluster_cidr}"
                    " jump mark-for-masquerade",
                )
        vmap = " , ".join(f"{i} : goto {chain}" for i, chain in enumerate(ep_chains))
        add("rule", f"{svc_chain} numgen random mod {len(ep_chains)} vmap {{ {vmap} }}")
        for backend, chain in zip(backends, ep_chains, strict=True):
            # Hairpin: a backend reaching itself through the VIP must be SNATed.
            add("rule", f"{chain} ip saddr {backend.address} jump mark-for-masquerade")
            add("rule", f"{chain} meta l4proto {proto} dnat to {endpoint_string(backend)}")
    return "\n".join(out) + "\n"
