"""The rules kube-proxy would write for our desired state (iptables and nftables modes), and
loading them into a bench network namespace, so the benchmark can race bpfproxy against them."""
