"""--acceleration in the programs list: the XDP program per interface, found by its pinned
link; an interface best-effort left to TC (the loader says which, and why) is shown as that,
with what handles its traffic, in status, the table and a metric, and is no health failure;
native's missing program is."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import generate_latest

from agent import cli_output
from agent.agent import AgentStatus
from agent.api.client import to_plain
from agent.api.metrics import Metrics
from agent.api.observed import Observed
from agent.api.server import AgentService
from agent.datapath.inventory import Inventory, xdp_programs
from agent.datapath.loader import RESULT, LoaderChild

WHY = "no native XDP on lo: [Errno 95] Operation not supported"


def test_no_xdp_entries_when_acceleration_is_disabled(tmp_path):
    assert xdp_programs(["lo"], tmp_path, "disabled") == []


def inventory(tmp_path, acceleration, fallback=None) -> Inventory:
    inv = Inventory(tmp_path, tmp_path, ["lo"], expect_tc=True, acceleration=acceleration,
                    xdp_fallback=fallback)
    found = xdp_programs(["lo"], tmp_path, acceleration, fallback)   # no link: none attached
    inv.programs = lambda: found
    return inv


def shown(inv: Inventory) -> tuple[list[dict], str, str]:
    """What status (as the CLI gets it), its table and the metrics say of the programs."""
    service = AgentService(Observed(AgentStatus(), inv), ThreadPoolExecutor(1))
    programs = [to_plain(p) for p in service._kernel_inventory()[0]]
    table = cli_output._program_state(programs[0])
    metrics = generate_latest(Metrics(Observed(AgentStatus(), inv)).registry).decode()
    return programs, table, metrics


def test_best_effort_fallback_says_tc_handles_the_traffic_and_why(tmp_path):
    inv = inventory(tmp_path, "best-effort", {"lo": WHY})
    assert inv.programs_attached() == (True, "")
    [program], table, metrics = shown(inv)
    assert (program["name"], program["hook"], program["attached"], program["state"]) == \
        ("bpfp_xdp", "xdp", False, "fallback")
    assert table == ("not attached: the TC programs handle lo (--acceleration best-effort "
                     f"fell back: {WHY})")
    assert 'bpfproxy_acceleration{interface="lo",mode="best-effort",state="tc_fallback"} 1.0' \
        in metrics


def test_an_xdp_program_lost_after_start_is_missing_not_a_fallback(tmp_path):
    """best-effort attached it (the loader reported no fallback) and it is gone: MISSING,
    though not a health failure (the TC programs still serve)."""
    inv = inventory(tmp_path, "best-effort", {})
    assert inv.programs_attached() == (True, "")
    [program], table, metrics = shown(inv)
    assert (program["state"], table) == ("missing", "MISSING")
    assert 'state="missing"' in metrics


def test_native_without_a_link_is_missing(tmp_path):
    inv = inventory(tmp_path, "native")
    assert inv.programs_attached() == (False, "bpfp_xdp at xdp on lo")
    [program], table, metrics = shown(inv)
    assert (program["state"], table) == ("missing", "MISSING")
    assert 'bpfproxy_acceleration{interface="lo",mode="native",state="missing"} 1.0' in metrics


class FinishedChild:
    """A loader child that has exited with these outputs."""

    def __init__(self, stdout: str, stderr: str, returncode: int = 0) -> None:
        self.outputs, self.returncode = (stdout, stderr), returncode

    def communicate(self, timeout=None):
        return self.outputs

    def poll(self):
        return self.returncode


def test_the_agent_learns_the_fallback_from_its_loader_and_logs_it_once(caplog):
    child = LoaderChild.__new__(LoaderChild)
    child._deadline, child._timeout = float("inf"), 300.0
    child._process = FinishedChild(
        f'{RESULT}{{"xdp_fallback": {{"lo": "{WHY}"}}}}\n',
        "event=program_attached hook=tcx_ingress interface=lo\n"
        f"event=xdp_fallback interface=lo error='{WHY}' path=tc\n")
    with caplog.at_level(logging.INFO, logger="agent.datapath.loader"):
        assert child.wait() == {"lo": WHY}
    said = [r.getMessage() for r in caplog.records if "xdp_fallback" in r.getMessage()]
    assert said == [f"event=xdp_fallback interface=lo xdp=not_attached traffic=tc "
                    f"acceleration=best-effort reason='{WHY}'"]
    assert [r.levelname for r in caplog.records if "xdp_fallback" in r.getMessage()] == \
        ["WARNING"]
