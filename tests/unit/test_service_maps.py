"""The kernel door's contract is complete: ServiceMaps declares every method the agent calls
on its maps (none reached with getattr, as if optional), and both doors, the fake the unit
tests use and the real BpfServiceMaps, have each of them with the same parameters."""
from __future__ import annotations

import ast
import inspect
import typing
from pathlib import Path

import pytest

from agent.datapath.maps import BpfServiceMaps
from agent.model.types import EndpointSlice, Node, Service
from agent.service_maps import ServiceMaps
from agent.sources.events import ObjectChange
from tests.fakes import FakeServiceMaps

AGENT = Path(__file__).resolve().parents[2] / "agent"
# the agent and the parts it is assembled from: every module that is handed its maps
AGENT_MODULES = [AGENT / name for name in ("agent.py", "budget.py", "changes.py",
                                            "cleanup.py", "runner.py", "sync_step.py")]
MAPS_NAMES = {"maps", "_maps"}          # what the agent's parts call their ServiceMaps


def declared() -> set[str]:
    return {name for name, value in vars(ServiceMaps).items()
            if callable(value) and not name.startswith("_")}


def calls_on_maps(source: str) -> tuple[set[str], set[str]]:
    """(methods reached as maps.X or self.maps.X / self._maps.X, names asked of them with
    getattr or hasattr)."""
    reached, probed = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _is_maps(node.value):
            reached.add(node.attr)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
                "getattr", "hasattr") and node.args and _is_maps(node.args[0]):
            name = node.args[1] if len(node.args) > 1 else None
            probed.add(name.value if isinstance(name, ast.Constant) else "?")
    return reached, probed


def _is_maps(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in MAPS_NAMES
    return isinstance(node, ast.Attribute) and node.attr in MAPS_NAMES and \
        isinstance(node.value, ast.Name) and node.value.id == "self"


@pytest.mark.parametrize("path", AGENT_MODULES, ids=lambda p: p.name)
def test_the_agent_calls_only_what_service_maps_declares(path):
    reached, probed = calls_on_maps(path.read_text())
    assert probed == set(), f"{path.name} asks its maps for {probed} as if optional"
    assert reached <= declared(), f"{path.name} calls {reached - declared()} undeclared"


def test_the_agent_calls_its_maps():
    reached = set().union(*(calls_on_maps(p.read_text())[0] for p in AGENT_MODULES))
    assert {"apply", "read_back", "supports", "capacity", "room_for",
            "forget_counters"} <= reached


@pytest.mark.parametrize("door", [FakeServiceMaps, BpfServiceMaps], ids=lambda c: c.__name__)
def test_each_door_has_every_method_with_its_parameters(door):
    for name in sorted(declared()):
        method = getattr(door, name, None)
        assert callable(method), f"{door.__name__} has no {name}()"
        want = list(inspect.signature(getattr(ServiceMaps, name)).parameters)
        assert list(inspect.signature(method).parameters) == want, f"{door.__name__}.{name}"


def test_the_fake_forgets_counters_as_asked():
    fake = FakeServiceMaps()
    assert fake.forget_counters({3, 5}) == 0
    assert fake.counters_forgotten == {3, 5}


def test_an_object_change_carries_every_kind_a_source_yields():
    kinds = typing.get_args(typing.get_type_hints(ObjectChange)["obj"])
    assert {Service, EndpointSlice, Node, type(None)} <= set(kinds)


# The scan must see each way the agent reaches its maps.
@pytest.mark.parametrize("source,reached,probed", [
    ("self.maps.apply(ops)", {"apply"}, set()),
    ("run(None, self._maps.forget_counters, ids)", {"forget_counters"}, set()),
    ("x = maps.room_for('m', 1)", {"room_for"}, set()),
    ("f = getattr(self._maps, 'capacity', None)", set(), {"capacity"}),
    ("hasattr(maps, 'flows')", set(), {"flows"}),
    ("self.other.apply(ops)", set(), set()),
])
def test_scan(source, reached, probed):
    assert calls_on_maps(source) == (reached, probed)
