"""The healthCheckNodePort of an eTP Local LoadBalancer service, probed with a real HTTP client
from a pod at the node's addresses while its only endpoint moves off the node and back:
200 with localEndpoints 1, then 503 with 0, then 200 again, as kube-proxy answers."""
from __future__ import annotations

import itertools
import json
import os
import sys
import time

import pytest

from lab import manifests
from lab.agent_runner import AgentRunner

pytestmark = pytest.mark.integration

HEALTH_PORT = 32000
# Lab names: "hc" + pid + counter, unique to this file's runs (other engineers' labs differ).
_names = (f"hc{os.getpid():x}x{n}" for n in itertools.count(1))

# Runs in the pod: one GET with the standard library's HTTP client, printed as JSON.
PROBE = """
import http.client, json, sys
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=5)
c.request("GET", "/healthz")
r = c.getresponse()
print(json.dumps({"status": r.status, "headers": dict(r.getheaders()),
                  "body": r.read().decode()}))
"""


def probe(pod, address: str) -> dict:
    done = pod.run([sys.executable, "-c", PROBE, address, str(HEALTH_PORT)], check=False)
    if done.returncode != 0:
        return {"status": None, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout)


def probe_until(pod, address: str, status: int, timeout: float = 30.0) -> dict:
    """Probe until the answer has `status` (the agent syncs a file change within moments);
    the last answer is returned either way, for the assertions to show."""
    deadline = time.monotonic() + timeout
    while True:
        answer = probe(pod, address)
        if answer["status"] == status or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


def publish(directory, backend, node_name: str) -> None:
    service = manifests.service(
        "web", "10.96.0.60", [{"name": "http", "port": 80, "targetPort": 8080,
                               "nodePort": 30080, "protocol": "TCP"}],
        service_type="LoadBalancer", external_traffic_policy="Local",
        health_check_node_port=HEALTH_PORT)
    slice_ = manifests.endpoint_slice(
        "web", [backend.ip], [{"name": "http", "port": 8080, "protocol": "TCP"}],
        node_name=node_name)
    manifests.write(directory, "web.yaml", service, slice_)


def expect(answer: dict, status: int, count: int) -> None:
    assert answer["status"] == status, answer
    assert answer["headers"]["Content-Type"] == "application/json", answer
    assert answer["headers"]["X-Content-Type-Options"] == "nosniff", answer
    assert answer["headers"]["X-Load-Balancing-Endpoint-Weight"] == str(count), answer
    assert json.loads(answer["body"]) == {
        "service": {"namespace": "lab", "name": "web"}, "localEndpoints": count,
        "serviceProxyHealthy": True}, answer


@pytest.mark.parametrize("listen", ["node-ips", "all-addresses"])
def test_health_check_follows_the_local_endpoint(make_lab, tmp_path, listen):
    lab = make_lab(next(_names))
    backend, client = lab.add_pod("backend"), lab.add_pod("client")
    directory = tmp_path / "manifests"
    publish(directory, backend, node_name="bpfp-node")          # local to the agent's node
    extra = ("--node-ip", f"{lab.node_ip},{lab.node_ip6}") if listen == "node-ips" else ()
    agent = AgentRunner(lab, directory, extra_args=extra)
    try:
        agent.start()
        for address in (lab.node_ip, lab.node_ip6):
            expect(probe_until(client, address, 200), 200, 1)

        publish(directory, backend, node_name="another-node")   # the endpoint moved away
        expect(probe_until(client, lab.node_ip, 503), 503, 0)
        expect(probe(client, lab.node_ip6), 503, 0)

        publish(directory, backend, node_name="bpfp-node")      # and back
        expect(probe_until(client, lab.node_ip, 200), 200, 1)

        manifests.write(directory, "web.yaml")                  # service gone: port closed
        gone = probe_until(client, lab.node_ip, None)
        assert gone["status"] is None and "Connection refused" in str(gone["error"]), gone
        assert "event=health_check_port_failed" not in agent.log(), agent.log()
    finally:
        agent.close()
