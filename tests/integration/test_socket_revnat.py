"""Reverse NAT belongs to the socket (issue 13, point A4): a pod that loops socket/connect/
close, far more times than the reverse NAT map holds, never makes another pod's long-lived
connected UDP socket see its backend's address in recvmsg()/getpeername(); and a socket's
entries leave the shared map when it is closed (also after the agent's stale socket sweep
destroyed it, and for an unconnected socket that sent to several services)."""
from __future__ import annotations

import ctypes
import os
import select
import subprocess
import sys
import textwrap

import pytest

from agent.datapath import bpfsys, inventory, layout
from agent.datapath.stale_sockets import destroy_udp_sockets
from lab import manifests
from lab.agent_runner import AgentRunner

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MAP_SIZE = 1024                 # --max-reverse-nat: the churn below is 20 times this
CHURN = 20 * MAP_SIZE
VIPS = {4: ("10.96.0.10", "10.96.0.11"), 6: ("fd00:10:96::10", "fd00:10:96::11")}

# A UDP socket driven line by line on stdin, each command answered by one line:
#   connect ADDR PORT   connect() (through the socket LB for a VIP)
#   sendto ADDR PORT    send without connecting: the sendmsg hook balances each datagram
#   ask                 send on the connected socket, then "from HOST PORT peer HOST PORT"
#                       (recvfrom()'s source and getpeername())
#   recv                "from HOST PORT" of one datagram (after sendto)
#   close               close the socket
SOCKET = textwrap.dedent("""
    import socket, sys
    family = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(5.0)
    print("ready", flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        try:
            if command == "connect":
                s.connect((args[0], int(args[1])))
                out = "ok"
            elif command == "sendto":
                s.sendto(b"?", (args[0], int(args[1])))
                out = "ok"
            elif command == "ask":
                s.send(b"?")
                _, source = s.recvfrom(100)
                out = "from %s %d peer %s %d" % (*source[:2], *s.getpeername()[:2])
            elif command == "recv":
                _, source = s.recvfrom(100)
                out = "from %s %d" % source[:2]
            elif command == "close":
                s.close()
                out = "ok"
        except OSError as e:
            out = "error %s" % e
        print(out, flush=True)
""")

# socket/connect/close N times: each connect() goes through the socket LB
CHURNER = textwrap.dedent("""
    import socket, sys
    family = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
    for _ in range(int(sys.argv[4])):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.connect((sys.argv[2], int(sys.argv[3])))
        s.close()
    print("done", flush=True)
""")


class DrivenSocket:
    """SOCKET running in a pod."""

    def __init__(self, pod, family: int) -> None:
        self.pod = pod
        self.process = pod.popen([sys.executable, "-c", SOCKET, str(family)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        assert self._line(10.0) == "ready"

    def do(self, *command: object, timeout: float = 10.0) -> str:
        self.process.stdin.write(" ".join(map(str, command)) + "\n")
        self.process.stdin.flush()
        return self._line(timeout)

    def _line(self, timeout: float) -> str:
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not readable:
            raise AssertionError(f"socket in {self.pod.name}: no answer in {timeout}s")
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"socket in {self.pod.name} exited: "
                                 f"{self.process.stderr.read()}")
        return line.strip()


def write_services(directory, addresses: list[list[str]], family: int) -> None:
    """Two UDP services: 'dns' at VIPS[family][0] on addresses[0], 'dns2' at [1] on [1]
    (other backends: a socket's entries are per backend)."""
    for name, vip, backends in zip(("dns", "dns2"), VIPS[family], addresses, strict=False):
        manifests.write(
            directory, f"{name}.yaml",
            manifests.service(name, vip, [{"name": "dns", "port": 53, "targetPort": 5353,
                                           "protocol": "UDP"}]),
            manifests.endpoint_slice(name, backends, [{"name": "dns", "port": 5353,
                                                      "protocol": "UDP"}]))


def revnat_entries(agent: AgentRunner, family: int) -> int:
    usage = {m.name: m for m in inventory.map_usage(agent.bpffs)}
    assert usage[f"bpfp_revnat{family}_v1"].max_entries == MAP_SIZE
    return usage[f"bpfp_revnat{family}_v1"].entries


def sock_events(agent: AgentRunner) -> dict[str, int]:
    """bpfp_sock_events summed over the possible CPUs."""
    spec = layout.MAPS["bpfp_sock_events"]
    fd = bpfsys.obj_get(str(agent.bpffs / spec.pin))
    try:
        cpus = inventory.possible_cpus()
        out = {}
        for slot, name in enumerate(layout.SOCK_EVENTS):
            values = (ctypes.c_uint64 * cpus)()
            out[name] = sum(values) if bpfsys.map_lookup(fd, ctypes.c_uint32(slot), values) \
                else 0
        return out
    finally:
        os.close(fd)


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_socket_churn_in_one_pod_leaves_other_pods_replies_and_the_map_alone(
        make_lab, tmp_path, family):
    lab = make_lab()
    backends = [lab.add_pod(f"backend-{x}") for x in "abc"]
    for pod in backends:
        pod.start_server([5353], udp=True)
    steady_pod, churn_pod = lab.add_pod("steady"), lab.add_pod("churner")
    directory = tmp_path / "manifests"

    def address(pod) -> str:
        return pod.ip if family == 4 else pod.ip6

    write_services(directory, [[address(p) for p in backends[:2]], [address(backends[2])]],
                   family)
    vip, vip2 = VIPS[family]
    service = f"from {vip} 53 peer {vip} 53"
    with AgentRunner(lab, directory, extra_args=("--max-reverse-nat", str(MAP_SIZE))) as agent:
        agent.start()
        # a long-lived connected socket (that has not received anything yet: nothing has
        # looked its entry up), and an unconnected one that sent to both services
        steady = DrivenSocket(steady_pod, family)
        assert steady.do("connect", vip, 53) == "ok"
        several = DrivenSocket(steady_pod, family)
        for target in (vip, vip2):
            assert several.do("sendto", target, 53) == "ok"
            assert several.do("recv") == f"from {target} 53"
        assert revnat_entries(agent, family) == 3

        churner = churn_pod.run([sys.executable, "-c", CHURNER, str(family), vip, "53",
                                 str(CHURN)], timeout=120)
        assert churner.stdout.strip() == "done", churner.stderr

        # the other pod's sockets still see the services, not the backends
        assert steady.do("ask") == service
        for target in (vip, vip2):
            assert several.do("sendto", target, 53) == "ok"
            assert several.do("recv") == f"from {target} 53"
        # the churner's closed sockets left nothing behind; the live sockets' are all there
        assert revnat_entries(agent, family) == 3
        assert several.do("close") == "ok"
        assert revnat_entries(agent, family) == 1

        # SOCK_DESTROY (the agent's stale socket sweep) clears a connected socket's peer
        # before it is closed: its entry still goes with it
        assert steady.do("ask") == service
        assert destroy_udp_sockets(lab.cgroup, {(address(p), 5353) for p in backends}) == 1
        assert steady.do("ask").startswith("error")
        assert steady.do("close") == "ok"
        assert revnat_entries(agent, family) == 0


def test_a_socket_that_sends_to_more_backends_than_it_keeps_stays_bounded(make_lab, tmp_path):
    """An unconnected socket keeps layout.SOCK_REVNATS backends: the next one replaces the
    oldest (counted), whose shared entry goes too, so one socket cannot fill the map."""
    lab = make_lab()
    kept = layout.SOCK_REVNATS
    ports = [6000 + i for i in range(kept + 1)]
    backend = lab.add_pod("backend")
    backend.start_server(ports, udp=True)
    client_pod = lab.add_pod("client")
    directory = tmp_path / "manifests"
    vips = [f"10.96.1.{10 + i}" for i in range(len(ports))]
    for i, (vip, port) in enumerate(zip(vips, ports, strict=True)):
        manifests.write(
            directory, f"dns{i}.yaml",
            manifests.service(f"dns{i}", vip, [{"name": "dns", "port": 53,
                                                "targetPort": port, "protocol": "UDP"}]),
            manifests.endpoint_slice(f"dns{i}", [backend.ip],
                                     [{"name": "dns", "port": port, "protocol": "UDP"}]))
    with AgentRunner(lab, directory, extra_args=("--max-reverse-nat", str(MAP_SIZE))) as agent:
        agent.start()
        sender = DrivenSocket(client_pod, 4)
        for vip in vips:
            assert sender.do("sendto", vip, 53) == "ok"
            assert sender.do("recv") == f"from {vip} 53"
        assert revnat_entries(agent, 4) == kept
        assert sock_events(agent)["revnat_replaced"] == 1
        # the replaced backend is remembered again when the socket sends to it again
        assert sender.do("sendto", vips[0], 53) == "ok"
        assert sender.do("recv") == f"from {vips[0]} 53"
        assert sender.do("close") == "ok"
        assert revnat_entries(agent, 4) == 0
        assert sock_events(agent)["revnat_failed"] == sock_events(agent)["no_socket_storage"] == 0
