"""The bench's C load generator between two lab pods: every client mode completes
transactions without errors, and errors (a closed port) are counted, never fatal."""

from __future__ import annotations

import signal
import subprocess

import pytest

from bench import loadgen

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PORTS = (7000, 7001)
CLOSED_PORT = 7009
DURATION = 1.0


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    return loadgen.build(tmp_path_factory.mktemp("loadgen"))


@pytest.fixture
def pods(make_lab, binary):
    """A pod running `loadgen server` on PORTS, and a client pod."""
    lab = make_lab()
    server_pod, client = lab.add_pod("server"), lab.add_pod("client")
    argv = [str(binary), "server"]
    for port in PORTS:
        argv += ["--port", str(port)]
    log = lab.workdir / "loadgen-server.log"
    with open(log, "w") as stderr:
        server = server_pod.popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True)
    if not loadgen.wait_ready(server):
        lab.processes.stop(server)
        raise RuntimeError(f"loadgen server not ready: {log.read_text()}")
    return server_pod, client, server


def run_client(client, binary, mode, addr, port, *extra) -> dict:
    argv = [str(binary), mode, "--addr", addr, "--port", str(port)]
    argv += ["--duration", str(DURATION), *extra]
    done = client.run(argv, timeout=DURATION + 15)  # a run ends by itself in duration + 1 s
    assert done.returncode == 0, done.stderr
    return loadgen.parse_result(done.stdout)


@pytest.mark.parametrize(
    ("mode", "extra"),
    [
        ("tcp_crr", ()),
        ("tcp_rr", ()),
        ("udp_rr", ()),
        ("udp_rr", ("--connected",)),
        ("udp_crr", ()),
        ("udp_crr", ("--connected",)),
        ("tcp_stream", ()),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, tuple) else value,
)
def test_each_mode_between_pods(pods, binary, mode, extra):
    server_pod, client, _server = pods
    for threads in (1, 2):
        port = PORTS[threads - 1]  # both ports serve
        result = run_client(client, binary, mode, server_pod.ip, port, "--threads", str(threads))
        assert result["mode"] == mode and result["threads"] == threads
        assert result["errors"] == {}, result
        assert result["seconds"] >= DURATION
        if mode == "tcp_stream":
            assert result["bytes"] > 0, result
            print(f"{mode} threads={threads}: {result['bits_per_second'] / 1e9:.2f} Gbit/s")
        else:
            assert result["transactions"] > 0, result
            assert 0 < result["p50_us"] <= result["p90_us"] <= result["p99_us"]
            assert result["p99_us"] <= result["max_us"]
            print(
                f"{mode} {' '.join(extra)} threads={threads}: {result['rate']:.0f}/s "
                f"p50={result['p50_us']}us p99={result['p99_us']}us"
            )


def test_closed_port_counts_refusals(pods, binary):
    server_pod, client, _server = pods
    result = run_client(client, binary, "tcp_crr", server_pod.ip, CLOSED_PORT)
    assert result["transactions"] == 0
    assert set(result["errors"]) == {"ECONNREFUSED"} and result["errors"]["ECONNREFUSED"] > 0
    assert result["p50_us"] is None and result["rate"] == 0
    # A connected UDP socket learns of the refusal from ICMP port unreachable, which the
    # kernel rate-limits (a burst, then about one per second): the rest time out.
    udp = run_client(client, binary, "udp_crr", server_pod.ip, CLOSED_PORT, "--connected")
    assert udp["transactions"] == 0 and udp["errors"].get("ECONNREFUSED", 0) > 0, udp
    assert set(udp["errors"]) <= {"ECONNREFUSED", "ETIMEDOUT"}, udp


def test_unanswered_udp_times_out_within_the_run(pods, binary):
    """Nothing listens: an unconnected socket sees no ICMP error, only its bounded wait."""
    server_pod, client, _server = pods
    result = run_client(client, binary, "udp_rr", server_pod.ip, CLOSED_PORT, "--timeout", "0.2")
    assert result["transactions"] == 0
    assert set(result["errors"]) == {"ETIMEDOUT"}, result
    # Each wait ends at --timeout: a run of several timeouts' length counts several of them
    # (one wait without a bound would count one at most), and the run still lasts its time.
    assert result["errors"]["ETIMEDOUT"] >= 2 and result["seconds"] >= DURATION, result
    print(f"unanswered udp_rr: {result['seconds']:.2f} s for a {DURATION} s run")


def test_a_connect_that_times_out_across_the_warmup_is_counted(pods, binary):
    """The server's SYNs are dropped: tcp_stream's connect() begins in the warmup and times
    out after it, when the window is over. That error is the run's: else a bulk stream that
    measured nothing would not say why (the north-south bench's rows of 0 Gbit/s)."""
    server_pod, client, _server = pods
    for rule in (["add", "table", "inet", "bpfpdrop"],
                 ["add", "chain", "inet", "bpfpdrop", "in",
                  "{ type filter hook input priority 0; }"],
                 ["add", "rule", "inet", "bpfpdrop", "in", "tcp", "dport", str(PORTS[0]),
                  "drop"]):
        server_pod.run(["nft", *rule], check=True)
    result = run_client(client, binary, "tcp_stream", server_pod.ip, PORTS[0], "--warmup",
                        "0.5", "--duration", "0.2", "--timeout", "1")
    assert result["bytes"] == 0 and result["errors"] == {"ETIMEDOUT": 1}, result


def test_a_stream_that_stalls_across_the_window_says_so(pods, binary):
    """The server's data segments are dropped (the handshake and the 1-byte 'S' pass): the
    stream's send() blocks before the warmup ends and nothing is acknowledged in the window.
    The window is measured at its edges all the same, and the run names the stall; before,
    the one send() blocked across the whole window (until --timeout) left it unstarted:
    bytes 0, errors {} (a north-south bench bulk row of 0 Gbit/s saying nothing of why)."""
    server_pod, client, _server = pods
    for rule in (["add", "table", "inet", "bpfpdrop"],
                 ["add", "chain", "inet", "bpfpdrop", "in",
                  "{ type filter hook input priority 0; }"],
                 ["add", "rule", "inet", "bpfpdrop", "in", "tcp", "dport", str(PORTS[0]),
                  "meta", "length", "gt", "100", "drop"]):
        server_pod.run(["nft", *rule], check=True)
    result = run_client(client, binary, "tcp_stream", server_pod.ip, PORTS[0], "--warmup",
                        "0.3", "--duration", "0.3", "--timeout", "1")
    assert result["bytes"] == 0 and result["errors"] == {"STALLED": 1}, result


def test_server_exits_cleanly_on_sigterm(pods):
    server_pod, _client, server = pods
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=5) == 0
    server_pod.lab.processes.forget(server)


def test_build_is_cached(binary):
    assert loadgen.build(binary.parent) == binary
    before = binary.stat().st_mtime_ns
    assert loadgen.build(binary.parent).stat().st_mtime_ns == before


def test_second_server_on_the_same_port_fails(pods, binary):
    """SO_REUSEPORT would let it share the port and take half the traffic; it must refuse."""
    server_pod, _client, _server = pods
    done = server_pod.run([str(binary), "server", "--port", str(PORTS[0])], timeout=10)
    assert done.returncode == 1 and "Address already in use" in done.stderr, done
