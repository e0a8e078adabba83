"""Benchmarks: bpfproxy against kube-proxy's iptables and nftables layouts and no proxy.

`make bench` / `make bench-quick` run bench.run; the method is in bench/README.md.

    workload.py (N Services x E endpoints) -> manifests for the agent | rules (kubeproxy/)
      -> topology.py / north_south.py (one lab per contestant) -> loadgen/ traffic
      -> stats.py (medians, spreads, ratios) -> report.py -> bench/results/

  run.py            the entry point: east-west, then north-south, interleaved rep by rep
  workload.py       the cluster a run serves, as manifests and as desired state
  topology.py       east-west: one lab node per contestant (client pod, loadgen servers)
  north_south.py    from outside through node 1 of a two-node lab, per contestant
  control_plane.py  full syncs and single changes against iptables-restore and nft -f
  sources.py        the control plane from both sources: start, memory, churn, one change
  stats.py          medians, spreads and ratios over interleaved repetitions
  report.py         results as one Markdown report and a PNG plot
  profile_start.py  profiling harness: a 10k x 10 start under py-spy or tracemalloc
  profile_summary.py  aggregates py-spy stacks by function and area
  kubeproxy/        the rules kube-proxy would write (iptables.py, nftables.py, names.py)
                    and loading them into a bench namespace (load.py)
  loadgen/          the C load generator and server (loadgen.c), built with gcc"""
