"""Runs the real `bpfproxy agent` in a lab's node namespace, attached to the lab's cgroup.

Maps and links are pinned under /sys/fs/bpf/bpfp-<lab>; close() stops the agent and runs
`bpfproxy cleanup`, so nothing stays in the kernel after a test or the demo."""
from __future__ import annotations

import ipaddress
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from lab.node import Lab

BPFPROXY = [sys.executable, "-m", "agent.cli"]
T = TypeVar("T")


class AgentRunner:
    def __init__(self, lab: Lab, manifests: Path, extra_args: tuple[str, ...] = (),
                 node_name: str = "bpfp-node") -> None:
        self.lab = lab
        self.manifests = manifests
        self.bpffs = Path(f"/sys/fs/bpf/bpfp-{lab.name}")
        self.api = f"unix://{lab.workdir}/api.sock"
        self.log_path = lab.workdir / "agent.log"
        self.extra_args = extra_args
        self.node_name = node_name  # EndpointSlices' nodeName: which backends are local
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> AgentRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, wait: float = 60.0) -> None:
        """Start the agent and wait until its first full sync is in the kernel."""
        log = open(self.log_path, "a")
        self.process = self.lab.node_popen(
            [*BPFPROXY, "agent", "--manifests", str(self.manifests), "--cgroup",
             str(self.lab.cgroup), "--bpffs", str(self.bpffs), "--api", self.api,
             "--node-name", self.node_name, *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if wait:
            self.wait_synced(wait)

    def wait_synced(self, timeout: float = 60.0) -> None:
        done = self.cli("status", "--api", self.api, "--wait", str(timeout), check=False,
                        timeout=timeout + 10)
        if done.returncode != 0:
            raise RuntimeError(f"agent not synced after {timeout}s: {done.stderr.strip()}\n"
                               f"--- agent log ---\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the agent (by its pid) and wait for it to exit."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self.lab.processes.forget(self.process)
        return code

    def services(self) -> list[dict]:
        done = self.cli("services", "--api", self.api, "-o", "json")
        return json.loads(done.stdout)

    def kernel_services(self) -> dict:
        """The service ports the kernel holds (planner.AppliedState): the pinned maps read
        back, as a restarted agent adopts them, with no agent or API in between."""
        from agent.datapath.maps import BpfServiceMaps
        maps = BpfServiceMaps(self.bpffs)
        try:
            return maps.read_back()
        finally:
            maps.close()

    def kernel_backends(self, address: str, port: int, protocol: str = "TCP"
                        ) -> set[str] | None:
        """Addresses in the slot table of address:port/protocol as every path sees it
        (scope 0): who new connections can reach. None: the kernel has no such frontend."""
        from agent.model.types import Protocol
        from agent.planner import FrontendKey
        wanted = FrontendKey(ipaddress.ip_address(address), port, Protocol(protocol))
        for service in self.kernel_services().values():
            if wanted in service.frontends:
                return {str(b.address) for b in service.backends}
        return None

    def wait_until(self, condition: Callable[[], T], what: str, timeout: float = 60.0) -> T:
        """Poll condition() until it returns something true, and return that: how a test
        waits for the agent to apply a change. timeout only turns a hang into a failure
        (with the agent's log); it is no speed target."""
        deadline = time.monotonic() + timeout
        while not (value := condition()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not seen within {timeout}s (last: {value!r})"
                                     f"\n--- agent log (end) ---\n{self.log()[-3000:]}")
            time.sleep(0.05)
        return value

    def cli(self, *args: str, check: bool = True, timeout: float = 30.0
            ) -> subprocess.CompletedProcess:
        """The command line as a user runs it (from the host: the API is a unix socket)."""
        done = subprocess.run([*BPFPROXY, *args], capture_output=True, text=True,
                              timeout=timeout, cwd=Path(__file__).resolve().parents[1])
        if check and done.returncode != 0:
            raise RuntimeError(f"bpfproxy {' '.join(args)} exited {done.returncode}: "
                               f"{done.stderr.strip()}")
        return done

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def cleanup(self) -> subprocess.CompletedProcess:
        return self.cli("cleanup", "--bpffs", str(self.bpffs), "--cgroup", str(self.lab.cgroup),
                        check=False)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop(signal.SIGKILL)
        self.cleanup()
