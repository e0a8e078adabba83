"""Restart and upgrade without loss (issue 9, point 1): while pods open hundreds of TCP and
UDP connections a second to several services, the agent is SIGKILLed and started again,
and replaced by a build whose map layout changed (version 2: struct svc_value grew a
field). No connection fails, none reaches another service's backends, and no answer shows
an address other than the service's.

The version-2 build is a copy of agent/ and bpf/ with maps.h and layout.py changed, as a
real upgrade ships both; it runs from its own directory (`python -m` puts that first on
sys.path)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent.datapath import btf, layout, loader, migrate
from agent.datapath.config import DatapathConfig
from lab import manifests
from lab.agent_runner import BPFPROXY, AgentRunner
from tests import reliability_report

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("alpha", "beta", "gamma")
VIPS = {name: f"10.96.9.{10 + i}" for i, name in enumerate(SERVICES)}
PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
         {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]
SLICE_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"},
               {"name": "dns", "port": 5353, "protocol": "UDP"}]
GROWN_FIELD = "generation"


def build_v2(into: Path, grow: tuple[tuple[str, str], ...] = (("svc_value", "SvcValue"),)
             ) -> Path:
    """A copy of this build with layout version 2: pins named _v2, and each struct in grow
    (C name, layout.py name) one field longer, in C and in Python. By default svc_value: the
    map every connection to a service reads."""
    shutil.copytree(REPO / "agent", into / "agent",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "bpf", into / "bpf")
    _rewrite(into / "bpf" / "maps.h", [
        (r"#define BPFP_MAPS_VERSION 1\b", "#define BPFP_MAPS_VERSION 2", 1),
        (r'_v1"\)', '_v2")', None),
        *((rf"(struct {c_name} \{{.*?)\n\}};",
           rf"\1\n        __u64 {GROWN_FIELD};       /* version 2 */\n}};", 1)
          for c_name, _ in grow)])
    _rewrite(into / "agent" / "datapath" / "layout.py", [
        (r'_v1"', '_v2"', None),
        *((rf"(class {py_name}\(ctypes.Structure\):\n    _fields_ = \[.*?\))\]\n",
           rf'\1, ("{GROWN_FIELD}", ctypes.c_uint64)]\n', 1) for _, py_name in grow)])
    return into


def _rewrite(path: Path, edits: list[tuple[str, str, int | None]]) -> None:
    text = path.read_text()
    for pattern, replacement, expected in edits:
        text, count = re.subn(pattern, replacement, text, flags=re.S)
        assert count and (expected is None or count == expected), \
            f"{path.name}: {pattern!r} matched {count} times; update build_v2"
    path.write_text(text)


class BuildRunner(AgentRunner):
    """The agent of another build, run from that build's directory."""

    def __init__(self, *args, build: Path, **kw) -> None:
        super().__init__(*args, **kw)
        self.build = build

    def start(self, wait: float = 60.0) -> None:
        with open(self.log_path, "a") as log:
            self.process = self.lab.processes.start(
                [*BPFPROXY, "agent", "--manifests", str(self.manifests), "--cgroup",
                 str(self.lab.cgroup), "--bpffs", str(self.bpffs), "--api", self.api,
                 "--node-name", self.node_name, *self.extra_args],
                self.lab.node_netns, owner="", cwd=self.build, stdout=log,
                stderr=subprocess.STDOUT)
        if wait:
            self.wait_synced(wait)

    def cleanup(self) -> subprocess.CompletedProcess:
        return subprocess.run([*BPFPROXY, "cleanup", "--bpffs", str(self.bpffs), "--cgroup",
                               str(self.lab.cgroup)], capture_output=True, text=True,
                              timeout=30, cwd=self.build)


# --- the lab: three services, two backends each, TCP and UDP -------------------------------

def serve_services(lab, directory: Path) -> dict[str, list]:
    backends = {}
    for name in SERVICES:
        backends[name] = [lab.add_pod(f"{name}-{i}") for i in range(2)]
        for pod in backends[name]:
            pod.start_server([8080, 5353], udp=True)
        manifests.write(directory, f"{name}.yaml", manifests.service(name, VIPS[name], PORTS),
                        manifests.endpoint_slice(name, [p.ip for p in backends[name]],
                                                 SLICE_PORTS))
    return backends


# (service, mode): new TCP connections to each service, new UDP sockets to one, and one UDP
# socket held across everything (its replies must keep coming from the service address)
LOAD = (("alpha", "tcp"), ("beta", "tcp"), ("gamma", "tcp"), ("gamma", "udp"),
        ("alpha", "udp-one-socket"))


def start_load(client) -> dict:
    """Each client at most 500 requests a second: hundreds per service, and CPU left for
    the agent on a small machine. They run until check_load() stops them (120 s at most),
    and each has made its first request when this returns."""
    running = {(name, mode): client.start_client(mode, VIPS[name],
                                                 80 if mode == "tcp" else 53, duration=120,
                                                 interval=0.002, timeline=True,
                                                 until_stopped=True)
               for name, mode in LOAD}
    for run in running.values():
        run.wait_started()
    return running


def probe(client) -> dict:
    """New TCP connections to each service and UDP sockets to one, made now: while the node
    is in one state (no agent, or another build's) rather than for a time."""
    probes = {(name, "tcp"): client.tcp(VIPS[name], 80, count=10) for name in SERVICES}
    probes["gamma", "udp"] = client.udp(VIPS["gamma"], 53, count=10)
    return probes


def assert_served(probes: dict, backends: dict) -> None:
    for (name, mode), result in probes.items():
        port = 8080 if mode == "tcp" else 5353
        assert result.errors == {} and result.wrong_source == 0, (name, mode, result)
        assert set(result.answers) <= {f"{pod.name}:{port}" for pod in backends[name]}, \
            (name, mode, result.answers)


def check_load(running: dict, backends: dict, last_ready: float) -> dict:
    """Stops the clients (their last requests begin after last_ready). Every request
    answered, by the right service's backends, with the service's address; and the clients
    still sending after the last agent took over. Returns the figures."""
    results = {key: run.stop() for key, run in running.items()}
    total = failed = misrouted = 0
    for (name, mode), result in results.items():
        port = 8080 if mode == "tcp" else 5353
        allowed = {f"{pod.name}:{port}" for pod in backends[name]}
        wrong = {a: n for a, n in result.answers.items() if a not in allowed}
        total += result.total
        failed += result.failed
        misrouted += sum(wrong.values()) + result.wrong_peer + result.wrong_source
        assert result.errors == {}, f"{name} {mode}: failed requests {result.errors}"
        assert not wrong, f"{name} {mode}: answers from other services' backends {wrong}"
        assert result.wrong_peer == 0 and result.wrong_source == 0, \
            f"{name} {mode}: an address other than the service's was seen"
        assert result.started + result.timeline[-1][0] > last_ready, \
            f"{name} {mode}: the client must still be sending after the last agent took over"
        if mode == "udp-one-socket":
            assert len(result.backends()) == 1, f"the held UDP socket moved: {result.answers}"
    first = min(r.started for r in results.values())
    last = max(r.started + r.timeline[-1][0] for r in results.values())
    return {"results": results, "total": total, "failed": failed, "misrouted": misrouted,
            "rate": total / (last - first)}


def requests_between(results: dict, start: float, end: float) -> int:
    return sum(start <= r.started + t <= end for r in results.values() for t, _ in r.timeline)


def pins(runner: AgentRunner) -> set[str]:
    return {p.name for p in runner.bpffs.iterdir()} if runner.bpffs.exists() else set()


def map_shape(pin: Path) -> btf.MapShape:
    fd = loader.bpfsys.obj_get(str(pin))
    try:
        return btf.map_shape(fd)
    finally:
        os.close(fd)


def one_program_per_hook(lab) -> bool:
    return all(len(loader.bpfsys.cgroup_program_ids(str(lab.cgroup), hook)) == 1
               for _, hook in loader.SOCKET_PROGRAMS)


# --- the tests ---------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_agent_sigkilled_and_restarted_under_load(make_lab, tmp_path):
    lab = make_lab(name="u9kill")
    directory = tmp_path / "manifests"
    backends = serve_services(lab, directory)
    agent = AgentRunner(lab, directory)
    try:
        agent.start()
        client = lab.add_pod("client")
        running = start_load(client)
        killed_at = time.monotonic()
        assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
        without_agent = probe(client)     # no agent at all: the kernel keeps serving
        agent.start()                     # adopts the pinned maps, swaps its programs in
        ready_at = time.monotonic()
        figures = check_load(running, backends, ready_at)
        assert_served(without_agent, backends)
        log = agent.log()
        assert "event=adopted service_ports=6" in log
        assert one_program_per_hook(lab)
    finally:
        agent.close()
    reliability_report.record(
        "1", "restart-sigkill-under-load",
        "3 services x 2 backends; new TCP connections to each, new UDP sockets to one, one "
        "UDP socket held; agent SIGKILLed, new connections made without agent, started again",
        connections=figures["total"], failures=figures["failed"] + figures["misrouted"],
        connections_per_second=round(figures["rate"]), misrouted=figures["misrouted"],
        requests_without_agent_or_restarting=requests_between(
            figures["results"], killed_at, ready_at))
    assert not agent.bpffs.exists()



@pytest.mark.timeout(180)
def test_upgrade_to_a_new_map_layout_and_back_under_load(make_lab, tmp_path):
    lab = make_lab(name="u9upg")
    directory = tmp_path / "manifests"
    backends = serve_services(lab, directory)
    v2_build = build_v2(tmp_path / "build-v2")
    v1 = AgentRunner(lab, directory)
    v2 = BuildRunner(lab, directory, build=v2_build)
    v1_pins = set(loader.PINNED_MAPS.values()) | {"links"}
    v2_pins = {pin.replace("_v1", "_v2") for pin in v1_pins}
    try:
        v1.start()
        client = lab.add_pod("client")
        running = start_load(client)
        # a rolling update: the old agent stops, the new build starts on what it left
        upgrade_at = time.monotonic()
        assert v1.stop(signal.SIGTERM) == 0
        v2.start()
        upgraded_at = time.monotonic()
        after_upgrade = pins(v2)
        svc4 = map_shape(v2.bpffs / "bpfp_svc4_v2")
        log = v2.log()
        under_v2 = probe(client)          # the new build's maps serve
        # and back: the older build converts the newer build's maps just the same
        rollback_at = time.monotonic()
        assert v2.stop(signal.SIGTERM) == 0
        v1.start()
        rolled_back_at = time.monotonic()
        after_rollback = pins(v1)
        figures = check_load(running, backends, rolled_back_at)
        assert_served(under_v2, backends)
        assert one_program_per_hook(lab)
    finally:
        v2.close()
        v1.close()
        cleaned = v1.cleanup()
    assert after_upgrade == v2_pins, "old pins must be gone after the upgrade"
    assert (svc4.value_size, svc4.value[-1][0]) == (32, GROWN_FIELD)
    assert re.search(r"map=bpfp_svc4 from=bpfp_svc4_v1 to=bpfp_svc4_v2 how=converted "
                     r"entries=6 ", log), "the frontends were converted before the swap"
    assert re.search(r"how=shared to_version=2 maps=\S*bpfp_revnat4", log)
    assert after_rollback == v1_pins
    assert cleaned.returncode == 0 and not v1.bpffs.exists()
    assert loader.wait_detached(lab.cgroup, 5) == []
    results = figures["results"]
    reliability_report.record(
        "1", "upgrade-map-layout-under-load",
        "load as in restart-sigkill-under-load; agent replaced by a build with map layout "
        "version 2 (svc_value grew a field: frontends converted, other maps shared), then "
        "back to version 1",
        connections=figures["total"], failures=figures["failed"] + figures["misrouted"],
        connections_per_second=round(figures["rate"]), misrouted=figures["misrouted"],
        requests_during_upgrade=requests_between(results, upgrade_at, upgraded_at),
        requests_during_rollback=requests_between(results, rollback_at, rolled_back_at),
        seconds_to_upgrade=round(upgraded_at - upgrade_at, 1))


@pytest.mark.timeout(120)
def test_live_udp_sockets_keep_their_replies_when_reverse_nat_changes_layout(make_lab, tmp_path):
    """revnat4 is written by the programs themselves (one entry per balanced socket): when
    its layout changes it is converted, and a socket opened long before the upgrade still
    gets its replies from the service address, from the same backend."""
    lab = make_lab(name="u9udp")
    directory = tmp_path / "manifests"
    backends = serve_services(lab, directory)
    build = build_v2(tmp_path / "build-v2", grow=(("revnat4_value", "Revnat4Value"),))
    v1 = AgentRunner(lab, directory)
    v2 = BuildRunner(lab, directory, build=build)
    try:
        v1.start()
        client = lab.add_pod("client")
        held = {name: client.start_client("udp-one-socket", VIPS[name], 53, duration=120,
                                          interval=0.01, timeline=True, until_stopped=True)
                for name in SERVICES}
        for run in held.values():
            run.wait_started()            # each socket balanced by v1's programs
        assert v1.stop(signal.SIGTERM) == 0
        v2.start()
        upgraded_at = time.monotonic()
        # stopped: each socket's last request begins after v2 took over
        results = {name: run.stop() for name, run in held.items()}
        log = v2.log()
    finally:
        v2.close()
        v1.close()
    converted = re.search(r"map=bpfp_revnat4 from=bpfp_revnat4_v1 to=bpfp_revnat4_v2 "
                          r"how=converted entries=(\d+)", log)
    assert converted and int(converted.group(1)) >= len(SERVICES), log
    for name, result in results.items():
        assert result.errors == {} and result.wrong_source == 0, (name, result)
        assert len(result.backends()) == 1 and result.backends() <= {
            pod.name for pod in backends[name]}, (name, result.answers)
        assert result.started + result.timeline[-1][0] > upgraded_at


def test_every_maps_btf_is_what_layout_py_mirrors():
    """An upgrade shares a map when the old map's BTF equals this build's layout.py: were
    they to disagree in form (names, padding), every upgrade would copy every map."""
    config = DatapathConfig(pin_dir=Path(f"/sys/fs/bpf/bpfp-u9btf{os.getpid()}"))
    try:
        loader.compile_programs(config)
        for spec in layout.MAPS.values():
            shape = map_shape(config.pin_dir / spec.pin)
            key, value = migrate.mirrored(spec)
            assert (shape.key, shape.key_size) == (key.fields, key.size), spec.table
            assert (shape.value, shape.value_size) == (value.fields, value.size), spec.table
    finally:
        loader.cleanup(config.pin_dir)


# --- the copies write in batches (issue 14.4) ------------------------------------------------

def _create_map(map_type: int, key_size: int, value_size: int, entries: int) -> int:
    import ctypes

    libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
    libbpf.bpf_map_create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32,
                                      ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p]
    fd = libbpf.bpf_map_create(map_type, b"bpfp_copytest", key_size, value_size, entries,
                               None)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    return fd


@pytest.mark.parametrize("map_type", [1, 5], ids=["hash", "percpu_hash"])
def test_late_entries_reach_the_new_map_in_batches(monkeypatch, map_type):
    """What the old programs wrote after the fill (here 3000 entries, 20 of which the new
    programs also wrote since) reaches the new map in a few batch writes, not one syscall
    per entry; entries the new map holds stay as they are."""
    import ctypes

    from agent.datapath import bpfsys, inventory

    cpus = inventory.possible_cpus() if map_type == 5 else 1
    old_fd, new_fd = (_create_map(map_type, 4, 8, 4096) for _ in range(2))
    try:
        def write(fd, numbers, base):
            keys = (ctypes.c_uint32 * len(numbers))(*numbers)
            values = (ctypes.c_uint64 * (len(numbers) * cpus))(
                *(base + n for n in numbers for _ in range(cpus)))
            assert bpfsys.map_update_batch(fd, keys, values, len(numbers)) == (len(numbers), 0)

        write(old_fd, list(range(3000)), 0)
        write(new_fd, list(range(0, 3000, 150)), 1_000_000)     # the new programs' own
        fields = (("", 0, 4),), (("", 0, 8),)
        old = btf.MapShape(1, map_type, 4, 8, 4096, 0, *fields)
        new = btf.MapShape(2, map_type, 4, 8, 4096, 0, *fields)
        writes = []
        batch_update = bpfsys.map_update_batch
        monkeypatch.setattr(bpfsys, "map_update_batch",
                            lambda fd, *a: writes.append(a[-1]) or batch_update(fd, *a))
        monkeypatch.setattr(migrate, "_insert",
                            lambda *a: pytest.fail("one syscall for one entry"))
        copied, present = migrate.copy_entries("bpfp_copytest", 1, old_fd, old, new_fd, new)
        assert (copied, present) == (2980, 20)
        assert writes == [2980]
        value = (ctypes.c_uint64 * cpus)()
        for n in range(3000):
            assert bpfsys.map_lookup(new_fd, ctypes.c_uint32(n), value), n
            want = n + 1_000_000 if n % 150 == 0 else n
            assert list(value) == [want] * cpus, (n, list(value))
        # a second late copy finds everything there and writes nothing
        writes.clear()
        assert migrate.copy_entries("bpfp_copytest", 1, old_fd, old, new_fd, new) == (0, 3000)
        assert writes == []
    finally:
        os.close(old_fd)
        os.close(new_fd)
