"""The command line as a user runs it: the installed `bpfproxy` console script, its flags,
its exit codes, and `services -o json` in the shape README.md's "Command line" promises."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
BPFPROXY = str(Path(sys.executable).parent / "bpfproxy")


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([BPFPROXY, *args], capture_output=True, text=True, timeout=timeout)


def test_console_script_is_installed():
    assert Path(BPFPROXY).exists(), "make install must create .venv/bin/bpfproxy"
    done = run("--help")
    assert done.returncode == 0
    for command in ("agent", "status", "services", "backends", "stats", "watch", "cleanup"):
        assert command in done.stdout


# A value for each placeholder the README's command line uses; a new placeholder needs one.
SAMPLE_VALUES = {
    "DIR": "/tmp/bpfp-dir", "CGROUP2_DIR": "/sys/fs/cgroup/bpfp", "FILE": "/tmp/bpfp-file",
    "NAME": "bpfp-node", "IP[,IP]": "10.0.0.1,fd00::1", "IF[,IF]": "eth0,eth1",
    "CIDR[,CIDR]": "10.0.0.0/8,fd00::/64", "ADDR": "127.0.0.1:9999", "SECONDS": "7.5",
    "N": "4099", "PRIME": "4099", "FRACTION": "0.01", "LOW-HIGH": "30000-32767",
}


def documented_agent_flags() -> list[tuple[str, str]]:
    """(flag, placeholder) for every flag of `bpfproxy agent` in README.md's command line."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Command line\n", 1)[1].split("```\n", 2)[1]
    lines = block.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("bpfproxy agent "))
    end = next(i for i in range(first + 1, len(lines)) if lines[i].startswith("bpfproxy "))
    tokens = []
    for token in " ".join(lines[first:end]).split():
        token = token.removeprefix("[") if token.startswith("[--") else token
        tokens.append(token.removesuffix("]") if "[" not in token else token)
    return [(token, tokens[i + 1] if i + 1 < len(tokens) else "")
            for i, token in enumerate(tokens) if token.startswith("--")]


def agent_options() -> dict[str, argparse.Action]:
    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction))
    return {flag: action for action in commands.choices["agent"]._actions
            for flag in action.option_strings if flag.startswith("--") and flag != "--help"}


def test_every_documented_agent_flag_is_accepted():
    documented = documented_agent_flags()
    options = agent_options()
    assert len(documented) >= 20, documented        # the block was found and read
    for flag, placeholder in documented:
        action = options.get(flag)
        assert action is not None, f"README documents {flag}, which the agent does not take"
        values = placeholder.split("|") if "|" in placeholder else [SAMPLE_VALUES[placeholder]]
        for value in values:
            args = build_parser().parse_args(["agent", flag, value])
            assert getattr(args, action.dest) == (action.type or str)(value), (flag, value)
    # and the other way: the README's command line lists every flag the agent takes
    assert set(options) - {flag for flag, _ in documented} == set()


def test_the_other_commands_take_their_flags():
    assert build_parser().parse_args(["services", "-o", "json"]).output == "json"
    assert build_parser().parse_args(["cleanup", "--cgroup", "/c", "--bpffs", "/b"]).bpffs == \
        Path("/b")


def test_kube_source_with_a_missing_kubeconfig_fails_fast():
    done = run("agent", "--kubeconfig", "/nonexistent")
    assert done.returncode == 2
    assert "--kubeconfig /nonexistent" in done.stderr


def test_api_flags_and_outputs_are_accepted():
    args = build_parser().parse_args([
        "agent", "--manifests", "/tmp", "--api", "127.0.0.1:9443", "--api-tls-cert", "/c",
        "--api-tls-key", "/k", "--api-tls-ca", "/ca"])
    assert (args.api_tls_cert, args.api_tls_key, args.api_tls_ca) == \
        (Path("/c"), Path("/k"), Path("/ca"))
    defaults = build_parser().parse_args(["agent", "--manifests", "/tmp"])
    assert (defaults.metrics, defaults.healthz) == ("127.0.0.1:10249", "0.0.0.0:10256")
    for command in ("status", "services", "backends", "stats", "watch"):
        for output in ("table", "json", "yaml"):
            assert build_parser().parse_args([command, "-o", output]).output == output
    assert build_parser().parse_args(["stats", "-n", "ns", "--name", "web", "--address",
                                      "10.0.0.1"]).namespace == "ns"


@pytest.mark.parametrize("command", ["services", "backends", "stats", "watch"])
def test_api_commands_without_an_agent_exit_1(tmp_path, command):
    done = run(command, "--api", f"unix://{tmp_path}/none.sock")
    assert done.returncode == 1
    assert "no agent answering" in done.stderr


def test_status_without_an_agent_fails(tmp_path):
    done = run("status", "--api", f"unix://{tmp_path}/none.sock")
    assert done.returncode == 1
    assert "not synced" in done.stderr


def test_cleanup_of_nothing_succeeds(tmp_path):
    done = run("cleanup", "--bpffs", str(tmp_path / "absent"))
    assert done.returncode == 0
    assert "nothing to remove" in done.stdout


@pytest.mark.integration
def test_agent_services_json_as_a_script_reads_it(make_lab, tmp_path):
    from lab import manifests
    from lab.agent_runner import AgentRunner

    lab = make_lab()
    backend = lab.add_pod("backend")
    directory = tmp_path / "m"
    shutil.copytree(REPO / "examples" / "manifests", directory)
    manifests.write(directory, "one.yaml",
                    manifests.service("one", "10.96.1.1", [{"name": "p", "port": 81,
                                                             "targetPort": 8081}]),
                    manifests.endpoint_slice("one", [backend.ip],
                                             [{"name": "p", "port": 8081}]))
    with AgentRunner(lab, directory) as agent:
        agent.start()
        done = run("status", "--api", agent.api)
        assert done.returncode == 0 and done.stdout.startswith("synced")
        entries = json.loads(run("services", "--api", agent.api, "-o", "json").stdout)
        by_name = {(e["namespace"], e["name"], e["port_name"]): e for e in entries}
        assert set(by_name) == {("demo", "web", "http"), ("demo", "web", "dns"),
                                ("demo", "no-pods", ""), ("lab", "one", "p")}
        for entry in entries:
            assert set(entry) == {"namespace", "name", "port_name", "protocol", "frontends",
                                  "backends"}
            for f in entry["frontends"]:
                assert set(f) == {"address", "port", "kind"}
            for b in entry["backends"]:
                assert set(b) == {"address", "port", "state"}
        assert by_name[("lab", "one", "p")] == {
            "namespace": "lab", "name": "one", "port_name": "p", "protocol": "TCP",
            "frontends": [{"address": "10.96.1.1", "port": 81, "kind": "ClusterIP"}],
            "backends": [{"address": backend.ip, "port": 8081, "state": "ready"}]}
        assert by_name[("demo", "no-pods", "")]["backends"] == []
        table = run("services", "--api", agent.api).stdout
        assert "lab/one" in table and "connections refused" in table
