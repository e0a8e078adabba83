"""The lab itself, with real traffic and no agent: pods reach each other's addresses, the node
is sealed off from the host, and every namespace, cgroup and process goes away afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lab import Lab, cleanup_stale
from lab import netns as lab_netns
from lab.cgroups import cgroup2_mount
from lab.cleanup import workdir
from lab.processes import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def leftovers(lab_name: str) -> list[str]:
    """Namespaces and cgroup dirs of lab_name that still exist."""
    found = [n for n in lab_netns.names() if n.startswith(f"bpfp-{lab_name}-")]
    cgroup = cgroup2_mount() / f"bpfp-{lab_name}"
    others = [path for path in (cgroup, workdir(lab_name)) if path.exists()]
    return found + [str(path) for path in others]


@pytest.fixture
def pods(lab):
    """Two server pods (TCP and UDP on 80 and 8080) and a client pod."""
    a, b, client = lab.add_pod("pod-a"), lab.add_pod("pod-b"), lab.add_pod("client")
    for server in (a, b):
        server.start_server(ports=[80, 8080], udp=True)
    return a, b, client


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", ["tcp", "udp", "udp_connected"])
def test_each_pod_address_reaches_that_pod(pods, mode, family):
    a, b, client = pods
    for server in (a, b):
        address = server.ip if family == 4 else server.ip6
        for port in (80, 8080):
            result = getattr(client, mode)(address, port, count=20)
            assert result.answers == {f"{server.name}:{port}": 20}, result
            assert not result.errors
            assert (result.wrong_source, result.wrong_peer) == (0, 0)
            assert result.backends() == {server.name}


def test_closed_port_is_refused(pods):
    _a, b, client = pods
    assert client.tcp(b.ip, 81, count=3).errors == {"ECONNREFUSED": 3}
    assert client.udp_connected(b.ip, 81, count=3).errors == {"ECONNREFUSED": 3}


def test_many_short_connections(pods):
    a, _b, client = pods
    started = time.monotonic()
    result = client.tcp(a.ip, 80, count=500)
    assert result.answered == 500, result
    print(f"500 connections in {time.monotonic() - started:.2f} s")   # a figure, not a limit


def test_node_is_sealed_off_from_the_host(lab, pods):
    assert lab.node_run(["ip", "route", "show", "default"], check=True).stdout == ""
    assert lab.node_run(["ip", "-6", "route", "show", "default"], check=True).stdout == ""
    links = lab.node_run(["ip", "-o", "link", "show"], check=True).stdout
    names = {line.split(": ")[1].split("@")[0] for line in links.splitlines()}
    assert names == {"lo", "bpfp-br0"} | {pod.node_veth for pod in lab.pods.values()}
    # Pods go everywhere through the node, and the node routes nothing out.
    _a, _b, client = pods
    route = client.run(["ip", "route", "show", "default"], check=True).stdout
    assert route.split()[:3] == ["default", "via", lab.node_ip]
    route6 = client.run(["ip", "-6", "route", "show", "default"], check=True).stdout
    assert route6.split()[:3] == ["default", "via", lab.node_ip6]
    assert client.ip6 == lab.ip6_of(client.ip)     # 10.244.1.N <-> fd00:10:244:1::N


def test_unrewritten_service_address_fails_fast(pods):
    _a, _b, client = pods
    # An error from the network, not the client's 3 s timeout (which would read "timeout").
    result = client.tcp("10.96.0.10", 80, count=3, timeout=3)
    assert result.errors == {"EHOSTUNREACH": 3}, result
    result = client.tcp("fd00:10:96::10", 80, count=3, timeout=3)
    assert result.errors == {"ENETUNREACH": 3}, result      # ICMPv6 "no route"


def test_commands_run_in_the_pod_netns_and_cgroup(lab, pods):
    a, _b, _client = pods
    assert a.ip in a.run(["ip", "-o", "addr", "show", "eth0"], check=True).stdout
    cgroup_line = a.run(["cat", "/proc/self/cgroup"], check=True).stdout.splitlines()[-1]
    assert cgroup_line == f"0::/bpfp-{lab.name}/pod-a"
    node_cgroup = lab.node_run(["cat", "/proc/self/cgroup"], check=True).stdout
    assert f"bpfp-{lab.name}" not in node_cgroup  # the agent is not one of the pods


def test_timeline_shows_when_a_backend_goes_away(lab, pods):
    a, _b, client = pods
    traffic = client.start_client("tcp", a.ip, 80, duration=60, interval=0.05, timeout=0.3,
                                  timeline=True, until_stopped=True)  # fmt: skip
    traffic.wait_started()
    lab.remove_pod(a)
    gone = client.tcp(a.ip, 80, count=3, timeout=0.3)   # meanwhile the running client fails too
    result = traffic.stop()
    assert gone.answered == 0, gone
    outcomes = [what for _t, what in result.timeline]
    first_error = next(i for i, what in enumerate(outcomes) if what != "pod-a:80")
    assert first_error > 0 and "pod-a:80" not in outcomes[first_error:]
    assert result.answered == first_error


def test_a_stopped_client_makes_its_last_request_after_the_stop(pods):
    """RunningClient.stop() orders: the client's last request begins after the stop, also
    when the client was idle between two requests then (what tests that check that traffic
    ran past an event rely on)."""
    a, _b, client = pods
    traffic = client.start_client("tcp", a.ip, 80, duration=60, interval=2.0, timeline=True,
                                  until_stopped=True)
    traffic.wait_started()
    stopped_at = time.monotonic()       # within the 2 s pause after its first request
    result = traffic.stop()
    assert result.errors == {} and result.answered >= 2, result
    assert result.started + result.timeline[-1][0] > stopped_at


def test_remove_pod_deletes_its_namespace_and_cgroup_and_frees_its_ip(lab, pods):
    a, _b, _client = pods
    server = a.servers[0]
    lab.remove_pod(a)
    assert server.returncode is not None
    assert a.netns not in lab_netns.names()
    assert not a.cgroup.exists()
    assert "pod-a" not in lab.pods
    assert lab.add_pod("pod-c").ip == a.ip


def test_teardown_when_the_body_raises(new_lab_name):
    with pytest.raises(RuntimeError, match="boom"), Lab(new_lab_name) as lab:
        pod = lab.add_pod("web")
        server = pod.start_server(ports=[80])
        assert leftovers(new_lab_name)
        raise RuntimeError("boom")
    assert server.returncode is not None
    assert leftovers(new_lab_name) == []


LAB_IN_A_CHILD = textwrap.dedent(
    """
    import sys, time
    from lab import Lab
    with Lab(sys.argv[1]) as lab:
        lab.add_pod("web").start_server(ports=[80])
        print("up", flush=True)
        time.sleep(60)
    """
)


def start_lab_in_a_child(name: str) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", LAB_IN_A_CHILD, name],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO_ROOT},
    )
    try:
        assert child.stdout.readline().strip() == "up"
    except BaseException:
        child.kill()
        child.wait()
        raise
    return child


def test_sigterm_tears_the_lab_down(new_lab_name):
    child = start_lab_in_a_child(new_lab_name)
    try:
        server_pids = _cgroup_pids(new_lab_name, "web")
        assert server_pids
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=15) != 0
        assert leftovers(new_lab_name) == []
        assert not any(os.path.exists(f"/proc/{pid}") for pid in server_pids)
    finally:
        child.kill()
        child.wait()
        cleanup_stale(lab_names={new_lab_name})


def test_cleanup_stale_after_a_crash(new_lab_name):
    child = start_lab_in_a_child(new_lab_name)
    try:
        child.kill()  # no teardown at all
        child.wait(timeout=10)
        assert leftovers(new_lab_name)
        # The pod server died with the lab process (parent-death signal).
        deadline = time.monotonic() + 5
        while _cgroup_pids(new_lab_name, "web") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _cgroup_pids(new_lab_name, "web") == []
    finally:
        removed = cleanup_stale(lab_names={new_lab_name})
    assert f"netns bpfp-{new_lab_name}-node" in removed
    assert leftovers(new_lab_name) == []


def test_cleanup_stale_spares_a_running_lab(lab):
    lab.add_pod("web")
    assert cleanup_stale(lab_names={lab.name}) == []
    assert len(leftovers(lab.name)) == 4  # node, pod, cgroup, workdir


def test_cleanup_stale_touches_only_the_bpfp_prefix():
    with pytest.raises(ValueError):
        cleanup_stale(prefix="")


def _cgroup_pids(lab_name: str, pod: str) -> list[str]:
    procs = cgroup2_mount() / f"bpfp-{lab_name}" / pod / "cgroup.procs"
    return procs.read_text().split() if procs.exists() else []
