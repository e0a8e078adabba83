"""Security (issue 9, point 8) where no kernel is needed: the API has no method that changes
state and its code cannot reach the map writer; sockets, directories and pins get tight
modes; nothing in the agent goes through a shell; the capability sets are consistent."""
from __future__ import annotations

import ast
import asyncio
import stat
from pathlib import Path

import pytest

from agent import capabilities
from agent.api import server
from agent.api.generated import agent_pb2
from agent.datapath import loader
from tests.unit.test_api_support import cluster, synced_status

AGENT = Path(__file__).resolve().parents[2] / "agent"
READ_ONLY_VERBS = ("Get", "List", "Watch")
# modules that change the kernel's state: the API's code must not import them
KERNEL_WRITERS = {"agent.datapath.maps", "agent.datapath.loader", "agent.datapath.tc",
                  "agent.datapath.stale_sockets", "agent.datapath.bpfsys", "bcc", "pyroute2"}
# calls that write maps, pin, attach or detach, on whatever object
WRITE_CALLS = {"apply", "map_update", "map_update_batch", "map_delete", "map_delete_batch",
               "obj_pin", "link_create", "link_update", "set_interface_addresses",
               "forget_flows", "cleanup", "items_update_batch",
               "bpf_map_update_elem", "bpf_map_delete_elem", "bpf_obj_pin"}


def sources(directory: Path, skip: tuple[str, ...] = ("generated",)) -> list[Path]:
    return [p for p in sorted(directory.rglob("*.py")) if not set(p.parts) & set(skip)]


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def called_names(path: Path) -> dict[str, int]:
    """Name of every function or method called -> first line it is called on."""
    calls = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            calls.setdefault(name, node.lineno)
    return calls


# ---- the API cannot change state --------------------------------------------------------

def test_every_rpc_of_the_agent_service_only_reads():
    services = agent_pb2.DESCRIPTOR.services_by_name
    assert list(services) == ["Agent"], "a new service needs its own read-only review"
    methods = services["Agent"].methods
    assert len(methods) >= 6
    writers = [m.name for m in methods if not m.name.startswith(READ_ONLY_VERBS)]
    assert writers == [], f"RPCs that are not Get/List/Watch: {writers}"
    # and the server implements exactly these (no extra handler slipped in by hand)
    handlers = {n for n in vars(server.AgentService) if n[:1].isupper()}
    assert handlers == {m.name for m in methods}


@pytest.mark.parametrize("path", sources(AGENT / "api"), ids=lambda p: p.name)
def test_api_code_never_imports_or_calls_a_kernel_writer(path):
    imports = imported_modules(path)
    reached = {m for m in imports if m in KERNEL_WRITERS
               or any(m.startswith(w + ".") for w in KERNEL_WRITERS)}
    assert reached == set(), f"{path.name} imports {sorted(reached)}"
    writes = {name: line for name, line in called_names(path).items() if name in WRITE_CALLS}
    assert writes == {}, f"{path.name} calls {writes}"


def test_the_inventory_the_api_reads_through_only_reads():
    inventory = AGENT / "datapath" / "inventory.py"
    writes = {n: line for n, line in called_names(inventory).items() if n in WRITE_CALLS}
    assert writes == {}, writes
    assert "agent.datapath.maps" not in imported_modules(inventory)


def test_the_checks_above_do_find_a_writer(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from agent.datapath.maps import BpfServiceMaps\nmaps.apply(ops)\n")
    assert "agent.datapath.maps" in imported_modules(bad)
    assert "apply" in called_names(bad)


@pytest.mark.parametrize("path", sources(AGENT / "api"), ids=lambda p: p.name)
def test_http_handlers_answer_get_and_head_only(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("do_"):
            assert node.name in ("do_GET", "do_HEAD"), f"{path.name}:{node.lineno} {node.name}"


# ---- no shell --------------------------------------------------------------------------

def shell_outs(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and \
                func.value.id == "os" and (func.attr in ("system", "popen")
                                           or func.attr.startswith("spawn")):
            found.append(f"{path.name}:{node.lineno} os.{func.attr}")
        for keyword in node.keywords:
            if keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant)
                                               and keyword.value.value is False):
                found.append(f"{path.name}:{node.lineno} shell=")
        # a command as one string would need a shell to split it
        if isinstance(func, ast.Attribute) and func.attr in ("run", "Popen", "check_output",
                                                             "check_call", "call") \
                and isinstance(func.value, ast.Name) and func.value.id == "subprocess" \
                and node.args and isinstance(node.args[0], ast.Constant | ast.JoinedStr):
            found.append(f"{path.name}:{node.lineno} command string")
    return found


def test_the_agent_never_goes_through_a_shell():
    paths = sources(AGENT)
    assert len(paths) > 20
    assert [hit for p in paths for hit in shell_outs(p)] == []


def test_the_shell_check_finds_each_form(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os, subprocess\nos.system('x')\nos.popen('y')\n"
                   "subprocess.run(['a'], shell=True)\nsubprocess.run(f'mount {x}')\n")
    assert len(shell_outs(bad)) == 4


# ---- modes -----------------------------------------------------------------------------

def test_api_socket_is_0660_in_a_0750_directory_it_creates(tmp_path):
    socket_path = tmp_path / "run" / "bpfproxy" / "api.sock"

    status = synced_status(*cluster())[0]

    async def modes_while_serving():
        srv = await server.start(f"unix://{socket_path}", status)
        try:
            return [stat.S_IMODE(p.stat().st_mode) for p in (socket_path, socket_path.parent)]
        finally:
            await srv.stop(grace=None)

    assert asyncio.run(modes_while_serving()) == [0o660, 0o750]


def test_pins_and_their_directories_are_for_the_agent_only(tmp_path):
    pin_dir = tmp_path / "bpfp-pins"
    (pin_dir / "links").mkdir(parents=True, mode=0o755)
    pin_dir.chmod(0o755)
    for pin in (pin_dir / "bpfp_svc4_v1", pin_dir / "links" / "bpfp_connect4"):
        pin.write_text("")
        pin.chmod(0o644)
    loader.restrict_pins(pin_dir)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in (pin_dir, *pin_dir.rglob("*"))}
    assert modes == {"bpfp-pins": 0o700, "bpfp-pins/links": 0o700,
                     "bpfp-pins/bpfp_svc4_v1": 0o600, "bpfp-pins/links/bpfp_connect4": 0o600}


# ---- capability sets -------------------------------------------------------------------

def test_capability_sets_are_consistent():
    assert capabilities.AGENT_CAPABILITIES <= capabilities.CONTAINER_CAPABILITIES
    assert capabilities.names(capabilities.AGENT_CAPABILITIES) == "CAP_NET_ADMIN,CAP_BPF"
    assert capabilities.names(capabilities.NETNS_OPENER_CAPABILITIES) == \
        "CAP_SYS_PTRACE,CAP_SYS_ADMIN"
    assert capabilities.from_mask(0x1 << 21 | 0x1 << 12) == {21, 12}
    assert capabilities.names([]) == "none" and capabilities.name(40) == "cap40"


def test_capabilities_are_read_from_a_status_file(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nCapInh:\t0000000000000000\nCapPrm:\t0000000000201000\n"
                      "CapEff:\t0000000000201000\nCapBnd:\t000001ffffffffff\n")
    assert capabilities.of_task(status) == {12, 21}
    assert len(capabilities.of_task(status, "CapBnd")) == 41
    with pytest.raises(ValueError):
        capabilities.of_task(status, "CapAmb")


def test_the_readme_documents_the_set_the_agent_keeps():
    readme = (AGENT.parent / "README.md").read_text()
    section = readme[readme.index("## Security"):]
    for cap in capabilities.AGENT_CAPABILITIES | capabilities.NETNS_OPENER_CAPABILITIES:
        assert capabilities.name(cap) in section.split("\n## ")[0]


# ---- a failed drop stops the agent (issue 13, A5) --------------------------------------

def test_a_failed_capset_is_fatal(monkeypatch):
    def refused(keep):
        raise OSError(1, "capset: Operation not permitted")

    monkeypatch.setattr(capabilities, "drop_to", refused)
    with pytest.raises(capabilities.DropFailed, match="capset: Operation not permitted"):
        capabilities.drop_after_loading()


def test_a_thread_that_kept_more_is_fatal(monkeypatch):
    monkeypatch.setattr(capabilities, "drop_to", lambda keep: frozenset(keep))
    monkeypatch.setattr(capabilities, "other_threads_with_more",
                        lambda allowed: {4242: frozenset({capabilities.CAP_SYS_ADMIN})})
    with pytest.raises(capabilities.DropFailed, match=r"threads \[4242\] kept .*CAP_SYS_ADMIN"):
        capabilities.drop_after_loading()
