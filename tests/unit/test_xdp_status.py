"""--acceleration in the programs list: the XDP program per interface, found by its pinned
link; best-effort's fallback to TC is shown as such and is no health failure, native's
missing program is."""
from __future__ import annotations

from agent.datapath.inventory import XDP_FALLBACK_HOOK, Inventory, xdp_programs


def test_no_xdp_entries_when_acceleration_is_disabled(tmp_path):
    assert xdp_programs(["lo"], tmp_path, "disabled") == []


def test_best_effort_without_a_link_shows_the_fallback_and_stays_healthy(tmp_path):
    [fallback] = xdp_programs(["lo"], tmp_path, "best-effort")
    assert (fallback.name, fallback.hook, fallback.target) == ("bpfp_xdp", XDP_FALLBACK_HOOK,
                                                               "lo")
    assert not fallback.attached and not fallback.required
    inventory = Inventory(tmp_path, tmp_path, ["lo"], expect_tc=True,
                          acceleration="best-effort")
    inventory.programs = lambda: [fallback]
    assert inventory.programs_attached() == (True, "")


def test_native_without_a_link_is_missing(tmp_path):
    [missing] = xdp_programs(["lo"], tmp_path, "native")
    assert (missing.hook, missing.attached, missing.required) == ("xdp", False, True)
    inventory = Inventory(tmp_path, tmp_path, ["lo"], expect_tc=True, acceleration="native")
    inventory.programs = lambda: [missing]
    assert inventory.programs_attached() == (False, "bpfp_xdp at xdp on lo")
