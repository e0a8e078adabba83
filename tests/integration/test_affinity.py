"""ClientIP session affinity through the socket LB, with real traffic: a client (a pod:
its network namespace) sticks to one backend until the timeout; switching affinity on
and off takes effect; unrelated endpoint changes keep it; its backend going away moves it."""
from __future__ import annotations

import time

import pytest

from agent.model.types import Protocol
from lab import manifests
from lab.agent_runner import AgentRunner

pytestmark = pytest.mark.integration

VIPS = {4: "10.96.0.70", 6: "fd00:10:96::70"}
PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
         {"name": "dns", "port": 53, "targetPort": 8080, "protocol": "UDP"}]
SLICE_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"},
               {"name": "dns", "port": 8080, "protocol": "UDP"}]


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def node(make_lab, tmp_path, request):
    lab = make_lab()
    backends = [lab.add_pod(f"backend-{c}") for c in "abcd"]
    for pod in backends:
        pod.start_server([8080], udp=True)
    clients = [lab.add_pod("client-1"), lab.add_pod("client-2")]
    agent = AgentRunner(lab, tmp_path / "manifests")
    family = request.param
    try:
        yield agent, backends, clients, Cluster(tmp_path / "manifests", family)
    finally:
        agent.close()


class Cluster:
    """The manifest directory, and the family the service and its endpoints use."""

    def __init__(self, directory, family: int) -> None:
        self.directory, self.family, self.vip = directory, family, VIPS[family]

    def ip(self, pod) -> str:
        return pod.ip if self.family == 4 else pod.ip6


def publish(cluster, pods, affinity: int | None = 10800) -> None:
    service = manifests.service("web", cluster.vip, PORTS)
    if affinity is not None:
        service["spec"]["sessionAffinity"] = "ClientIP"
        service["spec"]["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity}}
    manifests.write(cluster.directory, "web.yaml", service,
                    manifests.endpoint_slice("web", [cluster.ip(p) for p in pods], SLICE_PORTS))


def applied(agent, cluster, pods, affinity: int | None = 10800) -> bool:
    """The kernel holds web's ports (TCP and UDP) with these backends and this affinity
    timeout (0: none): what publish() asked for."""
    ports = [s for s in agent.kernel_services().values()
             if any(str(f.address) == cluster.vip for f in s.frontends)]
    return {f.protocol for s in ports for f in s.frontends} == {Protocol.TCP, Protocol.UDP} \
        and all({str(b.address) for b in s.backends} == {cluster.ip(p) for p in pods}
                and s.affinity == (affinity or 0) for s in ports)


def sticky(cluster, client, count: int = 20) -> str:
    result = client.tcp(cluster.vip, 80, count=count)
    assert result.errors == {}
    assert len(result.backends()) == 1, f"affinity broken: {dict(result.answers)}"
    return next(iter(result.backends()))


def test_a_client_sticks_to_one_backend_and_follows_changes(node):
    agent, backends, (client, other), cluster = node
    a, b, c, d = backends
    publish(cluster, [a, b, c])
    agent.start()
    mine = sticky(cluster, client)
    sticky(cluster, other)                                        # each client has its own
    udp = client.udp(cluster.vip, 53, count=20)          # a new UDP socket each time
    assert len(udp.backends()) == 1 and udp.wrong_source == 0

    # unrelated changes: another backend leaves, a new one arrives; slots move
    pods = {p.name: p for p in backends}
    unrelated = next(p for p in (a, b, c) if p.name != mine)
    serving = [p for p in (a, b, c) if p is not unrelated] + [d]
    publish(cluster, serving)
    agent.wait_until(lambda: applied(agent, cluster, serving), "unrelated change applied")
    assert sticky(cluster, client) == mine

    # its backend goes away: the client moves, and sticks again
    serving = [p for p in (a, b, c, d) if p.name != mine and p is not unrelated]
    publish(cluster, serving)
    agent.wait_until(lambda: applied(agent, cluster, serving), "its backend removed")
    moved = sticky(cluster, client)
    assert moved != mine and moved in pods

    # affinity off: connections spread again; on: sticky again
    publish(cluster, [a, b, c, d], affinity=None)
    agent.wait_until(lambda: applied(agent, cluster, [a, b, c, d], affinity=None),
                     "affinity off")
    assert len(client.tcp(cluster.vip, 80, count=60).backends()) > 1
    publish(cluster, [a, b, c, d])
    agent.wait_until(lambda: applied(agent, cluster, [a, b, c, d]), "affinity on again")
    sticky(cluster, client)
    listed = [s for s in agent.services() if s["port_name"] == "http"]
    assert listed and len(listed[0]["backends"]) == 4


def test_affinity_ends_after_its_timeout(node):
    agent, backends, (client, _), cluster = node
    publish(cluster, backends[:3], affinity=1)
    agent.start()
    assert applied(agent, cluster, backends[:3], affinity=1)
    first = sticky(cluster, client, count=5)
    for _ in range(12):            # a fresh pick after the timeout: 1/3 stays the same
        time.sleep(1.3)            # the scenario: the 1 s affinity timeout passes (no event)
        if sticky(cluster, client, count=3) != first:
            return
    pytest.fail("the client never left its backend although affinity timed out")
