"""Connected UDP sockets to a removed backend are destroyed (issue 5, point 8): real client
processes in lab pods hold connected sockets, destroy_udp_sockets() finds them through the
lab's cgroup tree and each pod's network namespace, and the client's next recv() fails with
ECONNABORTED; sockets to other backends, other ports and other addresses are left alone."""
from __future__ import annotations

import ipaddress
import logging
import os
import select
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from agent.datapath import stale_sockets
from agent.datapath.netns_opener import NetnsDoorClosed, NetnsOpener
from agent.datapath.stale_sockets import destroy_udp_sockets
from lab import manifests
from lab.agent_runner import AgentRunner
from tests.helpers import wait_for

integration = pytest.mark.integration
pytestmark = pytest.mark.timeout(120)

# One connected UDP socket, driven line by line on stdin; every command answers one line.
#   ask        send a request, print "answer NAME:PORT" (or "errno E" / "timeout")
#   recv       recv() with nothing sent: "timeout" unless the socket was destroyed
#   wait       recv() for up to 10 s: a destroy wakes it up with ECONNABORTED
#   reconnect  connect() again to the same address (through the socket LB for a VIP), ask
# Its first line is "ready NAME:PORT" once the first answer came back.
CLIENT = textwrap.dedent("""
    import errno, socket, sys, time
    addr, port = sys.argv[1], int(sys.argv[2])
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    def ask(timeout=1.0):
        s.settimeout(timeout)
        try:
            s.send(b"?")
            return "answer " + s.recv(100).decode().strip()
        except socket.timeout:
            return "timeout"
        except OSError as e:
            return "errno " + errno.errorcode[e.errno]
    def recv(timeout):
        s.settimeout(timeout)
        started = time.monotonic()
        try:
            return "data " + s.recv(100).decode().strip()
        except socket.timeout:
            return "timeout"
        except OSError as e:
            return "errno %s %.2f" % (errno.errorcode[e.errno], time.monotonic() - started)
    s.connect((addr, port))
    print("ready " + ask(3.0).split(" ", 1)[-1], flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "ask":
            out = ask()
        elif command == "recv":
            out = recv(0.5)
        elif command == "wait":
            out = recv(10.0)
        elif command == "reconnect":
            s.connect((addr, port))
            out = ask(3.0)
        else:
            out = "unknown " + command
        print(out, flush=True)
""")

# A dual-stack UDP echo of "NAME:PORT" on [::]:PORT (v4, v4-mapped and v6 clients alike).
DUAL_STACK_SERVER = textwrap.dedent("""
    import socket, sys
    name, port = sys.argv[1], int(sys.argv[2])
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    print("ready", flush=True)
    while True:
        _, peer = s.recvfrom(100)
        s.sendto(("%s:%d" % (name, port)).encode(), peer)
""")


class UdpClient:
    """CLIENT running in a pod; `first` is the backend that answered its first request."""

    def __init__(self, pod, addr: str, port: int) -> None:
        self.pod = pod
        self.process = pod.popen([sys.executable, "-c", CLIENT, addr, str(port)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        ready = self._line(10.0)
        assert ready.startswith("ready "), f"client in {pod.name} to {addr}:{port}: {ready!r}"
        self.first = ready.split(" ", 1)[1]
        assert self.first not in ("timeout", "") and not self.first.startswith("errno"), ready

    def send(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def do(self, command: str, timeout: float = 15.0) -> str:
        self.send(command)
        return self._line(timeout)

    def wait_blocked(self, timeout: float = 30.0) -> None:
        """Return once the client sleeps in the kernel waiting for data (Python's recv()
        with a timeout waits in poll()): a destroy from now on wakes a blocked call."""
        wchan = f"/proc/{self.process.pid}/wchan"
        deadline = time.monotonic() + timeout
        while "poll" not in open(wchan).read():
            assert time.monotonic() < deadline, f"client in {self.pod.name} never blocked"
            time.sleep(0.01)

    def _line(self, timeout: float) -> str:
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not readable:
            raise AssertionError(f"client in {self.pod.name}: no answer in {timeout}s")
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"client in {self.pod.name} exited: "
                                 f"{self.process.stderr.read()}")
        return line.strip()


def aborted(line: str) -> bool:
    return line.startswith("errno ECONNABORTED")


def ip(text: str):
    return ipaddress.ip_address(text)


# -- pure ------------------------------------------------------------------------------------

def test_inet_diag_msg_is_parsed_with_its_exact_id():
    sockid = (stale_sockets._SOCKID.pack(40000, 53, socket.inet_aton("10.0.0.2") + b"\0" * 12,
                                         socket.inet_aton("10.0.0.9") + b"\0" * 12)
              + stale_sockets._SOCKID_TAIL.pack(0, 0x1234, 0x5))
    payload = (stale_sockets._MSG_HEAD.pack(socket.AF_INET, 1, 0, 0) + sockid
               + stale_sockets._MSG_TAIL.pack(0, 0, 0, 1000, 777) + b"attrs")
    udp = stale_sockets.parse_diag_msg(payload)
    assert (udp.src, udp.sport, udp.dst, udp.dport) == (ip("10.0.0.2"), 40000, ip("10.0.0.9"), 53)
    assert (udp.cookie, udp.uid, udp.inode) == (0x5_0000_1234, 1000, 777)
    assert udp.raw_id == sockid and len(sockid) == stale_sockets.SOCKID_LEN


def test_ipv4_mapped_peer_matches_the_ipv4_backend():
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:10.0.0.9")
    sockid = (stale_sockets._SOCKID.pack(1, 53, b"\0" * 16, mapped)
              + stale_sockets._SOCKID_TAIL.pack(0, 1, 0))
    payload = (stale_sockets._MSG_HEAD.pack(socket.AF_INET6, 1, 0, 0) + sockid
               + stale_sockets._MSG_TAIL.pack(0, 0, 0, 0, 1))
    assert stale_sockets.parse_diag_msg(payload).peer == (ip("10.0.0.9"), 53)
    assert stale_sockets._normalise({("::ffff:10.0.0.9", 53), (ip("10.0.0.9"), 53)}) == {
        (ip("10.0.0.9"), 53)}
    with pytest.raises(ValueError):
        stale_sockets._normalise({("10.0.0.9", 0)})


def test_no_backends_does_nothing(tmp_path):
    assert destroy_udp_sockets(tmp_path, set()) == 0


# -- lab: real pods, no agent ----------------------------------------------------------------

@pytest.fixture
def backends(make_lab):
    """Pods a and b answer UDP on 5353 and 5354."""
    lab = make_lab()
    a, b = lab.add_pod("a"), lab.add_pod("b")
    for pod in (a, b):
        pod.start_server([5353, 5354], udp=True)
    return lab, a, b


@integration
def test_sockets_to_the_removed_backend_are_destroyed_and_no_others(backends, caplog):
    lab, a, b = backends
    c, d = lab.add_pod("c"), lab.add_pod("d")
    # sockets to a:5353 in two pods (two namespaces), one of them blocked in recv()
    c_to_a, d_to_a, c_waiting = UdpClient(c, a.ip, 5353), UdpClient(d, a.ip, 5353), \
        UdpClient(c, a.ip, 5353)
    # same backend address, other port; other backend, same port
    c_to_a_other_port, d_to_b = UdpClient(c, a.ip, 5354), UdpClient(d, b.ip, 5353)
    assert (c_to_a.first, c_to_a_other_port.first, d_to_b.first) == ("a:5353", "a:5354",
                                                                     "b:5353")
    c_waiting.send("wait")
    c_waiting.wait_blocked()

    with caplog.at_level(logging.DEBUG, logger=stale_sockets.__name__):
        destroyed = destroy_udp_sockets(lab.cgroup, {(ip(a.ip), 5353)})

    assert destroyed == 3
    # woken by the destroy: a recv() left alone ends after 10 s with "timeout", not an error
    woke = c_waiting._line(30.0)
    assert aborted(woke), woke
    print(f"blocked recv() woken after {woke.split()[2]} s")
    assert aborted(c_to_a.do("recv"))
    assert aborted(d_to_a.do("recv"))
    for untouched in (c_to_a_other_port, d_to_b):
        assert untouched.do("recv") == "timeout"
        assert untouched.do("ask") == f"answer {untouched.first}"
    # an aborted socket is unconnected now: a client that reconnects is served again
    assert c_to_a.do("reconnect") == "answer a:5353"
    # a's server sockets (bound, unconnected) were never candidates
    assert UdpClient(d, a.ip, 5353).first == "a:5353"

    # one line per namespace: c and d (3 destroyed), plus a, b and our own with nothing
    lines = [r.getMessage() for r in caplog.records if "event=stale_udp_netns " in r.getMessage()]
    assert len(lines) == 5, lines
    assert sorted(int(line.split("destroyed=")[1].split()[0]) for line in lines) == [0, 0, 0, 1, 2]
    assert "event=stale_udp_sockets backends=1 netns=5 destroyed=3" in caplog.text


@integration
def test_ipv6_and_ipv4_mapped_sockets(make_lab):
    lab = make_lab()
    pod = lab.add_pod("dual")
    server = pod.popen([sys.executable, "-c", DUAL_STACK_SERVER, "dual", "7000"],
                       stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    v6 = UdpClient(pod, "::1", 7000)
    mapped = UdpClient(pod, "::ffff:127.0.0.1", 7000)
    v4 = UdpClient(pod, "127.0.0.1", 7000)

    assert destroy_udp_sockets(lab.cgroup, {(ip("::1"), 7000)}) == 1
    assert aborted(v6.do("recv"))
    assert mapped.do("recv") == "timeout" and v4.do("recv") == "timeout"

    # an IPv4 backend: the AF_INET socket and the AF_INET6 one connected to it, mapped
    assert destroy_udp_sockets(lab.cgroup, {(ip("127.0.0.1"), 7000)}) == 2
    assert aborted(mapped.do("recv")) and aborted(v4.do("recv"))
    assert v6.do("reconnect") == "answer dual:7000"


@integration
def test_a_namespace_that_vanishes_midway_is_skipped(backends, monkeypatch, caplog):
    lab, a, _b = backends
    doomed, survivor = lab.add_pod("doomed"), lab.add_pod("survivor")
    UdpClient(doomed, a.ip, 5353)
    # survivor's namespace is reached through its second process once the first has exited
    sleeper = survivor.popen(["sleep", "600"])
    kept = UdpClient(survivor, a.ip, 5353)
    find = stale_sockets.find_namespaces

    def find_then_lose_some(*args, **kw):
        found = find(*args, **kw)
        sleeper_path = f"/proc/{sleeper.pid}/ns/net"
        for netns in found:
            if sleeper_path in netns.paths:    # try the process that will be gone first
                netns.paths.remove(sleeper_path)
                netns.paths.insert(0, sleeper_path)
        lab.remove_pod(doomed)                 # its processes and namespace go away
        lab.processes.stop(sleeper)
        return found

    monkeypatch.setattr(stale_sockets, "find_namespaces", find_then_lose_some)
    with caplog.at_level(logging.INFO, logger=stale_sockets.__name__):
        assert destroy_udp_sockets(lab.cgroup, {(ip(a.ip), 5353)}) == 1
    assert aborted(kept.do("recv"))
    assert "vanished=1" in caplog.text


@integration
def test_out_of_time_is_logged_not_raised(backends, caplog):
    lab, a, _b = backends
    client = UdpClient(lab.add_pod("c"), a.ip, 5353)
    with caplog.at_level(logging.INFO, logger=stale_sockets.__name__):
        assert destroy_udp_sockets(lab.cgroup, {(ip(a.ip), 5353)}, timeout=0) == 0
    assert "timed_out=4" in caplog.text            # a, b, c and our own namespace
    assert client.do("ask") == "answer a:5353"


@integration
def test_should_destroy_can_veto(backends):
    lab, a, _b = backends
    c = lab.add_pod("c")
    first, second = UdpClient(c, a.ip, 5353), UdpClient(c, a.ip, 5353)
    seen = []

    def only_one(udp):
        seen.append(udp)
        return len(seen) == 1

    assert destroy_udp_sockets(lab.cgroup, {(ip(a.ip), 5353)}, should_destroy=only_one) == 1
    assert len(seen) == 2 and all(udp.cookie for udp in seen)
    assert {udp.dst for udp in seen} == {ip(a.ip)} and seen[0].cookie != seen[1].cookie
    outcomes = sorted(client.do("recv") for client in (first, second))
    assert aborted(outcomes[0]) and outcomes[1] == "timeout", outcomes


# -- through the real agent and a ClusterIP --------------------------------------------------

VIPS = {4: "10.96.0.10", 6: "fd00:10:96::10"}


def write_dns(directory, addresses: list[str], vip: str) -> None:
    manifests.write(
        directory, "dns.yaml",
        manifests.service("dns", vip, [{"name": "dns", "port": 53, "targetPort": 5353,
                                        "protocol": "UDP"}]),
        manifests.endpoint_slice("dns", addresses, [{"name": "dns", "port": 5353,
                                                     "protocol": "UDP"}]))


@integration
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_the_agent_moves_udp_clients_of_a_cluster_ip_off_a_removed_backend(make_lab, tmp_path,
                                                                          family):
    lab = make_lab()
    pods = [lab.add_pod(f"backend-{x}") for x in "abc"]
    for pod in pods:
        pod.start_server([5353], udp=True)
    client_pod = lab.add_pod("client")
    directory = tmp_path / "manifests"
    vip = VIPS[family]

    def address(pod) -> str:
        return pod.ip if family == 4 else pod.ip6

    write_dns(directory, [address(p) for p in pods], vip)
    with AgentRunner(lab, directory) as agent:
        agent.start()
        # the socket LB picks a backend per socket (from its cookie): open sockets until
        # some landed on backend-a (12 miss it with probability (2/3)^12, under 1%)
        clients = [UdpClient(client_pod, vip, 53) for _ in range(12)]
        while not any(c.first == "backend-a:5353" for c in clients):
            assert len(clients) < 40, "no socket ever went to backend-a"
            clients.append(UdpClient(client_pod, vip, 53))
        assert {c.first for c in clients} <= {f"{p.name}:5353" for p in pods}
        on_a = [c for c in clients if c.first == "backend-a:5353"]
        others = [c for c in clients if c.first != "backend-a:5353"]

        direct = UdpClient(client_pod, address(pods[0]), 5353)   # to the pod, not a service
        gone = pods[0]
        write_dns(directory, [address(p) for p in pods[1:]], vip)
        wait_for(lambda: [len(s["backends"]) for s in agent.services()] == [2],
                 what="backend-a out of the kernel", timeout=60.0)
        # the agent closes, by itself, the sockets the LB sent to backend-a for this
        # service, and only those
        wait_for(lambda: "event=stale_udp_sockets_closed" in agent.log(),
                 what="the agent's stale socket sweep", timeout=60.0)
        assert f"count={len(on_a)}" in agent.log()
        for client in on_a:
            assert aborted(client.do("recv"))
            moved = client.do("reconnect")      # connect() again: the socket LB picks anew
            assert moved in ("answer backend-b:5353", "answer backend-c:5353"), moved
        for client in others:
            assert client.do("ask") == f"answer {client.first}"
        assert direct.do("ask") == "answer backend-a:5353", \
            "a socket the LB did not balance is not the agent's to close"
        lab.remove_pod(gone)


# -- fairness and trust (issue 13, A6) ------------------------------------------------------

# Forks N children that each enter a new network namespace and wait; one line per child.
MANY_NAMESPACES = textwrap.dedent("""
    import ctypes, os, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(int(sys.argv[1])):
        if os.fork() == 0:
            if libc.unshare(0x40000000) != 0:        # CLONE_NEWNET
                os._exit(1)
            os.write(1, ("in %s\\n" % os.readlink("/proc/self/ns/net")).encode())
            time.sleep(600)
            os._exit(0)
    time.sleep(600)
""")


@integration
def test_a_pod_with_many_namespaces_does_not_hold_back_another_pods_stale_socket(backends):
    lab, a, _b = backends
    hog, late = lab.add_pod("hog"), lab.add_pod("late")
    walked = [os.path.basename(d) for d, _, _ in os.walk(lab.cgroup)]
    # without fair order the sweep would reach late's namespace after every one of hog's
    assert walked.index("hog") < walked.index("late"), walked
    many = hog.popen([sys.executable, "-c", MANY_NAMESPACES, "200"], stdout=subprocess.PIPE,
                     text=True)
    try:
        created = {many.stdout.readline().split()[1] for _ in range(200)}
        assert len(created) == 200
        stale = UdpClient(late, a.ip, 5353)

        results = stale_sockets.sweep_udp_sockets(lab.cgroup, {(ip(a.ip), 5353)}, workers=1)
    finally:
        lab.processes.stop(many)
        wait_for(lambda: "populated 0" in (hog.cgroup / "cgroup.events").read_text(),
                 what="hog's 200 processes gone (its cgroup can be removed then)", timeout=60.0)

    by_owner: dict[str, list] = {}
    for result in results:
        by_owner.setdefault(result.owner, []).append(result)
    assert len(by_owner["hog"]) == 201           # its pod namespace and the 200 it made
    (swept_late,) = by_owner["late"]
    assert swept_late.destroyed == 1
    # one namespace of each cgroup before the second of any: late's came in the first round
    assert swept_late.order < sorted(r.order for r in by_owner["hog"])[1]
    assert aborted(stale.do("recv"))


@integration
def test_only_sockets_to_removed_backends_come_back_from_the_kernel(backends):
    lab, a, b = backends
    c = lab.add_pod("c")
    stale = UdpClient(c, a.ip, 5353)
    others = [UdpClient(c, a.ip, 5354), UdpClient(c, b.ip, 5353), UdpClient(c, b.ip, 5354)]
    results = stale_sockets.sweep_udp_sockets(lab.cgroup, {(ip(a.ip), 5353)})
    (in_c,) = [r for r in results if r.owner == "c"]
    # the bytecode filter ran in the kernel: the three other connected sockets never came
    assert (in_c.checked, in_c.destroyed) == (1, 1)
    assert aborted(stale.do("recv"))
    assert all(other.do("recv") == "timeout" for other in others)


@integration
def test_a_forged_answer_from_a_process_in_the_namespace_is_ignored(backends):
    """A process with CAP_NET_ADMIN in the namespace can send our sock_diag socket a
    netlink message; an NLMSG_DONE with our next sequence number would end the dump before
    the kernel's answer, hiding the stale socket."""
    lab, a, _b = backends
    c = lab.add_pod("c")
    stale = UdpClient(c, a.ip, 5353)
    (netns,) = [n for n in stale_sockets.find_namespaces(lab.cgroup, False)
                if f"/proc/{stale.process.pid}/ns/net" in n.paths]
    diag, _via = stale_sockets.open_diag_socket(netns)
    forger, _ = stale_sockets.open_diag_socket(netns)
    with diag, forger:
        next_seq = (stale_sockets._Seq._next + 1) & 0xFFFFFFFF
        diag.bind((0, 0))                      # its port id now, not at its first send
        portid = diag.getsockname()[0]
        for fake_type in (stale_sockets.NLMSG_DONE, stale_sockets.NLMSG_DONE):
            forger.sendto(stale_sockets._NLMSGHDR.pack(20, fake_type, 2, next_seq, 0)
                          + b"\0" * 4, (portid, 0))
        result = stale_sockets.SweepResult(netns=netns.key[1])
        found = list(stale_sockets.dump_udp(diag, socket.AF_INET, time.monotonic() + 5,
                                            result=result))
    assert [udp.peer for udp in found] == [(ip(a.ip), 5353)]
    assert result.foreign == 2


@integration
def test_the_sweep_through_the_netns_opener_and_when_the_opener_dies(backends, caplog):
    """Issue 13, A5: the agent enters pods' namespaces only through its opener child; when
    the child dies, the next sweep fails at once with the reason (no hang)."""
    lab, a, _b = backends
    first, second = UdpClient(lab.add_pod("c"), a.ip, 5353), UdpClient(lab.add_pod("d"),
                                                                          a.ip, 5353)
    opener = NetnsOpener.start(lab.cgroup)
    try:
        assert destroy_udp_sockets(lab.cgroup, {(ip(a.ip), 5353)}, door=opener) == 2
        assert aborted(first.do("recv")) and aborted(second.do("recv"))
        # it opens namespace links of processes only, nothing else a request names
        with pytest.raises(OSError, match="not /proc/PID/ns/net"):
            opener.diag_socket(stale_sockets.Netns((0, 0), "", ["/etc/passwd"]),
                               time.monotonic() + 5)

        opener.process.kill()
        opener.process.wait()
        with caplog.at_level(logging.ERROR, logger="agent.datapath.netns_opener"):
            with pytest.raises(NetnsDoorClosed, match="until the agent restarts"):
                destroy_udp_sockets(lab.cgroup, {(ip(a.ip), 5353)}, door=opener)
            with pytest.raises(NetnsDoorClosed):
                destroy_udp_sockets(lab.cgroup, {(ip(a.ip), 5353)}, door=opener)
        assert opener.failures == 2
        assert caplog.text.count("event=netns_opener_gone") == 1
    finally:
        opener.close()
