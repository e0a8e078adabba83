"""The doors between the agent's rooms: the model and the planner are pure, so they
import nothing from the datapath or the sources, no kernel or cluster client, and no I/O."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parents[2] / "agent"
# the read model (agent/status.py) is pure too: the API imports it, not the orchestrator
PURE_MODULES = sorted(AGENT.glob("model/*.py")) + sorted(AGENT.glob("planner/*.py")) + \
    [AGENT / "status.py"]

FORBIDDEN = (
    "agent.datapath", "agent.sources", "agent.api", "agent.agent", "agent.cli",
    "bcc", "pyroute2", "grpc", "kubernetes", "watchfiles", "yaml",
    # I/O: the pure core gets its inputs as arguments and returns its outputs.
    "socket", "subprocess", "os", "io", "pathlib", "shutil", "tempfile", "asyncio",
    "threading", "multiprocessing", "concurrent", "select", "selectors", "signal", "ctypes",
    "urllib", "http", "requests", "importlib", "builtins",
)


def imported_modules(source: str, module: str) -> list[str]:
    """Absolute names of every module the source imports; relative imports resolved
    against the dotted module name (a package's __init__ counts as the package)."""
    names = []
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            names.append("builtins.__import__")
    return names


def forbidden_imports(source: str, module: str) -> list[str]:
    return sorted({name for name in imported_modules(source, module)
                   for door in FORBIDDEN if name == door or name.startswith(door + ".")})


def module_name(path: Path) -> str:
    # "agent.model.__init__" for a package: its relative imports start from agent.model.
    return ".".join(path.relative_to(AGENT.parent).with_suffix("").parts)


@pytest.mark.parametrize("path", PURE_MODULES, ids=lambda p: str(p.relative_to(AGENT.parent)))
def test_pure_modules_keep_their_doors_shut(path):
    assert forbidden_imports(path.read_text(), module_name(path)) == []


def test_there_is_something_to_check():
    assert AGENT / "model" / "types.py" in PURE_MODULES
    assert AGENT / "planner" / "kernel.py" in PURE_MODULES
    assert AGENT / "planner" / "__init__.py" in PURE_MODULES
    assert AGENT / "status.py" in PURE_MODULES


# The checker itself must see every way in; a blind checker would pass everything.
SNEAKY = [
    ("import bcc", "bcc"),
    ("import pyroute2.iproute", "pyroute2.iproute"),
    ("from grpc import aio", "grpc"),
    ("from kubernetes.client import CoreV1Api", "kubernetes.client"),
    ("from agent.datapath.maps import ServiceMaps", "agent.datapath.maps"),
    ("from agent import sources", "agent.sources"),
    ("from ..datapath import maps", "agent.datapath"),
    ("from ..sources.events import ObjectChange", "agent.sources.events"),
    ("def f():\n    import subprocess\n", "subprocess"),
    ("import os.path", "os.path"),
    ("try:\n    import socket\nexcept ImportError:\n    pass\n", "socket"),
    ("m = __import__('bcc')", "builtins.__import__"),
    ("import importlib", "importlib"),
]


@pytest.mark.parametrize("source,caught", SNEAKY, ids=[s for s, _ in SNEAKY])
def test_checker_catches(source, caught):
    assert caught in forbidden_imports(source, "agent.model.service")


# The API reads the agent's status and what the kernel holds through the read model
# (agent/status.py), never through the orchestrator or the parts it is assembled from.
ORCHESTRATOR = ("agent.agent", "agent.changes", "agent.budget", "agent.runner",
                "agent.sync_step", "agent.cleanup", "agent.main")
API_MODULES = sorted(AGENT.glob("api/*.py"))


def orchestrator_imports(source: str, module: str) -> list[str]:
    return sorted({name for name in imported_modules(source, module)
                   for door in ORCHESTRATOR if name == door or name.startswith(door + ".")})


@pytest.mark.parametrize("path", API_MODULES, ids=lambda p: str(p.relative_to(AGENT.parent)))
def test_api_reads_the_read_model_not_the_orchestrator(path):
    assert orchestrator_imports(path.read_text(), module_name(path)) == []


@pytest.mark.parametrize("source,caught", [
    ("from agent.agent import AgentStatus", "agent.agent"),
    ("from agent import agent", "agent.agent"),
    ("from ..sync_step import SyncStep", "agent.sync_step"),
    ("import agent.changes", "agent.changes"),
])
def test_orchestrator_checker_catches(source, caught):
    assert caught in orchestrator_imports(source, "agent.api.server")
    assert orchestrator_imports("from agent.status import AgentStatus", "agent.api.server") == []


@pytest.mark.parametrize("source", [
    "from agent.model.types import Service",
    "from .types import Service",
    "import ipaddress, enum, dataclasses",
    "from collections.abc import Iterable",
    "import osmium_is_not_os",
])
def test_checker_allows(source):
    assert forbidden_imports(source, "agent.model.service") == []


# --- no import circles ---------------------------------------------------------------------
# A circle hidden by an import inside a function (or under TYPE_CHECKING) still ties the
# modules together: neither can be understood, tested or moved without the other. So every
# import counts, wherever it stands in the module.

ROOT = AGENT.parent
GRAPHED = ("agent", "lab")


def graph_name(path: Path) -> str:
    """The dotted name a module is imported by (a package's __init__: the package)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_edges(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The known modules this source imports, at any depth of its syntax tree: `from p
    import m` is an edge to p.m when that is a module, else to p."""
    package = module if is_package else module.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                prefixes = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
                edges.update(next(([p] for p in prefixes if p in known), []))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in known:
                    edges.add(target)
                elif base in known:
                    edges.add(base)
    edges.discard(module)
    return edges


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(found)


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """module -> the modules it imports; sources: module -> (text, is a package)."""
    known = set(sources)
    return {module: import_edges(text, module, is_package, known)
            for module, (text, is_package) in sources.items()}


def project_sources() -> dict[str, tuple[str, bool]]:
    return {graph_name(path): (path.read_text(), path.name == "__init__.py")
            for top in GRAPHED for path in sorted((ROOT / top).rglob("*.py"))}


def test_no_import_circles_in_agent_and_lab():
    sources = project_sources()
    assert {"agent.datapath.loader", "lab.node", "lab.pod"} <= set(sources)
    assert circles(import_graph(sources)) == []


# The circle finder must see circles however they are hidden.
CIRCLES = [
    ("function-level import", {
        "agent.a": ("from agent import b\n", False),
        "agent.b": ("def f():\n    from agent.a import x\n", False),
    }, [["agent.a", "agent.b"]]),
    ("under TYPE_CHECKING, through a third module", {
        "lab.node": ("from lab.pod import Pod\n", False),
        "lab.pod": ("from lab import helper\n", False),
        "lab.helper": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                       "    from lab.node import Lab\n", False),
    }, [["lab.helper", "lab.node", "lab.pod"]]),
    ("relative imports in a package", {
        "agent.datapath": ("", True),
        "agent.datapath.loader": ("from . import migrate\n", False),
        "agent.datapath.migrate": ("import agent.datapath.loader\n", False),
    }, [["agent.datapath.loader", "agent.datapath.migrate"]]),
    ("no circle: a package re-exporting its modules, which import their siblings", {
        "lab": ("from lab.node import Lab\nfrom lab.pod import Pod\n", True),
        "lab.node": ("from lab import netns\nfrom lab.pod import Pod\n", False),
        "lab.pod": ("from lab.processes import Processes\n", False),
        "lab.netns": ("import subprocess\n", False),
        "lab.processes": ("from lab import netns\n", False),
    }, []),
]


@pytest.mark.parametrize("sources,want", [(s, w) for _, s, w in CIRCLES],
                         ids=[name for name, *_ in CIRCLES])
def test_circle_finder(sources, want):
    assert circles(import_graph(sources)) == want
