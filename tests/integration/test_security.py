"""Security (issue 9, point 8) on a real agent: started with only the DaemonSet's
capabilities it loads, then keeps exactly the documented set in every thread and can never
regain another, and still syncs, closes stale UDP sockets and answers its API; the API
exposes no method that changes state; sockets, directories and pins have tight modes."""
from __future__ import annotations

import json
import select
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from agent import capabilities
from lab import manifests
from lab.agent_runner import BPFPROXY, AgentRunner
from tests import reliability_report
from tests.helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

VIP = "10.96.0.98"
PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
         {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]
SLICE_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"},
               {"name": "dns", "port": 5353, "protocol": "UDP"}]

# As a container runtime starts a root process with a capability list: the bounding set
# limited (and no_new_privs), then exec; root's exec gets exactly that set.
AS_CONTAINER = textwrap.dedent("""
    import os, sys
    from agent import capabilities
    capabilities.drop_to({int(c) for c in sys.argv[1].split(",")})
    os.execv(sys.argv[2], sys.argv[2:])
""")

# One connected UDP socket: prints the backend of its first answer, then what a recv()
# gets while the socket sits idle (ECONNABORTED once the agent destroys it).
UDP_CLIENT = textwrap.dedent("""
    import errno, socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.settimeout(5)
    s.send(b"?")
    print(s.recv(100).decode().strip(), flush=True)
    s.settimeout(60)
    try:
        s.recv(100)
        print("data", flush=True)
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e)), flush=True)
""")


def read_line(process: subprocess.Popen, timeout: float) -> str:
    readable, _, _ = select.select([process.stdout], [], [], timeout)
    return process.stdout.readline().strip() if readable else "no answer"


def write_service(directory: Path, pods) -> None:
    manifests.write(directory, "web.yaml", manifests.service("web", VIP, PORTS),
                    manifests.endpoint_slice("web", [p.ip for p in pods], SLICE_PORTS))


def task_sets(pid: int) -> dict[int, dict[str, frozenset[int]]]:
    return {int(task.name): {field: capabilities.of_task(task / "status", field)
                             for field in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb")}
            for task in Path(f"/proc/{pid}/task").iterdir()}


def no_new_privs(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    return "NoNewPrivs:\t1" in status


def reflected_methods(api: str) -> dict[str, list[str]]:
    """What the running server says it serves, through gRPC reflection."""
    with grpc.insecure_channel(api) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        return {name: [m.name for m in pool.FindServiceByName(name).methods]
                for name in database.get_services()}


def modes(*paths: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths}


def test_agent_keeps_only_its_capabilities_and_still_works(make_lab, tmp_path):
    lab = make_lab(name="s9sec")
    a, b = lab.add_pod("a"), lab.add_pod("b")
    for pod in (a, b):
        pod.start_server([8080])
        pod.start_server([5353], udp=True)
    client = lab.add_pod("client")
    directory = tmp_path / "manifests"
    write_service(directory, [a, b])
    agent = AgentRunner(lab, directory)
    agent.api = f"unix://{lab.workdir}/run/api.sock"       # a directory the agent creates
    container = ",".join(str(c) for c in sorted(capabilities.CONTAINER_CAPABILITIES))
    clients = []
    try:
        with open(agent.log_path, "a") as log:
            agent.process = lab.node_popen(
                [sys.executable, "-c", AS_CONTAINER, container, *BPFPROXY, "agent",
                 "--manifests", str(directory), "--cgroup", str(lab.cgroup),
                 "--bpffs", str(agent.bpffs), "--api", agent.api, "--node-name", "bpfp-node"],
                stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
        agent.wait_synced()
        tasks = task_sets(agent.process.pid)
        (opener,) = [int(pid) for pid in Path(f"/proc/{agent.process.pid}/task/"
                                              f"{agent.process.pid}/children").read_text().split()]
        opener_tasks = task_sets(opener)
        privs_locked = no_new_privs(agent.process.pid) and no_new_privs(opener)
        status = json.loads(agent.cli("status", "--api", agent.api, "-o", "json").stdout)
        methods = reflected_methods(agent.api)
        tcp = client.tcp(VIP, 80, count=20)
        socket_path = Path(agent.api.removeprefix("unix://"))
        api_modes = modes(socket_path, socket_path.parent)
        pin_modes = modes(agent.bpffs, agent.bpffs / "links", *agent.bpffs.glob("bpfp_*"),
                          *(agent.bpffs / "links").iterdir())

        # stale UDP sockets: connected clients, some on b; b leaves the service
        while len(clients) < 8 or not any(first == "b:5353" for _, first in clients):
            assert len(clients) < 30, "no UDP socket ever went to b"
            process = client.popen([sys.executable, "-c", UDP_CLIENT, VIP, "53"],
                                   stdout=subprocess.PIPE, text=True)
            clients.append((process, read_line(process, 10)))
        write_service(directory, [a])
        wait_for(lambda: {len(s["backends"]) for s in agent.services()} == {1},
                 "b out of the kernel")
        on_b = [p for p, first in clients if first == "b:5353"]
        after = [read_line(p, 20) for p in on_b]
        # the sweep is over once those answered: sockets on a were left alone
        left_alone = [read_line(p, 0.2) for p, first in clients if first == "a:5353"]
        still_synced = json.loads(agent.cli("status", "--api", agent.api,
                                            "-o", "json").stdout)
    finally:
        for process, _ in clients:
            lab.processes.stop(process)
        agent.close()

    kept = capabilities.AGENT_CAPABILITIES
    reliability_report.record(
        "8", "security-capabilities-after-loading",
        "agent started with the DaemonSet's capabilities only; after loading, its threads' "
        "capability sets read from /proc; then a sync, a stale UDP socket sweep and the API",
        connections=tcp.total + len(clients), failures=tcp.failed + sum(
            x != "ECONNABORTED" for x in after),
        started_with=capabilities.names(capabilities.CONTAINER_CAPABILITIES),
        kept=capabilities.names(kept), threads=len(tasks),
        stale_udp_sockets_destroyed=after.count("ECONNABORTED"),
        api_methods=len(methods.get("bpfproxy.v1.Agent", [])))

    # every thread: only the documented set, in every set, for good; setns() and other
    # processes' namespaces only in the opener child, which keeps nothing else
    assert all(sets == {"CapEff": kept, "CapPrm": kept, "CapInh": frozenset(),
                        "CapBnd": kept, "CapAmb": frozenset()}
               for sets in tasks.values()), tasks
    assert not kept & {capabilities.CAP_SYS_ADMIN, capabilities.CAP_SYS_PTRACE}
    opener_kept = capabilities.NETNS_OPENER_CAPABILITIES
    assert list(opener_tasks.values()) == [{
        "CapEff": opener_kept, "CapPrm": opener_kept, "CapInh": frozenset(),
        "CapBnd": opener_kept, "CapAmb": frozenset()}], opener_tasks
    assert privs_locked
    assert "event=capabilities_dropped" in agent.log()
    # and it works with them: sync, the kernel read through the pins, traffic
    assert status["synced"] and status["maps"] and all(p["attached"]
                                                       for p in status["programs"])
    assert tcp.errors == {} and tcp.backends() == {"a", "b"}, tcp
    assert after == ["ECONNABORTED"] * len(on_b), after
    assert left_alone == ["no answer"] * (len(clients) - len(on_b)), left_alone
    assert still_synced["sync_errors"] == 0
    # the API serves nothing that changes state
    agent_methods = methods.pop("bpfproxy.v1.Agent")
    assert agent_methods and all(m.startswith(("Get", "List", "Watch"))
                                 for m in agent_methods), agent_methods
    # besides: health (Check, Watch, List in newer grpcio) and reflection's one query stream
    assert set(methods) == {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    assert set(methods["grpc.health.v1.Health"]) <= {"Check", "List", "Watch"}
    assert methods["grpc.reflection.v1alpha.ServerReflection"] == ["ServerReflectionInfo"]
    # modes
    assert api_modes == {"api.sock": 0o660, "run": 0o750}
    assert pin_modes.pop(agent.bpffs.name) == 0o700 and pin_modes.pop("links") == 0o700
    assert len(pin_modes) > 10 and set(pin_modes.values()) == {0o600}, pin_modes


def test_dropped_capabilities_do_not_come_back_through_exec():
    """The agent is root: without the bounding set and no_new_privs, any exec would hand
    it every capability again."""
    keep = {capabilities.CAP_NET_ADMIN}
    script = textwrap.dedent("""
        import os, sys
        from agent import capabilities
        first = capabilities.drop_to({capabilities.CAP_NET_ADMIN, capabilities.CAP_SETPCAP,
                                      capabilities.CAP_NET_BIND_SERVICE})
        # a capability already dropped is not given back by asking for it
        then = capabilities.drop_to({capabilities.CAP_NET_ADMIN, capabilities.CAP_SYS_ADMIN})
        print(capabilities.names(first), capabilities.names(then), flush=True)
        os.execv("/bin/cat", ["cat", "/proc/self/status"])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30, check=True, cwd=Path(__file__).parents[2])
    first, status = done.stdout.split("\n", 1)
    assert first == "CAP_SETPCAP,CAP_NET_BIND_SERVICE,CAP_NET_ADMIN CAP_NET_ADMIN"
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    for field in ("CapEff", "CapPrm", "CapBnd"):
        assert capabilities.from_mask(int(fields[field], 16)) == keep, (field, fields[field])
    assert fields["NoNewPrivs"] == "1"


def test_a_drop_that_leaves_a_thread_with_more_stops_the_process():
    """Issue 13, A5: a failed drop is fatal, with a message that says why."""
    script = textwrap.dedent("""
        import threading
        from agent import capabilities
        started = threading.Event()
        threading.Thread(target=lambda: (started.set(), threading.Event().wait()),
                         daemon=True).start()
        started.wait()
        capabilities.drop_after_loading()
        print("still running with", capabilities.names(capabilities.of_task()))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30, cwd=Path(__file__).parents[2])
    assert done.returncode != 0 and "still running" not in done.stdout
    assert "DropFailed" in done.stderr and "kept capabilities" in done.stderr, done.stderr


def test_api_metrics_and_health_listen_below_1024_after_the_drop(make_lab, tmp_path):
    """Issue 14.4: --api, --metrics and --healthz on ports below 1024 listen although the
    agent drops CAP_NET_BIND_SERVICE: one thread kept it to bind them and is gone after."""
    lab = make_lab(name="s14bind")
    pod = lab.add_pod("a")
    pod.start_server([8080])
    directory = tmp_path / "manifests"
    write_service(directory, [pod])
    agent = AgentRunner(lab, directory)
    api, metrics, health = "127.0.0.1:97", "127.0.0.1:98", "[::1]:99"
    container = ",".join(str(c) for c in sorted(
        capabilities.CONTAINER_CAPABILITIES | {capabilities.CAP_NET_BIND_SERVICE}))
    fetch = ("import sys, urllib.request; "
             "print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())")
    try:
        with open(agent.log_path, "a") as log:
            agent.process = lab.node_popen(
                [sys.executable, "-c", AS_CONTAINER, container, *BPFPROXY, "agent",
                 "--manifests", str(directory), "--cgroup", str(lab.cgroup),
                 "--bpffs", str(agent.bpffs), "--api", api, "--metrics", metrics,
                 "--healthz", health, "--node-name", "bpfp-node"],
                stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
        status = lab.node_run([*BPFPROXY, "status", "--api", api, "--wait", "60", "-o",
                               "json"], timeout=80)
        scraped = lab.node_run([sys.executable, "-c", fetch, f"http://{metrics}/metrics"])
        healthy = lab.node_run([sys.executable, "-c", fetch, f"http://{health}/healthz"])
        tasks = task_sets(agent.process.pid)
    finally:
        agent.close()
    assert status.returncode == 0, f"{status.stderr}\n{agent.log()}"
    assert json.loads(status.stdout)["synced"]
    assert "bpfproxy_bpf_map_max_entries" in scraped.stdout, (scraped.stderr, agent.log())
    assert healthy.returncode == 0 and healthy.stdout.strip(), (healthy.stderr, agent.log())
    assert "event=metrics_failed" not in agent.log()
    assert "event=healthz_failed" not in agent.log()
    # the binding thread is gone: every thread keeps only the agent's set
    kept = capabilities.AGENT_CAPABILITIES
    assert all(sets["CapEff"] == kept and sets["CapPrm"] == kept and sets["CapBnd"] == kept
               for sets in tasks.values()), tasks
