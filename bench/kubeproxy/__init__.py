"""The rules kube-proxy would write for our desired state (iptables and nftables modes), and
loading them into a bench network namespace, so the benchmark can race bpfproxy against them."""


def render_rules(kind: str, desired, node_ip: str) -> str:
    """kube-proxy's layout with its defaults, for the bench contestant `kind`; nftables'
    NodePort rule matches the node's primary address (--nodeport-addresses primary)."""
    from bench.kubeproxy.iptables import render_iptables
    from bench.kubeproxy.nftables import render_nftables
    if kind == "iptables":
        return render_iptables(desired)
    return render_nftables(desired, node_ips=[node_ip])
