"""The agent's --config file: every field reaches its flag, flags win, bad files fail fast
naming the field (and the agent exits 2 before touching the kernel)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent import config
from agent.cli import build_parser

REPO = Path(__file__).resolve().parents[2]

FULL = {
    "apiVersion": "bpfproxy.io/v1alpha1", "kind": "BpfProxyConfiguration",
    "nodeName": "node-a", "nodeIP": ["10.0.0.5", "fd00::5"],
    "nodePortAddresses": ["10.0.0.0/8"], "interfaces": ["eth0", "eth1"],
    "cgroup": "/sys/fs/cgroup", "bpffs": "/sys/fs/bpf/bpfproxy",
    "api": "unix:///run/bpfproxy/api.sock", "metrics": "0.0.0.0:10249",
    "healthz": "0.0.0.0:10256", "minSyncPeriod": "1s", "syncPeriod": "1m30s",
    "lbAlgorithm": "maglev", "maglevTableSize": 16381, "acceleration": "best-effort",
    "nodeportMode": "hybrid",
    "conntrack": {"maxEntries": 131072, "tcpTimeout": "24h", "tcpCloseTimeout": 5,
                  "udpTimeout": "500ms"},
    "kubeconfig": "/etc/kubernetes/kubeconfig",
}


def write(tmp_path: Path, document) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document) if not isinstance(document, str) else document)
    return path


def parse_agent(tmp_path: Path, document, *flags: str):
    path = write(tmp_path, document)
    argv = ["agent", "--config", str(path), *flags]
    parser = build_parser()
    return config.apply(parser, argv, parser.parse_args(argv))


def test_every_field_reaches_its_flag(tmp_path):
    args = parse_agent(tmp_path, FULL)
    assert args.node_name == "node-a"
    assert args.node_ip == "10.0.0.5,fd00::5"
    assert args.nodeport_addresses == "10.0.0.0/8"
    assert args.interfaces == "eth0,eth1"
    assert args.cgroup == Path("/sys/fs/cgroup") and args.bpffs == Path("/sys/fs/bpf/bpfproxy")
    assert args.api == "unix:///run/bpfproxy/api.sock"
    assert (args.metrics, args.healthz) == ("0.0.0.0:10249", "0.0.0.0:10256")
    assert (args.min_sync_period, args.sync_period) == (1.0, 90.0)
    assert (args.lb_algorithm, args.maglev_table_size) == ("maglev", 16381)
    assert args.acceleration == "best-effort"
    assert args.nodeport_mode == "hybrid"
    assert args.conntrack_max == 131072
    assert args.conntrack_tcp_timeout == 86400.0
    assert args.conntrack_tcp_close_timeout == 5.0
    assert args.conntrack_udp_timeout == 0.5
    assert args.kubeconfig == Path("/etc/kubernetes/kubeconfig") and args.manifests is None


def test_every_field_is_one_the_agent_has():
    agent_dests = {a.dest for a in config._subparser(build_parser(), "agent")._actions}
    dests = {dest for table in (config.FIELDS, config.MAPS_FIELDS, config.CONNTRACK_FIELDS)
             for dest, _ in table.values()}
    assert dests <= agent_dests, dests - agent_dests


def test_acceleration_is_disabled_unless_asked_and_a_bad_mode_is_refused(tmp_path):
    assert build_parser().parse_args(["agent"]).acceleration == "disabled"
    with pytest.raises(config.ConfigError, match="acceleration: must be one of disabled, "
                                                 "native, best-effort"):
        parse_agent(tmp_path, {**FULL, "acceleration": "generic"})


def test_nodeport_mode_is_snat_unless_asked_and_a_bad_mode_is_refused(tmp_path):
    assert build_parser().parse_args(["agent"]).nodeport_mode == "snat"
    assert build_parser().parse_args(["agent", "--nodeport-mode", "dsr"]).nodeport_mode == "dsr"
    with pytest.raises(config.ConfigError, match="nodeportMode: must be one of snat, dsr, "
                                                 "hybrid"):
        parse_agent(tmp_path, {**FULL, "nodeportMode": "opt"})


def test_flags_on_the_command_line_win(tmp_path):
    args = parse_agent(tmp_path, FULL, "--sync-period", "30", "--lb-algorithm", "random",
                       "--node-name", "node-b", "--conntrack-udp-timeout", "60")
    assert args.sync_period == 30.0 and args.lb_algorithm == "random"
    assert args.node_name == "node-b" and args.conntrack_udp_timeout == 60.0
    assert args.min_sync_period == 1.0            # the file still gives what no flag named


def test_a_flag_equal_to_its_default_still_wins(tmp_path):
    """Explicit, not different-from-default: --sync-period 30 beats the file's 90."""
    args = parse_agent(tmp_path, FULL, "--sync-period", "30")
    assert args.sync_period == 30.0


def test_the_command_lines_source_wins_over_the_files(tmp_path):
    args = parse_agent(tmp_path, FULL, "--manifests", "/srv/manifests")
    assert args.manifests == Path("/srv/manifests") and args.kubeconfig is None
    only_manifests = {k: v for k, v in FULL.items() if k != "kubeconfig"} | {
        "manifests": "/srv/a"}
    args = parse_agent(tmp_path, only_manifests, "--kubeconfig", "/k")
    assert args.kubeconfig == Path("/k") and args.manifests is None


def test_fields_left_out_keep_the_flag_defaults(tmp_path):
    args = parse_agent(tmp_path, {"apiVersion": "bpfproxy.io/v1alpha1",
                                  "kind": "BpfProxyConfiguration", "syncPeriod": None})
    defaults = build_parser().parse_args(["agent"])
    assert vars(args) | {"config": None} == vars(defaults)


BAD = [
    ({"conntrack": {"udpTimeout": "x"}},
     'config: conntrack.udpTimeout: must be a positive number of seconds, got "x"'),
    ({"conntrack": {"tcpTimeout": 0}},
     "config: conntrack.tcpTimeout: must be a positive number of seconds, got 0"),
    ({"conntrack": {"maxEntries": -1}},
     "config: conntrack.maxEntries: must be a positive whole number, got -1"),
    ({"conntrack": {"maxEntries": True}},
     "config: conntrack.maxEntries: must be a positive whole number, got true"),
    ({"conntrack": {"bogus": 1}}, "config: conntrack.bogus: unknown field"),
    ({"conntrack": [1]}, "config: conntrack: must be a mapping"),
    ({"syncPeriod": "10 s"}, "config: syncPeriod: must be a positive number of seconds"),
    ({"syncPeriod": float("nan")}, "config: syncPeriod: must be a positive number"),
    ({"minSyncPeriod": -1}, "config: minSyncPeriod: must be a non-negative number"),
    ({"lbAlgorithm": "roundrobin"},
     'config: lbAlgorithm: must be one of random, maglev, got "roundrobin"'),
    ({"maglevTableSize": 1000}, "config: maglevTableSize: must be a prime between 7"),
    ({"maglevTableSize": 65537}, "config: maglevTableSize: must be a prime between 7"),
    ({"nodeIP": "10.0.0.300"}, "config: nodeIP: must be IP addresses"),
    ({"nodePortAddresses": ["10.0.0.0/33"]}, "config: nodePortAddresses: must be CIDRs"),
    ({"interfaces": [1]}, "config: interfaces: must be a list of strings"),
    ({"nodeName": 5}, "config: nodeName: must be a string, got 5"),
    ({"bpffs": ""}, "config: bpffs: must be a non-empty path"),
    ({"clusterCIDR": "10.0.0.0/8"}, "config: clusterCIDR: unknown field"),
    ({"manifests": "/a", "kubeconfig": "/b"}, "config: manifests, kubeconfig: give one"),
    ({"kind": "KubeProxyConfiguration"},
     'config: kind: must be BpfProxyConfiguration, got "KubeProxyConfiguration"'),
    ({"apiVersion": "v1"}, 'config: apiVersion: must be bpfproxy.io/v1alpha1, got "v1"'),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(":")[1].strip() + "-" + str(i)
                                                      for i, (_, m) in enumerate(BAD)])
def test_an_invalid_field_is_named(tmp_path, change, message):
    document = {"apiVersion": "bpfproxy.io/v1alpha1", "kind": "BpfProxyConfiguration",
                **change}
    with pytest.raises(config.ConfigError) as raised:
        config.load(write(tmp_path, document))
    assert str(raised.value).startswith(message), str(raised.value)


@pytest.mark.parametrize("text,message", [
    ("- a\n- b\n", "config: (top level): must be a mapping"),
    ("key: [unclosed\n", "not valid YAML"),
    ("", "config: (top level): must be a mapping"),
])
def test_a_file_that_is_not_a_configuration_is_refused(tmp_path, text, message):
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(").replace(
            ")", r"\)")):
        config.load(write(tmp_path, text))


def test_an_unreadable_file_is_named(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "absent.yaml")


def test_the_agent_exits_2_with_the_fields_name(tmp_path):
    """Before any BPF or network work: the message is the whole outcome."""
    path = write(tmp_path, {"apiVersion": "bpfproxy.io/v1alpha1",
                            "kind": "BpfProxyConfiguration", "conntrack": {"udpTimeout": "x"}})
    done = subprocess.run([sys.executable, "-m", "agent.cli", "agent", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2
    assert 'config: conntrack.udpTimeout: must be a positive number of seconds, got "x"' in \
        done.stderr



def test_the_snat_port_range_flag_and_field():
    from agent.cli import build_parser, snat_port_range
    assert snat_port_range("61000-65535") == (61000, 65535)
    for bad, why in (("61000", "LOW-HIGH"), ("80-2000", "1024 to 65535"),
                     ("62000-61000", "LOW not above HIGH"), ("61000-61010", "at least 64"),
                     ("x-y", "LOW-HIGH")):
        with pytest.raises(ValueError, match=why):
            snat_port_range(bad)
    assert config.parse({"apiVersion": config.API_VERSION, "kind": config.KIND,
                         "conntrack": {"snatPortRange": "40000-44999"}}) == \
        {"snat_port_range": "40000-44999"}
    args = build_parser().parse_args(["agent", "--snat-port-range", "40000-44999"])
    assert args.snat_port_range == "40000-44999"
    from agent import cli
    args.maglev_table_size, args.map_memory_ratio = 1021, 0.005
    assert cli._check_tc_flags(args) == "" and args.snat_ports == (40000, 44999)
    args.snat_port_range = "1000-2000"
    assert cli._check_tc_flags(args).startswith("--snat-port-range 1000-2000: ports must be")
