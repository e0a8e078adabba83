"""One lab node per contestant, identical in shape: a client pod and backend pods running
`loadgen server`, so every contestant serves the same client from the same servers.

A node holds only its own contestant's state (rules or an agent): a rule set loaded for
iptables is never walked by a bpfproxy or direct connection."""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.api.generated import agent_pb2, agent_pb2_grpc
from bench import loadgen
from lab import Lab, Pod
from lab.agent_runner import AgentRunner

CPU = "1"                # client and servers share one CPU: the steadiest figures here
BACKENDS = ("be-a", "be-b", "be-c")
PORT = 8080
NAME_PORT = 9000         # lab podserver: answers with the pod's name (who got a connection)


@dataclass
class Bed:
    kind: str                               # direct | bpfproxy | iptables | nftables
    lab: Lab
    client: Pod
    backends: list[Pod]
    loadgen: Path
    agent: AgentRunner | None = None
    manifests: Path | None = None
    extra_pods: list[Pod] = field(default_factory=list)

    @property
    def backend_ips(self) -> list[str]:
        return [p.ip for p in self.backends]

    def run_client(self, mode: str, addr: str, port: int, seconds: float,
                   threads: int = 1) -> dict:
        argv = ["taskset", "-c", CPU, str(self.loadgen), mode, "--addr", addr, "--port",
                str(port), "--duration", str(seconds), "--threads", str(threads),
                "--warmup", "0.2"]
        done = self.client.run(argv, timeout=seconds + 30, check=True)
        return loadgen.parse_result(done.stdout)

    def close(self) -> None:
        if self.agent is not None:
            self.agent.close()
        self.lab.close()


def start_server(pod: Pod, binary: Path) -> subprocess.Popen:
    server = pod.popen(["taskset", "-c", CPU, str(binary), "server", "--port", str(PORT),
                        "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    if not loadgen.wait_ready(server, timeout=10):
        raise RuntimeError(f"loadgen server in {pod.name} did not start: "
                           f"{server.stderr.read() if server.poll() is not None else ''}")
    return server


def _open_lab(kind: str) -> Lab:
    """The contestant's lab, under the next free name when a running bench holds the first
    (the suite's smallest bench beside a developer's `make bench`)."""
    for suffix in ("", *map(str, range(2, 10))):
        lab = Lab(f"b{kind[:6]}{suffix}")
        try:
            lab.open()
            return lab
        except RuntimeError as exc:
            if "a running lab has this name" not in str(exc):
                raise
    raise RuntimeError(f"bench node {kind}: every lab name is held by a running bench")


def build(kind: str, binary: Path, extra_backends: int = 0) -> Bed:
    lab = _open_lab(kind)
    try:
        backends = [lab.add_pod(name) for name in BACKENDS]
        client = lab.add_pod("client")
        extra = [lab.add_pod(f"be-x{i}") for i in range(extra_backends)]
        for pod in (*backends, *extra):
            start_server(pod, binary)
        bed = Bed(kind, lab, client, backends, binary, extra_pods=extra)
        if kind == "bpfproxy":
            for pod in (*backends, *extra):
                pod.start_server([NAME_PORT])
            bed.manifests = lab.workdir / "manifests"
            bed.manifests.mkdir()
            # sizes for the largest cluster measured, not those derived from this node
            bed.agent = AgentRunner(lab, bed.manifests, extra_args=(
                "--sync-period", "3600", "--max-frontends", "262144",
                "--max-backend-slots", "2097152"))
            bed.agent.start()
        return bed
    except BaseException:
        lab.close()
        raise


# --- the agent's status, read as a script would --------------------------------------

class AgentClient:
    def __init__(self, api: str) -> None:
        import grpc
        self.channel = grpc.insecure_channel(api)
        self.stub = agent_pb2_grpc.AgentStub(self.channel)

    def status(self) -> agent_pb2.Status:
        return self.stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=10)

    def wait(self, predicate, timeout: float = 300.0, poll: float = 0.002):
        import grpc
        deadline = time.monotonic() + timeout
        status = None
        while True:
            try:
                status = self.status()
            except grpc.RpcError:          # a busy agent: ask again until the deadline
                if time.monotonic() > deadline:
                    raise
                continue
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent status never matched: {status}")
            time.sleep(poll)

    def close(self) -> None:
        self.channel.close()


def agent_memory(pid: int) -> tuple[int, int]:
    """(resident set in bytes, memory of the BPF maps it holds in bytes, from fdinfo)."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    maps = 0
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    for entry in fdinfo.iterdir():
        try:
            text = entry.read_text()
        except OSError:
            continue
        if "map_type:" in text:
            for line in text.splitlines():
                if line.startswith("memlock:"):
                    maps += int(line.split()[1])
    return rss, maps
