"""bpfproxy: an eBPF replacement for kube-proxy.

The agent package: sources -> model -> planner -> datapath, plus the status API."""
