"""Ordinary YAML, served as a cluster would serve it: the manifest source allocates cluster
IPs and node ports, applies the API server's defaults and mirrors v1 Endpoints (issue 17).
Real agents, real BPF programs, real traffic between network-namespace pods."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from lab import manifests
from lab.agent_runner import AgentRunner

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def guestbook(leader, follower, frontends) -> list[dict]:
    """The Kubernetes docs' guestbook Services as published (no clusterIP, no nodePort,
    no namespace), with the EndpointSlices the EndpointSlice controller would write."""
    def service(name, labels, port, target=None, **spec):
        return {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "labels": labels},
                "spec": {"ports": [{"port": port, **({"targetPort": target} if target else {})}],
                         "selector": labels, **spec}}

    def slice_for(name, pods, port):
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": f"{name}-abcde",
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4", "ports": [{"name": "", "port": port, "protocol": "TCP"}],
                "endpoints": [{"addresses": [p.ip], "conditions": {"ready": True},
                               "nodeName": "bpfp-node"} for p in pods]}
    return [
        service("redis-leader", {"app": "redis", "role": "leader", "tier": "backend"}, 6379),
        slice_for("redis-leader", [leader], 6379),
        service("redis-follower", {"app": "redis", "role": "follower", "tier": "backend"}, 6379),
        slice_for("redis-follower", [follower], 6379),
        service("frontend", {"app": "guestbook", "tier": "frontend"}, 80, target=8080,
                type="NodePort"),
        slice_for("frontend", frontends, 8080),
    ]


def selectorless(backend) -> list[dict]:
    """The docs' "Services without selectors" example: a Service and hand-written Endpoints,
    dual-stack by policy so it gets an address per family."""
    return [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "my-service"},
             "spec": {"ipFamilyPolicy": "PreferDualStack",
                      "ports": [{"name": "http", "protocol": "TCP", "port": 80,
                                 "targetPort": 9376}]}},
            {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "my-service"},
             "subsets": [{"addresses": [{"ip": backend.ip}, {"ip": backend.ip6}],
                          "ports": [{"name": "http", "port": 9376}]}]}]


def write(directory: Path, name: str, objects: list[dict]) -> None:
    manifests.write(directory, name, *objects)


def frontends(agent, name, kind="ClusterIP") -> dict[str, bool]:
    """address (or port, for NodePort) -> allocated, for the Service's frontends of kind."""
    out = {}
    for port in agent.services():
        if port["name"] == name:
            for f in port["frontends"]:
                if f["kind"] == kind:
                    out[f["address"] if kind == "ClusterIP" else str(f["port"])] = \
                        f.get("allocated", False)
    return out


def status(agent) -> dict:
    return json.loads(agent.cli("status", "--api", agent.api, "-o", "json").stdout)


@pytest.fixture
def node(make_lab, tmp_path):
    lab = make_lab()
    pods = {name: lab.add_pod(name) for name in ("leader", "follower", "web-a", "web-b", "ext")}
    pods["leader"].start_server([6379])
    pods["follower"].start_server([6379])
    for name in ("web-a", "web-b"):
        pods[name].start_server([8080])
    pods["ext"].start_server([9376])
    client = lab.add_pod("client")
    directory = tmp_path / "manifests"
    write(directory, "guestbook.yaml", guestbook(pods["leader"], pods["follower"],
                                                 [pods["web-a"], pods["web-b"]]))
    write(directory, "my-service.yaml", selectorless(pods["ext"]))
    agent = AgentRunner(lab, directory, extra_args=("--service-node-port-range", "30000-30004"))
    try:
        agent.start()
        yield lab, agent, pods, client, directory
    finally:
        agent.close()


def test_published_yaml_is_served_through_allocated_addresses_and_keeps_them(node):
    lab, agent, pods, client, directory = node
    leader = frontends(agent, "redis-leader")
    assert len(leader) == 1 and all(leader.values()), leader      # one, marked allocated
    (leader_ip,) = leader
    assert leader_ip.startswith("10.") and not leader_ip.startswith("10.96.0.")  # above band
    result = client.tcp(leader_ip, 6379, count=20)
    assert result.errors == {} and set(result.answers) == {"leader:6379"}
    web = frontends(agent, "frontend")
    result = client.tcp(next(iter(web)), 80, count=40)
    assert result.errors == {} and set(result.answers) == {"web-a:8080", "web-b:8080"}

    # the selector-less Service: its Endpoints mirrored, one address per family
    mine = frontends(agent, "my-service")
    assert sorted(":" in ip for ip in mine) == [False, True] and all(mine.values())
    for ip in mine:
        result = client.tcp(ip, 80, count=10)
        assert result.errors == {} and set(result.answers) == {"ext:9376"}, (ip, result)

    table = agent.cli("services", "--api", agent.api).stdout
    assert f"{leader_ip}:6379*" in table and "allocated by the agent" in table

    # an edit of the file (a label, the port list reordered) keeps every address
    before = {name: frontends(agent, name) for name in ("redis-leader", "frontend",
                                                        "my-service")}
    objects = guestbook(pods["leader"], pods["follower"], [pods["web-a"], pods["web-b"]])
    objects[0]["metadata"]["labels"]["edited"] = "yes"
    write(directory, "guestbook.yaml", list(reversed(objects)))
    agent.wait_until(lambda: "edited" in open(directory / "guestbook.yaml").read(), "written")
    agent.stop(signal.SIGTERM)
    # ... and so does a restart, with the files renamed (read in another order)
    os.rename(directory / "guestbook.yaml", directory / "z-guestbook.yaml")
    agent.start()
    after = {name: frontends(agent, name) for name in before}
    assert after == before
    result = client.tcp(leader_ip, 6379, count=10)
    assert result.errors == {} and set(result.answers) == {"leader:6379"}


def test_a_file_giving_an_allocated_address_wins_and_conflicts_and_exhaustion_are_said(node):
    lab, agent, pods, client, directory = node
    (taken,) = frontends(agent, "redis-leader")
    # another file gives redis-leader's address explicitly: it wins, redis-leader moves
    taker = manifests.service("taker", taken, [{"name": "", "port": 6379, "protocol": "TCP"}],
                              namespace="default")
    taker_slice = manifests.endpoint_slice("taker", [pods["follower"].ip],
                                           [{"name": "", "port": 6379, "protocol": "TCP"}],
                                           namespace="default")
    write(directory, "taker.yaml", [taker, taker_slice])
    moved = agent.wait_until(lambda: (lambda f: f if f and taken not in f else None)(
        frontends(agent, "redis-leader")), "redis-leader moved")
    (moved_ip,) = moved
    assert frontends(agent, "taker") == {taken: False}             # given, not allocated
    assert set(client.tcp(taken, 6379, count=10).answers) == {"follower:6379"}
    assert set(client.tcp(moved_ip, 6379, count=10).answers) == {"leader:6379"}
    # a second file giving the same address: served as written, and said
    twin = dict(taker, metadata={"name": "twin", "namespace": "default"})
    write(directory, "twin.yaml", [twin])
    agent.wait_until(lambda: any(p["name"] == "twin" and p["served"]
                                 for p in status(agent)["admission_problems"]), "twin said")

    # exhaustion: 5 node ports, the guestbook's frontend holds one; four more fit
    ports = [{"name": "", "port": 80, "protocol": "TCP"}]
    many = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"np{i}"},
             "spec": {"type": "NodePort", "ports": ports}} for i in range(6)]
    write(directory, "many.yaml", many)
    refused = agent.wait_until(lambda: [p for p in status(agent)["admission_problems"]
                                        if not p["served"]], "exhaustion said")
    assert len(refused) == 2 and all("range exhausted" in p["reason"] for p in refused)
    # every one either served (this node has no node IP for NodePorts: its cluster IP) or said
    assert {p["name"] for p in refused} | {n for n in (f"np{i}" for i in range(6))
                                           if frontends(agent, n)} == \
        {f"np{i}" for i in range(6)}
    # the same version read again (rewritten as it was) is not said again
    write(directory, "many.yaml", many)
    agent.wait_until(lambda: status(agent)["errors"].get("source_admission") == 3,
                     "counted: twin + two refused")
    lines = [line for line in agent.log().splitlines() if "service_not_admitted" in line]
    assert len(lines) == 2, lines
    # room freed: one Service fewer, and a refused one is served
    write(directory, "many.yaml", many[1:])
    agent.wait_until(lambda: len([p for p in status(agent)["admission_problems"]
                                  if not p["served"]]) == 1, "one admitted when room freed")


def test_node_port_allocated_alike_on_every_node_and_reachable_from_outside(tmp_path):
    from lab.cluster import Cluster
    directory = tmp_path / "manifests"
    with Cluster(f"cp{os.getpid() % 100000}") as cluster:
        a, b = cluster.add_pod(1, "a"), cluster.add_pod(2, "b")
        for pod in (a, b):
            pod.start_server([8080])
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                   "spec": {"type": "NodePort", "selector": {"app": "web"},
                            "ports": [{"port": 80, "targetPort": 8080}]}}
        slice_ = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                  "metadata": {"name": "web-x1", "labels": {"kubernetes.io/service-name": "web"}},
                  "addressType": "IPv4", "ports": [{"name": "", "port": 8080}],
                  "endpoints": [{"addresses": [p.ip], "nodeName": n}
                                for p, n in ((a, "node1"), (b, "node2"))]}
        directory.mkdir()
        (directory / "web.yaml").write_text(yaml.safe_dump_all([service, slice_]))
        agents = cluster.start_agents(directory)
        node_ports = [frontends(agent, "web", "NodePort") for agent in agents.values()]
        assert node_ports[0] == node_ports[1] and list(node_ports[0].values()) == [True]
        (port,) = node_ports[0]
        assert 30000 <= int(port) <= 32767
        for i in (1, 2):
            result = cluster.external.tcp(cluster.node_ip(i), int(port), count=20)
            assert result.errors == {}, result
            assert result.backends() == {"a", "b"}
