"""The node's ephemeral port range against the ports SNATed flows take."""
from __future__ import annotations

import logging

import pytest

from agent.datapath.tc import check_snat_ports


@pytest.mark.parametrize(("ephemeral", "clear"), [
    ("32768\t60999", True),       # Linux's default: below 61000-65535
    ("1024\t65535", False),       # widened over them
    ("61500\t62000", False),      # inside them
    ("20000\t30000", True),
])
def test_an_ephemeral_range_reaching_the_snat_ports_is_reported(tmp_path, caplog, ephemeral,
                                                                 clear):
    sysctl = tmp_path / "ip_local_port_range"
    sysctl.write_text(ephemeral + "\n")
    with caplog.at_level(logging.WARNING, logger="agent.datapath.tc"):
        assert check_snat_ports(61000, 65535, sysctl) is clear
    assert ("event=snat_ports_overlap" in caplog.text) is not clear


# --- the SNAT ports are reserved from the node's own sockets (issue 14.4) ---------------------

@pytest.mark.parametrize(("before", "after"), [
    ("", "61000-65535"),
    ("1000,8080-8090", "1000,8080-8090,61000-65535"),      # others' entries stay
    ("60990-61005,65000", "60990-65535"),                    # overlapping ones merge
    ("60999", "60999-65535"),                                # adjacent too
])
def test_snat_ports_are_reserved_with_what_was_there(tmp_path, caplog, before, after):
    from agent.datapath.tc import reserve_snat_ports
    sysctl = tmp_path / "ip_local_reserved_ports"
    sysctl.write_text(before + "\n")
    with caplog.at_level(logging.INFO, logger="agent.datapath.tc"):
        assert reserve_snat_ports(61000, 65535, sysctl)
    assert sysctl.read_text() == after + "\n"
    assert "event=snat_ports_reserved ports=61000-65535" in caplog.text


def test_ports_already_reserved_are_not_written_again(tmp_path):
    from agent.datapath.tc import reserve_snat_ports
    sysctl = tmp_path / "ip_local_reserved_ports"
    sysctl.write_text("1-60000,60001-65535\n")        # covers them; a write would merge it
    assert reserve_snat_ports(61000, 65535, sysctl)
    assert sysctl.read_text() == "1-60000,60001-65535\n"


def test_an_unwritable_sysctl_is_reported_not_fatal(tmp_path, caplog):
    from agent.datapath.tc import reserve_snat_ports
    missing = tmp_path / "absent" / "ip_local_reserved_ports"
    with caplog.at_level(logging.WARNING, logger="agent.datapath.tc"):
        assert not reserve_snat_ports(61000, 65535, missing)
    assert "event=snat_ports_not_reserved" in caplog.text
