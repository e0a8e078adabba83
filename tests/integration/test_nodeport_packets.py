"""The TC programs fed packets no socket sends: truncated headers, fragments, IPv6 extension
headers, IPv4 options, ARP, ICMP and random bytes, from a raw socket outside the node. What is
not ours passes untouched or is dropped; nothing is rewritten wrongly; the kernel stays quiet."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest

from lab import manifests, netns
from lab import packets as pk
from lab.processes import REPO_ROOT as REPO
from tests import reliability_report

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SPOOFED = "172.30.0.77"          # a source no flow of the tests uses: its flows are these
SPOOFED6 = "fd00:172:30::77"


def link_mac(namespace: str, ifname: str = "eth0") -> str:
    return json.loads(netns.ip("-j", "link", "show", ifname, netns=namespace))[0]["address"]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from lab.cluster import Cluster
    directory = tmp_path_factory.mktemp("manifests")
    with Cluster(f"pk{os.getpid() % 100000}") as cluster:
        a = cluster.add_pod(1, "a")
        a.start_server([8080], udp=True)
        ports = [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080,
                  "protocol": "TCP"},
                 {"name": "dns", "port": 53, "targetPort": 8080, "nodePort": 30053,
                  "protocol": "UDP"}]
        eps = [{"name": "http", "port": 8080, "protocol": "TCP"},
               {"name": "dns", "port": 8080, "protocol": "UDP"}]
        manifests.write(directory, "web.yaml",
                        manifests.service("web", ("10.96.0.10", "fd00:10:96::10"), ports,
                                          service_type="NodePort"),
                        manifests.endpoint_slice("web", [a.ip], eps, name="web4",
                                                 node_name="node1"),
                        manifests.endpoint_slice("web", [a.ip6], eps, name="web6",
                                                 node_name="node1"))
        cluster.start_agents(directory)
        yield cluster


def send(cluster, frames: list[bytes], expect: int | None = None) -> list[bytes]:
    """Frames out of the external client's eth0 (AF_PACKET; receiving through AF_PACKET does
    not work on every machine here, so tests look at effects instead)."""
    path = cluster.nodes[1].workdir / f"frames-{random.getrandbits(32)}.hex"
    path.write_text("\n".join(f.hex() for f in frames))
    argv = [sys.executable, "-m", "lab.packets", "eth0", str(path)]
    if expect is not None:
        argv += ["--expect", hex(expect)]
    done = cluster.external.run(argv, timeout=60)
    assert done.returncode == 0, done.stderr
    return [bytes.fromhex(line) for line in done.stdout.split()]


def spoofed_flows(cluster) -> list:
    from agent.datapath.maps import BpfServiceMaps
    maps = BpfServiceMaps(cluster.agents[1].bpffs)
    try:
        mine = {pk.ipaddress.ip_address(SPOOFED).packed.ljust(16, b"\0"),
                pk.ipaddress.ip_address(SPOOFED6).packed}
        return [(k, v) for k, v in maps.flows() if bytes(k.saddr) in mine]
    finally:
        maps.close()


def kernel_log_lines() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()


def frames_for(cluster) -> tuple[str, str, dict[str, bytes]]:
    node_mac, ext_mac = link_mac(cluster.nodes[1].node_netns), link_mac(cluster.external_netns)
    n4, n6 = cluster.node_ip(1, 4), cluster.node_ip(1, 6)

    def v4(payload, proto=pk.UDP, **kw):
        return pk.ether(node_mac, ext_mac, pk.ETH_IP, pk.ipv4(SPOOFED, n4, proto, payload, **kw))

    def v6(payload, nexthdr=pk.UDP):
        return pk.ether(node_mac, ext_mac, pk.ETH_IP6, pk.ipv6(SPOOFED6, n6, nexthdr, payload))

    bad = {
        "ethernet header only": pk.ether(node_mac, ext_mac, pk.ETH_IP, b""),
        "ipv4 header cut": pk.ether(node_mac, ext_mac, pk.ETH_IP, pk.ipv4(SPOOFED, n4, pk.UDP,
                                                                          b"")[:12]),
        "ipv4 ihl below 5": pk.ether(node_mac, ext_mac, pk.ETH_IP, b"\x44" + pk.ipv4(
            SPOOFED, n4, pk.UDP, pk.udp(SPOOFED, n4, 4444, 30053))[1:]),
        "tcp header cut": v4(pk.tcp(SPOOFED, n4, 4445, 30080)[:12], proto=pk.TCP),
        "udp header cut": v4(pk.udp(SPOOFED, n4, 4446, 30053)[:6]),
        "first fragment": v4(pk.udp(SPOOFED, n4, 4447, 30053), frag=0x2000),
        "later fragment": v4(pk.udp(SPOOFED, n4, 4448, 30053), frag=0x0010),
        "ipv6 header cut": pk.ether(node_mac, ext_mac, pk.ETH_IP6, pk.ipv6(
            SPOOFED6, n6, pk.UDP, b"")[:30]),
        "ipv6 hop-by-hop header": v6(bytes([pk.UDP, 0, 1, 4, 0, 0, 0, 0]) + pk.udp(
            SPOOFED6, n6, 4449, 30053), nexthdr=pk.HOPOPTS),
        "ipv6 udp cut": v6(pk.udp(SPOOFED6, n6, 4450, 30053)[:5]),
        "icmp to the nodeport's address": v4(b"\x03\x03\x00\x00" + bytes(24), proto=pk.ICMP),
    }
    return node_mac, ext_mac, bad


def test_malformed_and_foreign_packets_make_no_flow_and_no_kernel_noise(node):
    cluster = node
    before = len(kernel_log_lines())
    _, _, bad = frames_for(cluster)
    send(cluster, list(bad.values()) * 3)
    flows = spoofed_flows(cluster)
    # and the service still answers
    after = cluster.external.tcp(cluster.node_ip(1, 4), 30080, count=3)
    noise = [line for line in kernel_log_lines()[before:]
             if any(word in line for word in ("WARNING", "BUG", "bpf", "Oops"))]
    reliability_report.record(
        "6", "tc-malformed-packets",
        f"{len(bad)} kinds of malformed or foreign frames ({', '.join(bad)}), 3 of each, "
        "from a raw socket outside the node at its NodePorts; then real connections",
        connections=after.total, failures=after.failed, frames=3 * len(bad),
        flows_created=len(flows), kernel_warnings=len(noise))
    assert flows == []
    assert after.errors == {}
    assert noise == []


def test_random_bytes_after_an_ip_ethertype(node):
    cluster = node
    node_mac, ext_mac, _ = frames_for(cluster)
    rng = random.Random(20261129)
    frames = []
    for _ in range(400):
        ethertype = rng.choice([pk.ETH_IP, pk.ETH_IP6])
        body = bytearray(rng.randbytes(rng.randrange(0, 120)))
        if body and rng.random() < 0.7:      # mostly a plausible version nibble
            body[0] = (0x45 if ethertype == pk.ETH_IP else 0x60) | (body[0] & 0x0F
                                                                     if ethertype == pk.ETH_IP6
                                                                     else 0)
        frames.append(pk.ether(node_mac, ext_mac, ethertype, bytes(body)))
    before = len(kernel_log_lines())
    send(cluster, frames)
    after = cluster.external.udp(cluster.node_ip(1, 4), 30053, count=3)
    noise = [line for line in kernel_log_lines()[before:]
             if any(word in line for word in ("WARNING", "BUG", "Oops"))]
    reliability_report.record(
        "6", "tc-random-packets",
        "400 frames of random bytes (0-120) behind an IPv4 or IPv6 ethertype, most with a "
        "plausible version nibble, at the node's interface; then real datagrams",
        connections=after.total, failures=after.failed, frames=len(frames),
        kernel_warnings=len(noise))
    assert after.errors == {}
    assert noise == []


def test_ip_options_are_skipped_right_and_the_flow_is_translated(node):
    """A valid UDP datagram behind IPv4 options (ihl 6) is ours: a flow to the backend."""
    cluster = node
    node_mac, ext_mac, _ = frames_for(cluster)
    n4 = cluster.node_ip(1, 4)
    frame = pk.ether(node_mac, ext_mac, pk.ETH_IP, pk.ipv4(
        SPOOFED, n4, pk.UDP, pk.udp(SPOOFED, n4, 4451, 30053), options=b"\x01\x01\x01\x00"))
    send(cluster, [frame])
    flows = [(k, v) for k, v in spoofed_flows(cluster) if k.sport == pk.socket.htons(4451)]
    assert len(flows) == 1
    _, value = flows[0]
    a = cluster.nodes[1].pods["a"]
    assert bytes(value.daddr)[:4] == pk.ipaddress.IPv4Address(a.ip).packed
    assert pk.socket.ntohs(value.dport) == 8080


# Pings the node from a raw ICMP socket: the reply comes through the IP stack.
PING = """
import socket, struct, sys
sys.path.insert(0, sys.argv[2])
from lab import packets
with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
    sock.settimeout(2)
    sock.sendto(packets.icmp_echo(ident=77), (sys.argv[1], 0))
    while True:
        data, _ = sock.recvfrom(2048)
        ihl = (data[0] & 15) * 4
        if data[ihl] == 0 and data.endswith(b"bpfp"):
            print("echo reply")
            break
"""


def test_arp_and_icmp_echo_pass_untouched(node):
    cluster = node
    node_mac, ext_mac, _ = frames_for(cluster)
    n4 = cluster.node_ip(1, 4)
    # an ARP request from an address the node never heard of: answering it, the node
    # learns that address's MAC, which only happens if the request got through
    stranger = "172.30.0.78"
    arp = pk.ether("ff:ff:ff:ff:ff:ff", ext_mac, pk.ETH_ARP,
                   pk.arp_request(ext_mac, stranger, n4))
    send(cluster, [arp])
    neighbour = netns.ip("neigh", "show", stranger, netns=cluster.nodes[1].node_netns)
    assert ext_mac in neighbour, neighbour
    done = cluster.external.run([sys.executable, "-c", PING, n4, str(REPO)], timeout=10)
    assert "echo reply" in done.stdout, done.stderr


# Lists our TC programs on eth0 of the namespace it runs in.
TC_ATTACHED = """
import sys
sys.path.insert(0, sys.argv[1])
from agent.datapath.inventory import tc_programs
print(sum(a.attached for a in tc_programs(["eth0"])))
"""


def test_cleanup_detaches_the_tc_programs(tmp_path):
    from lab.cluster import Cluster
    with Cluster(f"pc{os.getpid() % 100000}", nodes=1) as cluster:
        cluster.start_agents(tmp_path)
        node = cluster.nodes[1]
        count = node.node_run([sys.executable, "-c", TC_ATTACHED, str(REPO)], check=True)
        assert count.stdout.strip() == "2"        # tcx ingress and egress
        agent = cluster.agents[1]
        agent.stop()
        # programs stay attached without the agent: traffic from outside keeps flowing
        count = node.node_run([sys.executable, "-c", TC_ATTACHED, str(REPO)], check=True)
        assert count.stdout.strip() == "2"
        assert agent.cleanup().returncode == 0
        deadline = time.monotonic() + 5           # links are released asynchronously
        while True:
            count = node.node_run([sys.executable, "-c", TC_ATTACHED, str(REPO)], check=True)
            if count.stdout.strip() == "0" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert count.stdout.strip() == "0"


def test_a_tcp_flow_starts_only_with_a_syn(node):
    """An ACK, RST, FIN or SYN-ACK to a NodePort without a flow is dropped and counted: it
    would otherwise take a backend (and, to a remote one, a SNAT port) for nothing. The SYN
    after them opens a flow."""
    cluster = node
    node_mac, ext_mac, _ = frames_for(cluster)
    n4 = cluster.node_ip(1, 4)
    strays = {4460: 0x10, 4461: 0x04, 4462: 0x11, 4463: 0x12}     # ACK, RST, FIN+ACK, SYN+ACK
    frames = [pk.ether(node_mac, ext_mac, pk.ETH_IP, pk.ipv4(
        SPOOFED, n4, pk.TCP, pk.tcp(SPOOFED, n4, sport, 30080, flags=flags)))
        for sport, flags in strays.items()]
    before = tc_events(cluster)["tcp_not_syn"]
    send(cluster, frames)
    sports = {pk.socket.ntohs(k.sport) for k, _ in spoofed_flows(cluster)}
    assert sports.isdisjoint(strays), sports
    assert tc_events(cluster)["tcp_not_syn"] - before == len(strays)
    send(cluster, [pk.ether(node_mac, ext_mac, pk.ETH_IP, pk.ipv4(
        SPOOFED, n4, pk.TCP, pk.tcp(SPOOFED, n4, 4464, 30080)))])
    assert 4464 in {pk.socket.ntohs(k.sport) for k, _ in spoofed_flows(cluster)}


def tc_events(cluster) -> dict[str, int]:
    from agent.datapath.inventory import read_events
    return {name: n for (program, name), n in read_events(cluster.agents[1].bpffs).items()
            if program == "tc"}
