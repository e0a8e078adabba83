"""SCTP services: written to the kernel like TCP and UDP (the socket programs balance SCTP
connects too); the traffic test needs a kernel with SCTP, which this machine lacks."""
from __future__ import annotations

import socket
import subprocess

import pytest

from lab import manifests
from lab.agent_runner import AgentRunner

pytestmark = pytest.mark.integration

VIP = "10.96.0.80"


def kernel_has_sctp() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
        return True
    except OSError:
        return False


@pytest.fixture
def node(make_lab, tmp_path):
    lab = make_lab()
    backend = lab.add_pod("backend")
    client = lab.add_pod("client")
    directory = tmp_path / "manifests"
    manifests.write(directory, "sctp.yaml",
                    manifests.service("sig", VIP, [{"name": "sig", "port": 3868,
                                                    "targetPort": 3868, "protocol": "SCTP"}]),
                    manifests.endpoint_slice("sig", [backend.ip],
                                             [{"name": "sig", "port": 3868,
                                               "protocol": "SCTP"}]))
    agent = AgentRunner(lab, directory)
    try:
        agent.start()
        yield lab, agent, backend, client
    finally:
        agent.close()


def test_sctp_service_ports_are_in_the_kernel(node):
    _, agent, backend, _ = node
    [entry] = agent.services()
    assert entry["protocol"] == "SCTP"
    assert entry["frontends"] == [{"address": VIP, "port": 3868, "kind": "ClusterIP"}]
    assert entry["backends"] == [{"address": backend.ip, "port": 3868, "state": "ready"}]


@pytest.mark.skipif(not kernel_has_sctp(), reason="this kernel has no SCTP (no module, not "
                                                  "built in): SCTP traffic cannot be sent")
def test_sctp_connect_reaches_the_backend(node):
    _, _, backend, client = node
    server = backend.popen(["python3", "-c", (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132); "
        "s.bind(('0.0.0.0', 3868)); s.listen(); print('ready', flush=True); "
        "c, _ = s.accept(); c.send(b'sctp-ok'); c.close()")],
        stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    done = client.run(["python3", "-c", (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132); "
        f"s.settimeout(3); s.connect(('{VIP}', 3868)); print(s.recv(16).decode())")],
        timeout=10)
    assert done.stdout.strip() == "sctp-ok"
