"""The real agent on the Kubernetes API source (`bpfproxy agent --kubeconfig`), in a lab node,
against tests/kubeapi's server: it converges to the right kernel state, checked with
`bpfproxy services -o json` and real traffic to a ClusterIP, through a dropped stream, a
410 Gone and the server going away (the last good state keeps serving), and it waits,
reporting not synced, while the API refuses its token.

The fake API server runs in this test process, but its listening socket lives in the lab's
node namespace (tests/kubeapi.listen_in_netns: made by a thread that entered the namespace),
on that namespace's 127.0.0.1: the agent, which runs there, reaches it as a kubeconfig says,
and nothing listens on the host."""
from __future__ import annotations

import copy
import itertools
import os
import subprocess
from pathlib import Path

import pytest

from lab import manifests, netns
from lab.agent_runner import BPFPROXY, AgentRunner
from tests.helpers import wait_for
from tests.kubeapi import FakeKubeApi, listen_in_netns, node

pytestmark = pytest.mark.integration

VIP = "10.96.0.10"
PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
SLICE_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"}]
NODE = "bpfp-node"
_names = (f"k7{os.getpid() % 100000:x}x{n}" for n in itertools.count(1))


class KubeAgentRunner(AgentRunner):
    """AgentRunner with the Kubernetes source: --kubeconfig instead of --manifests."""

    def __init__(self, lab, kubeconfig: Path) -> None:
        super().__init__(lab, kubeconfig)
        self.kubeconfig = kubeconfig

    def start(self, wait: float = 60.0) -> None:
        log = open(self.log_path, "a")
        self.process = self.lab.node_popen(
            [*BPFPROXY, "--log-level", "debug", "agent", "--kubeconfig", str(self.kubeconfig),
             "--cgroup", str(self.lab.cgroup), "--bpffs", str(self.bpffs), "--api", self.api,
             "--node-name", NODE, "--min-sync-period", "0.05"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if wait:
            self.wait_synced(wait)

    def backends(self, name: str = "web") -> set[str]:
        return {b["address"] for s in self.services() if s["name"] == name
                for b in s["backends"]}


def web_slice(*pods) -> dict:
    return copy.deepcopy(manifests.endpoint_slice("web", [p.ip for p in pods], SLICE_PORTS,
                                                  node_name=NODE))


def answered_by(client, count: int = 60) -> set[str]:
    result = client.tcp(VIP, 80, count=count)
    assert result.errors == {}, result.errors
    return result.backends()


@pytest.fixture
def world(make_lab, tmp_path):
    """A node with backends a, b, c and a client; the API server in the node namespace
    serving `web` at VIP from a and b; the agent started on it."""
    lab = make_lab(next(_names))
    backends = [lab.add_pod(f"backend-{c}") for c in "abc"]
    for pod in backends:
        pod.start_server([8080])
    client = lab.add_pod("client")
    api = FakeKubeApi(listen=listen_in_netns(netns.path(lab.node_netns)))
    api.start()
    api.put(manifests.service("web", VIP, PORTS), web_slice(*backends[:2]),
            node(NODE, [lab.node_ip]))
    agent = KubeAgentRunner(lab, api.write_kubeconfig(tmp_path / "kubeconfig"))
    try:
        yield lab, api, agent, backends, client
    finally:
        agent.close()
        api.stop()


def test_the_agent_converges_through_drops_gone_and_an_outage(world):
    lab, api, agent, (a, b, c), client = world
    agent.start()
    status = agent.cli("status", "--api", agent.api)
    assert f"kube:{api.url}" in status.stdout
    assert agent.backends() == {a.ip, b.ip}
    assert answered_by(client) == {a.name, b.name}

    # a change through the watch
    api.put(web_slice(a, b, c))
    wait_for(lambda: agent.backends() == {a.ip, b.ip, c.ip}, "c added", timeout=30.0)
    assert answered_by(client, 90) == {a.name, b.name, c.name}

    # a dropped stream: resumed from the last version, no list
    lists_before = [r for r in api.requests if not r.watch]
    api.drop_connections()
    api.put(web_slice(b, c))
    wait_for(lambda: agent.backends() == {b.ip, c.ip}, "a removed after the drop", timeout=30.0)
    assert [r for r in api.requests if not r.watch] == lists_before
    assert answered_by(client) == {b.name, c.name}

    # 410 Gone: every resource lists again and only the difference reaches the kernel
    api.expire_watches()
    wait_for(lambda: len([r for r in api.requests if not r.watch]) >= len(lists_before) + 3,
             "three relists", timeout=30.0)
    api.put(web_slice(a, c))
    wait_for(lambda: agent.backends() == {a.ip, c.ip}, "the change after the relist", timeout=30.0)
    assert answered_by(client) == {a.name, c.name}
    assert "event=kube_relist resource=Service reason=gone" in agent.log()

    # the API server goes away: the last good state keeps serving
    api.stop()
    wait_for(lambda: "event=kube_api_unreachable" in agent.log(), "the agent noticing",
             timeout=30.0)
    assert agent.process.poll() is None
    assert agent.backends() == {a.ip, c.ip}
    assert answered_by(client) == {a.name, c.name}
    # ...and what changed meanwhile arrives when it is back
    api.put(web_slice(b))
    api.start()
    wait_for(lambda: agent.backends() == {b.ip}, "the change made while away", 60.0)
    assert answered_by(client) == {b.name}

    # the service deleted: its ClusterIP is gone from the kernel
    api.delete("Service", "web", "lab")
    wait_for(lambda: not any(s["name"] == "web" for s in agent.services()), "web deleted",
             timeout=30.0)
    assert client.tcp(VIP, 80, count=3).answers == {}


def test_the_agent_waits_not_synced_while_the_api_refuses_it(world):
    lab, api, agent, (a, b, _), client = world
    api.token = "rotated"                 # the agent's kubeconfig token is now wrong
    agent.start(wait=0)
    wait_for(lambda: "event=kube_api_error resource=Service status=401" in agent.log(),
             "the 401 reported", 60.0)
    not_synced = agent.cli("status", "--api", agent.api, check=False)
    assert not_synced.returncode == 1 and agent.process.poll() is None
    assert client.tcp(VIP, 80, count=3).answers == {}      # nothing programmed yet
    api.token = "bpfp-test-token"         # the operator fixes it
    agent.wait_synced(60.0)
    assert answered_by(client) == {a.name, b.name}
