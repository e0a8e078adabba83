"""agent/datapath/conntrack.reply_key names a flow's other entry as bpf/nodeport.h's
partner_key does, so the agent's sweep keeps a flow while either of its entries lives."""
from __future__ import annotations

import socket

from agent.datapath import layout
from agent.datapath.conntrack import reply_key


def addr(text: str) -> layout.Addr6:
    return layout.Addr6(int.from_bytes(socket.inet_aton(text), "little"))


def key(src, sport, dst, dport) -> layout.CtKey:
    return layout.CtKey(addr(src), addr(dst), socket.htons(sport), socket.htons(dport), 6, 4, 0)


def value(src, sport, dst, dport, flags) -> layout.CtValue:
    return layout.CtValue(addr(src), addr(dst), socket.htons(sport), socket.htons(dport),
                          flags=flags)


CLIENT, NODE, POD = "172.30.0.100", "172.30.0.11", "10.244.2.2"


def test_an_entry_names_its_partner_by_its_rewrite_swapped():
    forward = key(CLIENT, 40000, NODE, 30080)
    rewrite = value(CLIENT, 40000, POD, 8080, layout.CT_DSR)
    assert bytes(reply_key(forward, rewrite)) == bytes(key(POD, 8080, CLIENT, 40000))


def test_on_a_dsr_backends_node_each_entry_names_the_other_reversed():
    """There the forward entry keeps the packet and the reply entry answers from the
    service: each other's key is the own key reversed, as nodeport.h partner_key."""
    forward = key(CLIENT, 40000, POD, 8080)
    reply = key(POD, 8080, CLIENT, 40000)
    keep = value(CLIENT, 40000, POD, 8080, layout.CT_DSR_BACKEND)
    answer = value(NODE, 30080, CLIENT, 40000, layout.CT_DSR_BACKEND | layout.CT_REPLY)
    assert bytes(reply_key(forward, keep)) == bytes(reply)
    assert bytes(reply_key(reply, answer)) == bytes(forward)
