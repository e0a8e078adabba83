"""The benchmark harness cannot rot: its smallest run builds every contestant, measures,
and writes a report with every row. Speeds are the bench's business, not asserted here."""
from __future__ import annotations

import json

import pytest

from bench import north_south, run, sources

pytestmark = pytest.mark.integration
CHANGES = 2             # single changes per source trial: one adds the pod, one takes it away


def test_the_smallest_bench_produces_every_row(tmp_path):
    code = run.main(["--quick", "--sizes", "1", "--reps", "1", "--seconds", "0.2",
                     "--cp-sizes", "50", "--cp-changes", "4", "--cp-reach", "2",
                     "--src-sizes", "20x2", "--src-reps", "1", "--sources", "json,kube",
                     "--src-changes", str(CHANGES),
                     "--no-north-south", "--out", str(tmp_path)])
    assert code == 0
    report = (tmp_path / "quick-latest.md").read_text()
    for heading in ("Where we stand against the targets", "Connection cost vs cluster size",
                    "Steady-state throughput", "Programming the traffic workload",
                    "Control plane", "Single endpoint change"):
        assert heading in report
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    for contestant, target in [("direct", "backend pod"), ("bpfproxy", "first service"),
                               ("bpfproxy", "last service"), ("bpfproxy", "non-service"),
                               ("iptables", "last service"), ("nftables", "last service")]:
        assert any(r.startswith(f"| {contestant} | {target}") for r in rows), (contestant, target)
    data = json.loads((tmp_path / "quick-latest.json").read_text())
    rates = {k: v["rate"] for k, v in data["figures"].items() if "rate" in v}
    assert len(rates) == 2 + 3 * 5     # direct: 2 modes; each proxy: 4 rr + 1 non-service
    assert all(len(values) == 1 and values[0] > 0 for values in rates.values())
    assert all(sum(v["errors"]) == 0 for v in data["figures"].values())
    changes = data["control"]["endpoint_changes"]
    assert changes["changes"] == 4 and changes["reach_samples"] == 2
    # the control plane from both sources: every row for each, and new connections
    # followed every change that gave the probe service a pod (churn and single changes)
    assert "Control plane from both sources" in report and "No service at all" in report
    for _, title, _ in sources.ROWS:
        assert any(r.startswith(f"| {title} |") for r in rows), title
    src = data["sources"]
    assert set(src["empty"]) == {"json|defaults", "json|2 GiB node", "kube|defaults"}
    assert all(len(v) == 1 for row in src["empty"].values() for v in row.values()), src["empty"]
    for source in ("json", "kube"):
        figures = src["trials"][f"{source}|20|2"]
        for name, _, _ in sources.ROWS:
            assert figures.get(name), (source, name, figures)
        assert len(figures["churn_reach_s"]) == 1 and figures["churn_reach_s"][0] > 0
        assert len(figures["change_reach_s"]) == CHANGES // 2, (source, figures)
    assert (tmp_path / "quick-latest.png").stat().st_size > 10_000


def test_the_smallest_north_south_bench_measures_every_contestant_from_outside(tmp_path):
    code = run.main(["--quick", "--only-north-south", "--ns-reps", "1", "--ns-seconds", "0.2",
                     "--ns-frontends", "nodeport,lb", "--out", str(tmp_path)])
    assert code == 0
    report = (tmp_path / "quick-latest.md").read_text()
    for heading in ("North-south: from outside to node 1", "Packet rate (UDP",
                    "Connections and bulk throughput from outside", "North-south targets"):
        assert heading in report
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    built = [c.name for c in north_south.CONTESTANTS if c.setup is not None]
    assert {"direct", "iptables", "nftables", "bpfproxy-tc", "bpfproxy-xdp",
            "bpfproxy-dsr"} <= set(built)
    for name in built:
        frontends = ("NodePort", "LoadBalancer IP") if name != "direct" else ("pod address",)
        for where in ("local", "remote"):
            for frontend in frontends:
                # one row in the packet table and one in the connection table
                assert sum(r.startswith(f"| {name} | {where} | {frontend} |")
                           for r in rows) == 2, (name, where, frontend)
    assert any(r.startswith("| TC's own cost per packet") for r in rows)
    assert any(r.startswith("| iptables loses no packet") for r in rows)
    assert any(r.startswith("| XDP forwards >= 1.5x the packets/s of kernel routing (remote "
                            "backend, NodePort) |") and "not measured" not in r for r in rows)
    data = json.loads((tmp_path / "quick-latest.json").read_text())["north_south"]
    assert len(data["figures"]) == 2 + 5 * 2 * 2   # direct per backend; 5 proxies x 2 x 2
    for key, metrics in data["figures"].items():
        for metric in ("pps", "paced_sent", "crr", "bits_per_second"):
            assert len(metrics[metric]) == 1 and metrics[metric][0] > 0, \
                (key, metric, data["error_kinds"].get(key), metrics.get("bulk_retransmits"))
        # the flood reached the backend: what arrived is what was sent, less any loss
        assert 0 <= metrics["paced_lost"][0] < metrics["paced_sent"][0], key
    assert all(n == 0 for n in data["errors"].values()), data["error_kinds"]
