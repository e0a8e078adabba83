"""Traffic from outside the node, through the TC programs (and, as a second run, with the
XDP program of --acceleration native in front of them), on a two-node lab with an agent per
node: NodePort, ExternalIP and LoadBalancer addresses, both traffic policies, conntrack,
source ranges, affinity, hairpin, over TCP and UDP, IPv4 and IPv6. A third world runs the
agents with --nodeport-mode dsr: the tests where a remote backend's flow differs by mode,
and direct server return's own (the reply bypassing the entry node, MTU both ways, hybrid,
XDP, restart, cleanup)."""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections import Counter

import pytest

from lab import manifests, netns
from lab.podclient import ClientResult

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
MODES = pytest.mark.parametrize("mode", ["tcp", "udp"])
CLUSTER_IPS = {"web": ("10.96.0.10", "fd00:10:96::10"), "local": ("10.96.0.11", "fd00:10:96::11"),
               "lb": ("10.96.0.12", "fd00:10:96::12"), "sticky": ("10.96.0.13", "fd00:10:96::13"),
               "lblocal": ("10.96.0.15", "fd00:10:96::15"), "far": ("10.96.0.17", "fd00:10:96::17")}
FAR = (30085, 30059)        # NodePorts (TCP, UDP) of `far`, whose only backend is b (node 2)
LB_IPS = ("192.0.2.10", "2001:db8::10")          # the load balancer's addresses, routed to node 1
EXTERNAL_IPS = ("192.0.2.20", "2001:db8::20")
FAR_IPS = ("192.0.2.40", "2001:db8::40")         # `far`'s external IPs, routed to node 1


def ports(http: int, dns: int) -> list[dict]:
    return [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": http, "protocol": "TCP"},
            {"name": "dns", "port": 53, "targetPort": 8080, "nodePort": dns, "protocol": "UDP"}]


ENDPOINT_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "dns", "port": 8080, "protocol": "UDP"}]


def write_service(directory, name, pods, service_type="NodePort", node_ports=(30080, 30053),
                  **kw):
    """A dual-stack service on the pods (name -> Pod, each on its node)."""
    objects = [manifests.service(name, CLUSTER_IPS[name], ports(*node_ports),
                                 service_type=service_type, **kw)]
    for family in (4, 6):
        addresses = [p.ip if family == 4 else p.ip6 for p in pods]
        nodes = {(p.ip if family == 4 else p.ip6): f"node{p.lab.name[-1]}" for p in pods}
        objects.append(manifests.endpoint_slice(name, addresses, ENDPOINT_PORTS,
                                                name=f"{name}-v{family}", nodes=nodes))
    manifests.write(directory, f"{name}.yaml", *objects)


def route(namespace: str, family: int, prefix: str, via: str) -> None:
    """The outside world's route for a load balancer's (or external IP's) address."""
    netns.ip(*(["-6"] if family == 6 else []), "route", "replace", prefix, "via", via,
             netns=namespace)


def eventually(check, timeout: float = 10.0):
    """check() until it returns something true (an agent applies a change within ~0.1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


# The worlds: the TC programs alone, with --acceleration native (the XDP program in front
# of them), and with --nodeport-mode dsr (TC). Every test runs in the first two; the tests
# where a remote backend's flow differs by mode run in the third too (ALL_MODES), and the
# direct server return ones there alone (DSR): pytest keeps each world for its tests.
WORLDS = {"tc": ("--acceleration", "disabled"), "xdp": ("--acceleration", "native"),
          "dsr": ("--nodeport-mode", "dsr")}
ALL_MODES = pytest.mark.parametrize("world", ["tc", "xdp", "dsr"], indirect=True)
DSR = pytest.mark.parametrize("world", ["dsr"], indirect=True)


def dsr(cluster) -> bool:
    """Whether the world's agents run --nodeport-mode dsr."""
    return "dsr" in cluster.agents[1].extra_args


@pytest.fixture(scope="module", params=["tc", "xdp"])
def world(tmp_path_factory, request):
    """Two nodes with an agent each; pod a on node 1 and pod b on node 2 answer on 8080
    (TCP and UDP, with the client address they saw). Every test runs twice: with the TC
    programs alone, and with --acceleration native (the XDP program in front of them);
    some in a third world, --nodeport-mode dsr (WORLDS)."""
    from lab.cluster import Cluster
    directory = tmp_path_factory.mktemp("manifests")
    with Cluster(f"np{os.getpid() % 100000}") as cluster:
        a, b = cluster.add_pod(1, "a"), cluster.add_pod(2, "b")
        for pod in (a, b):
            pod.start_server([8080], udp=True, peer=True)
        write_service(directory, "web", [a, b])
        write_service(directory, "local", [a], node_ports=(30081, 30054),
                      external_traffic_policy="Local")
        write_service(directory, "lb", [a, b], service_type="LoadBalancer",
                      node_ports=(30082, 30055), load_balancer_ingress=LB_IPS,
                      external_ips=EXTERNAL_IPS,
                      load_balancer_source_ranges=["172.30.0.100/32", "fd00:172:30::100/128"])
        write_service(directory, "sticky", [a, b], node_ports=(30083, 30056),
                      session_affinity_timeout=60)
        write_service(directory, "lblocal", [a], service_type="LoadBalancer",
                      node_ports=(30084, 30057), load_balancer_ingress=("192.0.2.30",),
                      external_traffic_policy="Local", health_check_node_port=32100)
        write_service(directory, "far", [b], node_ports=FAR, external_ips=FAR_IPS)
        for prefix, family in zip((*LB_IPS, *EXTERNAL_IPS, *FAR_IPS), (4, 6) * 3, strict=True):
            route(cluster.external_netns, family, prefix, cluster.node_ip(1, family))
        if request.param == "xdp":
            cluster.prepare_for_xdp()
        cluster.start_agents(directory, extra_args=WORLDS[request.param])
        yield cluster, a, b, directory


def who(result) -> Counter:
    """answers 'pod:port@client' -> Counter of (pod, client address)."""
    out = Counter()
    for answer, n in result.answers.items():
        server, _, client = answer.partition("@")
        out[server.split(":")[0], client] += n
    return out


@ALL_MODES
@FAMILIES
@MODES
def test_cluster_policy_reaches_backends_on_both_nodes_with_snat_for_the_remote_one(
        world, mode, family):
    cluster, a, b, _ = world
    port = 30080 if mode == "tcp" else 30053
    result = cluster.external.start_client(mode, cluster.node_ip(1, family), port,
                                           count=60).result()
    assert result.errors == {}
    assert result.wrong_source == 0 and result.wrong_peer == 0
    seen = who(result)
    client, node1 = cluster.external.ip if family == 4 else cluster.external.ip6, \
        cluster.node_ip(1, family)
    # a is local to node 1: it sees the client; b on node 2 sees node 1 (SNAT), or the
    # client too with direct server return
    assert set(seen) == {("a", client), ("b", client if dsr(cluster) else node1)}, seen


@ALL_MODES
@FAMILIES
def test_through_the_other_node_too(world, family):
    cluster, a, b, _ = world
    result = cluster.external.tcp(cluster.node_ip(2, family), 30080, count=40)
    assert result.errors == {}
    node2 = cluster.node_ip(2, family)
    client = cluster.external.ip if family == 4 else cluster.external.ip6
    assert set(who(result)) == {("a", client if dsr(cluster) else node2), ("b", client)}


@FAMILIES
@MODES
def test_local_policy_keeps_the_client_address_and_only_local_backends(world, mode, family):
    cluster, a, _, _ = world
    port = 30081 if mode == "tcp" else 30054
    client = cluster.external.ip if family == 4 else cluster.external.ip6
    result = cluster.external.start_client(mode, cluster.node_ip(1, family), port,
                                           count=20).result()
    assert result.errors == {} and who(result) == Counter({("a", client): 20})
    # node 2 has no endpoint of it: dropped (kube-proxy DROPs too), so the client times out
    result = cluster.external.start_client(mode, cluster.node_ip(2, family), port, count=2,
                                           timeout=0.5).result()
    assert result.answers == {} and sum(result.errors.values()) == 2, result


@ALL_MODES
@FAMILIES
def test_load_balancer_and_external_ips_within_source_ranges(world, family):
    cluster, _, _, _ = world
    for address in (LB_IPS[family == 6], EXTERNAL_IPS[family == 6]):
        for mode, port in (("tcp", 80), ("udp", 53)):
            result = cluster.external.start_client(mode, address, port, count=20).result()
            assert result.errors == {}, (address, mode, result.errors)
            assert {pod for pod, _ in who(result)} == {"a", "b"}
            assert result.wrong_source == 0


def test_source_ranges_drop_other_sources_on_the_load_balancer_address_only(world):
    cluster, a, b, directory = world
    # the ranges no longer hold the client
    write_service(directory, "lb", [a, b], service_type="LoadBalancer",
                  node_ports=(30082, 30055), load_balancer_ingress=LB_IPS,
                  external_ips=EXTERNAL_IPS,
                  load_balancer_source_ranges=["198.51.100.0/24", "2001:db8:1::/48"])
    try:
        for family in (4, 6):
            lb, external_ip = LB_IPS[family == 6], EXTERNAL_IPS[family == 6]
            refused = eventually(lambda lb=lb: (r := cluster.external.start_client(
                "tcp", lb, 80, count=1, timeout=0.3).result()).answers == {} and r)
            assert refused and sum(refused.errors.values()) == 1, refused
            # kube-proxy filters LoadBalancer addresses only: the ExternalIP still answers,
            # and so does the NodePort
            for address, port in ((external_ip, 80), (cluster.node_ip(1, family), 30082)):
                allowed = cluster.external.tcp(address, port, count=3)
                assert allowed.errors == {}, (address, allowed)
    finally:
        write_service(directory, "lb", [a, b], service_type="LoadBalancer",
                      node_ports=(30082, 30055), load_balancer_ingress=LB_IPS,
                      external_ips=EXTERNAL_IPS,
                      load_balancer_source_ranges=["172.30.0.100/32", "fd00:172:30::100/128"])
    assert eventually(lambda: cluster.external.tcp(LB_IPS[0], 80, count=1).errors == {})


@ALL_MODES
@FAMILIES
def test_conntrack_keeps_a_flow_on_its_backend(world, family):
    cluster, _, _, _ = world
    result = cluster.external.udp_one_socket(cluster.node_ip(1, family), 30053, count=30)
    assert result.errors == {} and len(who(result)) == 1, who(result)


@FAMILIES
def test_client_ip_affinity_from_outside(world, family):
    cluster, _, _, _ = world
    seen = Counter()
    for _ in range(3):
        seen += who(cluster.external.tcp(cluster.node_ip(1, family), 30083, count=10))
    assert len({pod for pod, _ in seen}) == 1, seen


@FAMILIES
def test_a_pod_reaches_its_own_service_through_the_node_address(world, family):
    """Hairpin: pod a, the only backend of `local`, through node 1's address."""
    cluster, a, _, _ = world
    result = a.tcp(cluster.node_ip(1, family), 30081, count=5)
    assert result.errors == {} and {pod for pod, _ in who(result)} == {"a"}


def test_other_ports_of_the_node_pass(world):
    cluster, _, _, _ = world
    host = cluster.node_host(1)
    host.start_server([8090], udp=True)
    for family in (4, 6):
        result = cluster.external.tcp(cluster.node_ip(1, family), 8090, count=3)
        assert result.errors == {} and result.answers == {"node1:8090": 3}


def read_flows(agent, proto: int):
    from agent.datapath.maps import BpfServiceMaps
    maps = BpfServiceMaps(agent.bpffs)
    try:
        return [(k, v) for k, v in maps.flows() if k.proto == proto]
    finally:
        maps.close()


@FAMILIES
def test_an_established_flow_keeps_its_backend_while_backends_change(world, family):
    cluster, a, b, directory = world
    c = cluster.add_pod(1, f"c{family}")
    c.start_server([8080], udp=True, peer=True)
    flow = cluster.external.start_client("udp-one-socket", cluster.node_ip(1, family), 30053,
                                         count=40, interval=0.05)
    time.sleep(0.5)
    write_service(directory, "web", [a, b, c])          # a backend joins mid-flow
    try:
        seen = who(flow.result())
        assert flow.result().errors == {} and len(seen) == 1, seen
        # ... and new flows do reach it
        fresh = eventually(lambda: any(pod.startswith("c") for pod, _ in who(
            cluster.external.udp(cluster.node_ip(1, family), 30053, count=30))))
        assert fresh
    finally:
        write_service(directory, "web", [a, b])
        cluster.nodes[1].remove_pod(c)


@ALL_MODES
@FAMILIES
def test_a_flow_whose_backend_is_removed_moves_on(world, family):
    """UDP to a backend that left: the agent forgets the flow (kube-proxy clears its
    conntrack entries), and the next datagram goes to a backend that is there."""
    cluster, a, b, directory = world
    write_service(directory, "sticky", [b], node_ports=(30083, 30056))   # no affinity now
    try:
        b_sees = cluster.external.ip if family == 4 else cluster.external.ip6
        b_sees = b_sees if dsr(cluster) else cluster.node_ip(1, family)
        assert eventually(lambda: set(who(cluster.external.udp(
            cluster.node_ip(1, family), 30056, count=3))) <= {("b", b_sees)})
        flow = cluster.external.start_client("udp-one-socket", cluster.node_ip(1, family),
                                             30056, count=10**6, interval=0.05, duration=60,
                                             timeline=True, until_stopped=True)
        flow.wait_started()
        node1 = cluster.agents[1]
        forgotten = node1.log().count("event=flows_forgotten")
        write_service(directory, "sticky", [a], node_ports=(30083, 30056))
        # the sync that removed b forgets b's flows after it: the client's next datagram
        # (the last one begins after stop()) picks again, and finds a
        node1.wait_until(lambda: node1.log().count("event=flows_forgotten") > forgotten,
                         "the flows to b forgotten")
        result = flow.stop()
        order = [answer.split(":")[0] for _, answer in result.timeline]
        # b first, then a; once a answered, never b again
        assert order[0] == "b" and order[-1] == "a", order
        assert "b" not in order[order.index("a"):], order
        # b's answer to a datagram in flight when its flow was forgotten finds no flow to
        # translate it back, as after kube-proxy's conntrack flush: at most that one is lost,
        # right at the switch
        lost = [i for i, what in enumerate(order) if what not in ("a", "b")]
        assert result.errors in ({}, {"timeout": 1}), result.errors
        assert all(order[i - 1] == "b" and order[i + 1] == "a" for i in lost), order
    finally:
        write_service(directory, "sticky", [a, b], node_ports=(30083, 30056),
                      session_affinity_timeout=60)
        write_service(directory, "lblocal", [a], service_type="LoadBalancer",
                      node_ports=(30084, 30057), load_balancer_ingress=("192.0.2.30",),
                      external_traffic_policy="Local", health_check_node_port=32100)


@ALL_MODES
def test_flow_lifetimes_follow_protocol_and_tcp_state(world):
    cluster, _, _, _ = world
    agent = cluster.agents[1]
    assert cluster.external.tcp(cluster.node_ip(1, 4), 30080, count=3).errors == {}
    assert cluster.external.udp(cluster.node_ip(1, 4), 30053, count=3).errors == {}
    now = time.monotonic_ns()              # bpf_ktime_get_ns() is CLOCK_MONOTONIC
    client = bytes(map(int, cluster.external.ip.split(".")))
    closed = [(k, v) for k, v in read_flows(agent, 6)
              if client in (bytes(k.saddr)[:4], bytes(k.daddr)[:4])]
    assert closed
    # each connection ended with FIN both ways: the short close timeout (10 s) applies;
    # a SNATed one the backend closed first keeps its port through the backend's TIME_WAIT
    # (60 s). Earlier tests' entries may be past their time (gone at the next sweep).
    from agent.datapath import layout
    held = layout.CT_SNAT | layout.CT_TIME_WAIT
    for _, v in closed:
        limit = 60 if v.flags & held == held else 10
        assert v.flags & layout.CT_CLOSING and v.expires - now <= limit * 10**9, \
            (v.flags, v.expires - now)
    assert any(v.expires > now for _, v in closed)      # ours, from just now
    # UDP flows just used: the UDP lifetime (60 s) from their last datagram
    udp = [v for k, v in read_flows(agent, 17) if client in (bytes(k.saddr)[:4],
                                                              bytes(k.daddr)[:4])]
    left = sorted(v.expires - now for v in udp)
    assert left and left[-1] <= 60 * 10**9 and left[-1] > 50 * 10**9, left


@ALL_MODES
@FAMILIES
def test_from_a_pod_on_another_node(world, family):
    """Pod b on node 2 dials node 1's NodePort: its packets cross the wire into node 1's TC
    program; a (local there) sees b's address, b itself comes back SNATed to node 1 (also
    with direct server return: b's reply to itself would never leave node 2)."""
    cluster, a, b, _ = world
    result = b.tcp(cluster.node_ip(1, family), 30080, count=40)
    assert result.errors == {} and result.wrong_peer == 0
    b_address = b.ip if family == 4 else b.ip6
    assert set(who(result)) == {("a", b_address), ("b", cluster.node_ip(1, family))}


@FAMILIES
def test_from_the_node_itself(world, family):
    """A process on node 1 (in the cgroup the agent serves: the whole host, in a cluster)
    reaches its own NodePort through the socket LB: both backends, no TC path needed."""
    cluster, _, _, _ = world
    node = cluster.nodes[1]
    argv = [sys.executable, "-m", "lab.podclient", "tcp", cluster.node_ip(1, family), "30080",
            "--count", "30", "--timeout", "1"]
    done = node.processes.run(argv, node.node_netns, node.cgroup, "", 60, True)
    result = ClientResult.from_json(done.stdout)
    assert result.errors == {} and {pod for pod, _ in who(result)} == {"a", "b"}


def test_connections_to_a_terminating_backend_are_kept(world):
    """TCP from outside to a backend marked terminating: its established connections keep
    working (their conntrack entries stay), new ones go elsewhere."""
    from tests import reliability_traffic
    cluster, a, b, directory = world
    for pod in (a, b):
        reliability_traffic.start_server(pod, 9090)
    port = [{"name": "hold", "port": 90, "targetPort": 9090, "nodePort": 30090,
             "protocol": "TCP"}]
    eps = [{"name": "hold", "port": 9090, "protocol": "TCP"}]

    def publish(terminating: bool) -> None:
        slice_ = manifests.endpoint_slice("hold", [a.ip, b.ip], eps, name="hold-v4",
                                          nodes={a.ip: "node1", b.ip: "node2"})
        if terminating:
            slice_["endpoints"][1]["conditions"] = {"ready": False, "serving": True,
                                                    "terminating": True}
        manifests.write(directory, "hold.yaml", manifests.service(
            "hold", "10.96.0.14", port, service_type="NodePort"), slice_)

    publish(terminating=False)
    time.sleep(0.5)
    held = reliability_traffic.start_hold(cluster.external, cluster.node_ip(1, 4), 30090,
                                          connections=10, duration=5.0)
    time.sleep(1.5)
    publish(terminating=True)
    time.sleep(0.5)
    fresh = reliability_traffic.start_hold(cluster.external, cluster.node_ip(1, 4), 30090,
                                           connections=10, duration=1.0).result()
    conns = held.result()["connections"]
    assert {c["backend"] for c in conns} == {"a", "b"}, conns     # both were in use
    assert all(c["error"] is None and c["wrong_answers"] == 0 for c in conns), conns
    assert {c["backend"] for c in fresh["connections"]} == {"a"}, fresh


# GET http://ADDR:PORT/ from the client; prints the status and the body.
HTTP_GET = """
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(f"http://{sys.argv[1]}:{sys.argv[2]}/", timeout=3) as r:
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
"""


@FAMILIES
def test_health_check_node_port_tells_the_load_balancer_which_nodes_serve(world, family):
    """externalTrafficPolicy Local: node 1 has the endpoint (200), node 2 none (503), as
    kube-proxy's health check server answers a cloud load balancer."""
    cluster, _, _, _ = world
    answers = {}
    for node in (1, 2):
        address = cluster.node_ip(node, family)
        host = f"[{address}]" if family == 6 else address
        done = cluster.external.run([sys.executable, "-c", HTTP_GET, host, "32100"])
        status, _, body = done.stdout.partition(" ")
        answers[node] = (int(status), json.loads(body)["localEndpoints"])
    assert answers == {1: (200, 1), 2: (503, 0)}


# A connected UDP socket with path MTU discovery on: sends one datagram of SIZE bytes
# (don't fragment), waits for the network to answer, prints the path MTU the kernel learnt.
PMTU = """
import socket, sys, time
addr, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
v6 = ":" in addr
sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
if v6:
    sock.setsockopt(socket.IPPROTO_IPV6, 23, 2)        # IPV6_MTU_DISCOVER = IPV6_PMTUDISC_DO
else:
    sock.setsockopt(socket.IPPROTO_IP, 10, 2)          # IP_MTU_DISCOVER = IP_PMTUDISC_DO
sock.connect((addr, port))
try:
    sock.send(b"x" * size)
except OSError:
    pass
time.sleep(0.5)
print(sock.getsockopt(socket.IPPROTO_IPV6, 24) if v6 else           # IPV6_MTU
      sock.getsockopt(socket.IPPROTO_IP, 14))              # IP_MTU
"""


@FAMILIES
def test_path_mtu_errors_reach_the_client_in_its_own_terms(world, family):
    """Node 1 forwards to its pod a over a link with a smaller MTU: its "fragmentation
    needed" / "packet too big" quotes the DNATed datagram; the TC program rewrites the
    quote to what the client sent (to the NodePort), so the client's socket learns."""
    cluster, a, _, _ = world
    ns = cluster.nodes[1].node_netns
    pod = a.ip if family == 4 else a.ip6
    v6 = ["-6"] if family == 6 else []
    netns.ip(*v6, "route", "add", pod, "dev", "bpfp-br0", "mtu", "1280", netns=ns)
    try:
        done = cluster.external.run([sys.executable, "-c", PMTU, cluster.node_ip(1, family),
                                     "30054", "1400"])
        assert done.returncode == 0, done.stderr
        assert int(done.stdout) == 1280, done.stdout     # learnt from the rewritten error
    finally:
        netns.ip(*v6, "route", "del", pod, "dev", "bpfp-br0", netns=ns)


# A connected UDP socket to ADDR PORT where nothing listens behind the service: prints how
# the send ended, and the source of the ICMP error that came back (a raw ICMP socket).
REFUSED = """
import socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
v6 = ":" in addr
family = socket.AF_INET6 if v6 else socket.AF_INET
raw = socket.socket(family, socket.SOCK_RAW, 58 if v6 else socket.IPPROTO_ICMP)
raw.settimeout(2)
sock = socket.socket(family, socket.SOCK_DGRAM)
sock.settimeout(2)
sock.connect((addr, port))
sock.send(b"anyone?")
try:
    sock.recv(100)
    print("answered")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
while True:
    data, source = raw.recvfrom(2048)
    kind = data[0] if v6 else data[(data[0] & 15) * 4]
    if kind == (1 if v6 else 3):
        print(source[0])
        break
"""


@FAMILIES
def test_a_backends_port_unreachable_reaches_the_client_from_the_service_address(
        world, family):
    """The pod answers "port unreachable": the client's socket is refused (the quote is
    rewritten to what it sent), and the error comes from the address it dialled, not from
    the pod (kube-proxy's conntrack rewrites the outer source too)."""
    cluster, a, _, directory = world
    port = [{"name": "closed", "port": 7, "targetPort": 9999, "nodePort": 30058,
             "protocol": "UDP"}]
    eps = [{"name": "closed", "port": 9999, "protocol": "UDP"}]
    manifests.write(directory, "closed.yaml", manifests.service(
        "closed", ("10.96.0.16", "fd00:10:96::16"), port, service_type="NodePort",
        external_traffic_policy="Local"),
        manifests.endpoint_slice("closed", [a.ip], eps, name="closed-v4", node_name="node1"),
        manifests.endpoint_slice("closed", [a.ip6], eps, name="closed-v6", node_name="node1"))
    try:
        node = cluster.node_ip(1, family)
        done = eventually(lambda: (d := cluster.external.run(
            [sys.executable, "-c", REFUSED, node, "30058"])).stdout.startswith("refused") and d)
        assert done, "the client's socket never saw the refusal"
        assert done.stdout.split() == ["refused", node], done.stdout
    finally:
        (directory / "closed.yaml").unlink()


# --- direct server return (--nodeport-mode dsr|hybrid) -------------------------------------

def link_counts(namespace: str, ifname: str = "eth0") -> tuple[int, int]:
    """(received, sent) packets of an interface."""
    stats = json.loads(netns.ip("-j", "-s", "link", "show", ifname, netns=namespace))[0]
    return stats["stats64"]["rx"]["packets"], stats["stats64"]["tx"]["packets"]


@DSR
@FAMILIES
def test_direct_server_return_replies_bypass_the_entry_node(world, family):
    """Pod b on node 2 answers the client itself, from the NodePort address the client
    dialled on node 1: node 1's uplink sees the client's packets go in and out (DNATed to b,
    still from the client) and none of b's replies, as a capture there and its counters
    show (it received what the client sent, no more); b sees the client's address."""
    from lab.capture import Capture
    cluster, _, b, _ = world
    client = cluster.external.ip if family == 4 else cluster.external.ip6
    node1, backend = cluster.node_ip(1, family), b.ip if family == 4 else b.ip6
    ns1 = cluster.nodes[1].node_netns
    before = link_counts(ns1), link_counts(cluster.external_netns)
    with Capture(cluster.nodes[1].processes, ns1, "eth0") as capture:
        results = [cluster.external.start_client(mode, node1, port, count=10).result()
                   for mode, port in zip(("tcp", "udp"), FAR, strict=True)]
    after = link_counts(ns1), link_counts(cluster.external_netns)
    for result in results:
        assert result.errors == {} and result.wrong_source == 0, result
        assert who(result) == Counter({("b", client): 10})
    frames = capture.frames
    came = [f for f in frames if not f.outgoing and f.src == client and f.dst == node1]
    went = [f for f in frames if f.outgoing and f.src == client and f.dst == backend]
    assert {f.proto for f in came} == {6, 17} and len(went) == len(came), frames
    replies = [f for f in frames if f.dst == client or f.src == backend]
    assert replies == [], replies
    node1_received = after[0][0] - before[0][0]
    client_sent, client_received = (after[1][i] - before[1][i] for i in (1, 0))
    # ARP or neighbour discovery may add a few packets, b's replies would add 30 and more
    assert node1_received <= client_sent + 4, (node1_received, client_sent)
    assert client_received >= 10 + 10 + 10, client_received   # SYN-ACKs, data, datagrams


# One UDP socket (one source port) asks ADDR PORT, then ADDR2 PORT2: prints where each
# answer came from.
TWO_ADDRESSES = """
import socket, sys
first, second = (sys.argv[1], int(sys.argv[2])), (sys.argv[3], int(sys.argv[4]))
sock = socket.socket(socket.AF_INET6 if ":" in first[0] else socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(2)
for target in (first, second):
    sock.sendto(b"hello", target)
    data, source = sock.recvfrom(100)
    print(source[0], source[1])
"""


@DSR
@FAMILIES
def test_direct_server_return_answers_from_the_address_each_flow_dialled(world, family):
    """One client port asks b through node 1's NodePort, then through the service's
    external IP: to b these are one tuple (client:port -> b:8080), yet each answer comes
    from the address that flow dialled (the backend's node follows the option)."""
    cluster, _, _, _ = world
    node1, external_ip = cluster.node_ip(1, family), FAR_IPS[family == 6]
    done = cluster.external.run([sys.executable, "-c", TWO_ADDRESSES, node1, str(FAR[1]),
                                 external_ip, "53"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == [f"{node1} {FAR[1]}", f"{external_ip} 53"], \
        done.stdout


# A UDP flow from the client to SERVICE PORT, answered; then the client, as a router on the
# reply's way, sends the service address a "fragmentation needed" / "packet too big"
# (MTU) about that reply, as a router between the backend's node and the client would.
REPLY_TOO_BIG = """
import socket, struct, sys
from lab import packets as pk
service, port, mtu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
v6 = ":" in service
family = socket.AF_INET6 if v6 else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
sock.settimeout(2)
sock.connect((service, port))
sock.send(b"hello")
answer = sock.recv(100)
client, cport = sock.getsockname()[:2]
reply = struct.pack("!HHHH", port, cport, 8 + 1400, 0) + bytes(1400)
if v6:
    message = struct.pack("!BBHI", 2, 0, 0, mtu) + pk.ipv6(service, client, pk.UDP, reply)[:48]
    raw = socket.socket(family, socket.SOCK_RAW, 58)       # the kernel sums ICMPv6
else:
    message = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + pk.ipv4(service, client, pk.UDP,
                                                               reply)[:28]
    message = message[:2] + struct.pack("!H", pk.checksum(message)) + message[4:]
    raw = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_ICMP)
raw.sendto(message, (service, 0))
print(answer.decode())
"""


@DSR
@FAMILIES
def test_direct_server_return_path_mtu_errors_about_replies_reach_the_backend(
        world, family):
    """A reply leaves from the service address on node 1, so a path MTU error about it
    comes to node 1: node 1 rewrites the quote to the reply as b sent it and forwards the
    error to b, and b's kernel learns the smaller MTU towards the client."""
    cluster, _, b, _ = world
    client = cluster.external.ip if family == 4 else cluster.external.ip6
    done = cluster.external.run([sys.executable, "-c", REPLY_TOO_BIG,
                                 cluster.node_ip(1, family), str(FAR[1]), "1300"])
    assert done.returncode == 0 and done.stdout.startswith("b:8080@"), (done.stdout,
                                                                       done.stderr)
    ip = ["ip", "-6"] if family == 6 else ["ip"]
    assert eventually(lambda: " mtu 1300 " in b.run([*ip, "route", "get", client]).stdout), \
        b.run([*ip, "route", "get", client]).stdout


# PMTU, then a second datagram CUT bytes smaller: prints the answer to it. (The error
# reached a connected socket: its first send after it reports EMSGSIZE once.)
PMTU_RETRY = PMTU + """
sock.settimeout(2)
for attempt in range(2):
    try:
        sock.send(b"y" * (size - int(sys.argv[4])))
        break
    except OSError:
        pass
print(sock.recv(100).decode())
"""


@DSR
@FAMILIES
def test_direct_server_return_too_big_for_the_option_tells_the_client_the_mtu_left(
        world, family):
    """A datagram that fills the path's MTU leaves no room for the DSR option (8 bytes in
    IPv4, a 24-byte IPv6 destination options header): node 1 answers it with a
    "fragmentation needed" / "packet too big" from the NodePort address, quoting what the
    client sent and giving the MTU less the option; the client's socket learns it, and a
    datagram that much smaller goes through."""
    cluster, _, _, _ = world
    overhead, headers = (8, 28) if family == 4 else (24, 48)
    done = cluster.external.run([sys.executable, "-c", PMTU_RETRY, cluster.node_ip(1, family),
                                 str(FAR[1]), str(1500 - headers), str(overhead)])
    assert done.returncode == 0, (done.stdout, done.stderr)
    mtu, answer = done.stdout.split()
    assert int(mtu) == 1500 - overhead, done.stdout
    assert answer.startswith("b:8080@"), done.stdout


# Two datagrams from one client port, SPORT, to ADDR PORT: prints the two answers.
FROM_PORT = """
import socket, sys
addr, port, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
v6 = ":" in addr
sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("::" if v6 else "0.0.0.0", sport))
sock.settimeout(2)
for _ in range(2):
    sock.sendto(b"?\\n", (addr, port))
    print(sock.recv(2048).decode().strip())
"""
UDP_PORT = 20459           # a client port of the hybrid test's: below the ephemeral range


def from_port(cluster, family: int) -> list[str]:
    """The answers to FROM_PORT through node 1's NodePort of `far` (UDP)."""
    done = cluster.external.run([sys.executable, "-c", FROM_PORT, cluster.node_ip(1, family),
                                 str(FAR[1]), str(UDP_PORT)])
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@DSR
def test_hybrid_after_a_restart_keeps_dsr_flows_and_cleanup_leaves_nothing(world):
    """Node 1's agent restarted into --nodeport-mode hybrid with --acceleration native: TCP
    connections opened by DSR before keep working (pinned flows, programs swapped in place,
    the XDP program taking them over); new flows to a backend on node 2 go by DSR for TCP,
    forwarded in XDP with the option, and are SNATed to node 1 for UDP, both families; a UDP
    flow opened by DSR before, still open, goes on from its client port SNATed to node 1 (to
    the same backend): hybrid sends UDP by SNAT, the flow's datagrams no longer carry the
    option (before, it stayed DSR as long as it was in use, and a new socket of the client
    that drew that port was a DSR flow). Then
    `bpfproxy cleanup` on node 1 takes away its programs, links and pinned maps (the DSR
    flows' entries among them) as in snat mode, and the NodePort no longer answers; node 2,
    which answered those flows, still serves. The dsr world's last test: node 1 is left
    without its agent (starting one costs the suite seconds for nothing)."""
    from tests import reliability_traffic
    cluster, _, b, directory = world
    agent = cluster.agents[1]
    node1 = cluster.node_ip(1, 4)
    reliability_traffic.start_server(b, 9091)
    manifests.write(directory, "farhold.yaml", manifests.service(
        "farhold", "10.96.0.18", [{"name": "hold", "port": 91, "targetPort": 9091,
                                   "nodePort": 30091, "protocol": "TCP"}],
        service_type="NodePort"), manifests.endpoint_slice(
        "farhold", [b.ip], [{"name": "hold", "port": 9091, "protocol": "TCP"}],
        name="farhold-v4", node_name="node2"))
    agent.wait_until(lambda: agent.kernel_backends(node1, 30091), "farhold in the kernel")
    held = reliability_traffic.start_hold(cluster.external, node1, 30091, connections=2,
                                          duration=150, until_stopped=True)
    held.wait_round()
    assert any(v.flags & 64 for _, v in read_flows(agent, 6))          # layout.CT_DSR
    agent.stop()
    args = list(agent.extra_args)
    args[args.index("--nodeport-mode") + 1] = "hybrid"
    agent.extra_args = (*args, "--acceleration", "native")
    cluster.prepare_for_xdp()
    for family in (4, 6):       # the dsr programs, still attached: a UDP flow by DSR
        client = cluster.external.ip if family == 4 else cluster.external.ip6
        assert from_port(cluster, family) == [f"b:8080@{client}"] * 2
    agent.start()
    held.wait_round(time.monotonic())
    conns = held.stop()["connections"]
    assert {c["backend"] for c in conns} == {"b"} and min(c["requests"] for c in conns) > 2, \
        conns
    assert all(c["error"] is None and c["wrong_answers"] == 0 for c in conns), conns
    udp_dsr = [k for k, v in read_flows(agent, 17)
               if v.flags & 64 and k.sport == socket.htons(UDP_PORT)]   # still open
    assert len(udp_dsr) == 2, udp_dsr
    for family in (4, 6):
        assert from_port(cluster, family) == [f"b:8080@{cluster.node_ip(1, family)}"] * 2
    assert not any(v.flags & 64 and k.sport == socket.htons(UDP_PORT)
                   for k, v in read_flows(agent, 17))
    from agent.datapath.inventory import read_events
    for family in (4, 6):
        client = cluster.external.ip if family == 4 else cluster.external.ip6
        address = cluster.node_ip(1, family)
        before = read_events(agent.bpffs)[("tc", "xdp_forwarded")]
        tcp = cluster.external.tcp(address, FAR[0], count=5)
        # the client's SYN (with the option added in XDP), request and last ACK at least
        assert read_events(agent.bpffs)[("tc", "xdp_forwarded")] - before >= 3 * 5
        udp = cluster.external.udp(address, FAR[1], count=5)
        assert tcp.errors == {} and who(tcp) == Counter({("b", client): 5}), tcp
        assert udp.errors == {} and who(udp) == Counter({("b", address): 5}), udp

    agent.stop()
    assert agent.cleanup().returncode == 0
    assert not agent.bpffs.exists() or not any(agent.bpffs.iterdir())
    gone = cluster.external.start_client("tcp", node1, FAR[0], count=1, timeout=0.5).result()
    assert gone.answers == {} and sum(gone.errors.values()) == 1, gone
    assert cluster.external.tcp(cluster.node_ip(2, 4), FAR[0], count=3).errors == {}
