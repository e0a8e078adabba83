"""The benchmark harness cannot rot: its smallest run builds every contestant, measures,
and writes a report with every row. Speeds are the bench's business, not asserted here."""
from __future__ import annotations

import json

import pytest

from bench import run

pytestmark = pytest.mark.integration


def test_the_smallest_bench_produces_every_row(tmp_path):
    code = run.main(["--quick", "--sizes", "1", "--reps", "1", "--seconds", "0.2",
                     "--cp-sizes", "50", "--cp-changes", "4", "--cp-reach", "2",
                     "--out", str(tmp_path)])
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
    assert (tmp_path / "quick-latest.png").stat().st_size > 10_000
