"""The doors between the agent's rooms: the model and the planner are pure, so they
import nothing from the datapath or the sources, no kernel or cluster client, and no I/O."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parents[2] / "agent"
PURE_MODULES = sorted(AGENT.glob("model/*.py")) + sorted(AGENT.glob("planner/*.py"))

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


@pytest.mark.parametrize("source", [
    "from agent.model.types import Service",
    "from .types import Service",
    "import ipaddress, enum, dataclasses",
    "from collections.abc import Iterable",
    "import osmium_is_not_os",
])
def test_checker_allows(source):
    assert forbidden_imports(source, "agent.model.service") == []
