"""The stale-UDP sweep's pure parts (issue 13, A6): only the kernel's netlink datagrams are
read, namespaces are swept round-robin by the cgroup they were found in, and the dump's
bytecode filter has the shape the kernel's audit accepts."""
from __future__ import annotations

import ipaddress
import socket

from agent.datapath import stale_sockets as sweep
from agent.datapath.stale_sockets import Netns


def done(seq: int, portid: int) -> bytes:
    return sweep._NLMSGHDR.pack(20, sweep.NLMSG_DONE, 2, seq, portid) + b"\0" * 4


def test_a_datagram_from_another_socket_is_dropped_whole():
    # a forged NLMSG_DONE: it would end the dump before the kernel's answer
    forged = done(seq=7, portid=0)
    assert sweep.kernel_messages(forged, (4242, 0)) is None
    assert sweep.kernel_messages(forged, (0, 0)) == [(sweep.NLMSG_DONE, 2, 7, b"\0" * 4)]


def test_the_kernels_datagram_is_split_into_its_messages():
    # the kernel writes our port id in nlmsg_pid; what proves the sender is the address
    both = done(1, 1234) + done(2, 1234)
    assert [m[2] for m in sweep.kernel_messages(both, (0, 0))] == [1, 2]


def netns(ino: int, owner: str) -> Netns:
    return Netns((1, ino), owner, [f"/proc/{ino}/ns/net"])


def test_namespaces_are_swept_round_robin_by_cgroup():
    found = [netns(1, ""), *(netns(100 + i, "hog") for i in range(500)), netns(2, "victim"),
             netns(3, "other"), netns(4, "other")]
    ordered = [n.key[1] for n in sweep.fair_order(found)]
    assert ordered[:4] == [1, 100, 2, 3]             # every cgroup's first, in order seen
    assert ordered[4:6] == [101, 4] and ordered[6:9] == [102, 103, 104]
    assert sorted(ordered) == sorted(n.key[1] for n in found)


def test_the_destination_filter_is_an_or_of_host_conditions():
    v4 = (ipaddress.ip_address("10.0.0.9"), 53)
    v6 = (ipaddress.ip_address("fd00::9"), 5353)
    program = sweep.destination_filter([v4, v6])
    op = sweep._BC_OP
    # 10.0.0.9:53: true -> the JMP after it; false -> past the JMP, to the next condition
    assert op.unpack_from(program, 0) == (sweep.INET_DIAG_BC_D_COND, 16, 20)
    assert sweep._HOSTCOND.unpack_from(program, 4) == (socket.AF_INET, 32, 53)
    assert program[12:16] == v4[0].packed
    # the JMP goes to the end (accept)
    assert op.unpack_from(program, 16) == (sweep.INET_DIAG_BC_JMP, 4, 4 + 28)
    # the last condition: true -> the end; false -> 4 past the end (reject)
    assert op.unpack_from(program, 20) == (sweep.INET_DIAG_BC_D_COND, 28, 32)
    assert sweep._HOSTCOND.unpack_from(program, 24) == (socket.AF_INET6, 128, 5353)
    assert program[32:] == v6[0].packed and len(program) == 48


def test_many_backends_are_split_over_several_filters():
    wanted = {(ipaddress.ip_address(f"10.1.{i // 256}.{i % 256}"), 53) for i in range(2500)}
    programs = list(sweep.destination_filters(wanted))
    assert len(programs) == 3 and all(len(p) < 1 << 16 for p in programs)
