"""Benchmarks: bpfproxy against kube-proxy's iptables and nftables layouts and no proxy.

`make bench` / `make bench-quick` run bench.run; the method is in bench/README.md."""
