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
