"""Traffic from outside on a bare-metal style node: its uplink is a port of the pod bridge,
and that bridge is the agent's --interfaces. The route to a pod there leaves through an
interface the TC programs serve, yet the pod is on this node: whether a flow is SNATed
comes from the model (the backend slot's BPFP_BE_LOCAL), not from the route."""
from __future__ import annotations

import os
from collections import Counter

import pytest

from lab import manifests

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
MODES = pytest.mark.parametrize("mode", ["tcp", "udp"])
CLUSTER_IPS = {"web": ("10.96.0.50", "fd00:10:96::50"), "local": ("10.96.0.51", "fd00:10:96::51")}
NODE_PORTS = {"web": (30090, 30091), "local": (30092, 30093)}     # (TCP, UDP)
ENDPOINT_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "dns", "port": 8080, "protocol": "UDP"}]


def write_service(directory, name, pods, **kw):
    """A dual-stack NodePort service on the pods, each endpoint with its pod's nodeName."""
    http, dns = NODE_PORTS[name]
    ports = [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": http, "protocol": "TCP"},
             {"name": "dns", "port": 53, "targetPort": 8080, "nodePort": dns, "protocol": "UDP"}]
    objects = [manifests.service(name, CLUSTER_IPS[name], ports, service_type="NodePort", **kw)]
    for family in (4, 6):
        addresses = [p.ip if family == 4 else p.ip6 for p in pods]
        nodes = {(p.ip if family == 4 else p.ip6): f"node{p.lab.name[-1]}" for p in pods}
        objects.append(manifests.endpoint_slice(name, addresses, ENDPOINT_PORTS,
                                                name=f"{name}-v{family}", nodes=nodes))
    manifests.write(directory, f"{name}.yaml", *objects)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Node 1 bridged (eth0 in bpfp-br0 with its pods; --interfaces bpfp-br0), node 2 as
    usual. Pod a on node 1 and pod b on node 2 answer with the client address they saw."""
    from lab.cluster import Cluster
    directory = tmp_path_factory.mktemp("manifests")
    with Cluster(f"br{os.getpid() % 100000}", bridged={1}) as cluster:
        a, b = cluster.add_pod(1, "a"), cluster.add_pod(2, "b")
        for pod in (a, b):
            pod.start_server([8080], udp=True, peer=True)
        write_service(directory, "web", [a, b])
        write_service(directory, "local", [a], external_traffic_policy="Local")
        cluster.start_agents(directory)
        yield cluster, a, b


def who(result) -> Counter:
    """answers 'pod:port@client' -> Counter of (pod, client address)."""
    out = Counter()
    for answer, n in result.answers.items():
        server, _, client = answer.partition("@")
        out[server.split(":")[0], client] += n
    return out


def ask(cluster, service: str, mode: str, family: int, count: int):
    port = NODE_PORTS[service][0 if mode == "tcp" else 1]
    result = cluster.external.start_client(mode, cluster.node_ip(1, family), port,
                                           count=count).result()
    assert result.errors == {}, result
    assert result.wrong_source == 0 and result.wrong_peer == 0
    return who(result)


def client_ip(cluster, family: int) -> str:
    return cluster.external.ip if family == 4 else cluster.external.ip6


def test_the_lab_node_is_bridged(world):
    cluster, _, _ = world
    links = cluster.nodes[1].node_run(["ip", "-o", "link", "show", "master", "bpfp-br0"],
                                      check=True).stdout
    assert " eth0@" in links
    addresses = cluster.nodes[1].node_run(["ip", "-o", "addr", "show", "dev", "bpfp-br0"],
                                          check=True).stdout
    assert f" {cluster.node_ip(1, 4)}/24 " in addresses
    assert f" {cluster.node_ip(1, 6)}/64 " in addresses


@FAMILIES
@MODES
def test_local_policy_keeps_the_client_address_on_a_bridged_node(world, mode, family):
    cluster, _, _ = world
    client = client_ip(cluster, family)
    assert ask(cluster, "local", mode, family, 20) == Counter({("a", client): 20})


@FAMILIES
@MODES
def test_cluster_policy_snats_only_the_remote_backend_on_a_bridged_node(world, mode, family):
    cluster, _, _ = world
    seen = ask(cluster, "web", mode, family, 60)
    # a shares node 1's bridge with the uplink and sees the client; b on node 2 sees node 1
    assert set(seen) == {("a", client_ip(cluster, family)), ("b", cluster.node_ip(1, family))}


def set_slot_flags(pin_dir, flags: int) -> int:
    """Every backend slot's flags set as an agent that knew none would have left them (0);
    returns how many slots had BPFP_BE_LOCAL."""
    from agent.datapath import layout
    from agent.datapath.maps import BpfServiceMaps
    from agent.planner import BE_LOCAL
    maps = BpfServiceMaps(pin_dir)
    try:
        was_local = 0
        for family, table in maps.slots.items():
            keys, values = [], []
            for key, value in table.items():
                was_local += bool(value.flags & BE_LOCAL)
                keys.append(layout.SlotKey.from_buffer_copy(key))
                backend = layout.Backend4 if family == 4 else layout.Backend6
                copy = backend.from_buffer_copy(value)
                copy.flags = flags
                values.append(copy)
            table.update(keys, values)
        return was_local
    finally:
        maps.close()


def local_backends(pin_dir) -> set[str]:
    from agent.datapath.maps import BpfServiceMaps
    maps = BpfServiceMaps(pin_dir)
    try:
        return {str(b.address) for s in maps.read_back().values() for b in s.local}
    finally:
        maps.close()


@FAMILIES
def test_a_restarted_agent_rewrites_slots_left_without_the_local_flag(world, family):
    """An older agent's slots carry 0 where the flag is (the field was padding): the new
    programs then SNAT every flow to them, and a restarted agent reads the flags back and
    rewrites the slots that are wrong."""
    cluster, a, _ = world
    agent = cluster.agents[1]
    pin_dir = agent.bpffs
    assert local_backends(pin_dir) == {a.ip, a.ip6}, "node 1's agent marks its own pod only"
    assert agent.stop() == 0                      # programs and maps stay
    try:
        assert set_slot_flags(pin_dir, 0) > 0
        node1 = cluster.node_ip(1, family)
        assert ask(cluster, "local", "tcp", family, 5) == Counter({("a", node1): 5})
    finally:
        agent.start()
    assert local_backends(pin_dir) == {a.ip, a.ip6}
    client = client_ip(cluster, family)
    assert ask(cluster, "local", "tcp", family, 5) == Counter({("a", client): 5})
