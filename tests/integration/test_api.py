"""The status API, metrics and health of a real agent in a lab: each RPC and CLI command
answers with the real kernel state, and counters match the traffic the test sends.

One lab and agent serve the read-only tests of this module (labs named a8...); tests that
break the node (programs detached) or need other flags build their own."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import yaml

from agent.api.generated import agent_pb2, agent_pb2_grpc
from lab import Lab, manifests
from lab.agent_runner import AgentRunner


def derived_size(field: str) -> int:
    """What an agent given no size flag makes a map on this node."""
    from agent.datapath import sizing
    return sizing.derive(sizing.node_memory_bytes(), sizing.possible_cpus())[field]


pytestmark = pytest.mark.integration

VIP, EMPTY_VIP, NODEPORT_VIP = "10.96.0.10", "10.96.0.20", "10.96.0.30"
WEB_PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
             {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]
SLICE_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"},
               {"name": "dns", "port": 5353, "protocol": "UDP"}]
OBSERVE = ("--metrics", "127.0.0.1:10249", "--healthz", "127.0.0.1:10256")
_names = (f"a8{os.getpid():x}x{n}" for n in itertools.count(1))


def write_services(directory: Path, backends: list[str], extra: tuple = ()) -> None:
    manifests.write(directory, "web.yaml", manifests.service("web", VIP, WEB_PORTS),
                    manifests.endpoint_slice("web", backends, SLICE_PORTS))
    manifests.write(directory, "empty.yaml", manifests.service(
        "empty", EMPTY_VIP, [{"name": "", "port": 80, "targetPort": 8080}]))
    manifests.write(directory, "np.yaml", manifests.service(
        "np", NODEPORT_VIP, [{"name": "http", "port": 80, "targetPort": 8080,
                              "nodePort": 30080}], service_type="NodePort"),
        manifests.endpoint_slice("np", backends[:1], [{"name": "http", "port": 8080}]),
        *extra)


class Node:
    """A lab, two backend pods, a client pod and a running agent with metrics and health."""

    def __init__(self, lab: Lab, agent: AgentRunner, backends, client, directory: Path):
        self.lab, self.agent, self.backends, self.client = lab, agent, backends, client
        self.directory = directory
        self.channel = grpc.insecure_channel(agent.api)
        self.stub = agent_pb2_grpc.AgentStub(self.channel)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return self.agent.cli(*args, "--api", self.agent.api, check=False)

    def http_get(self, url: str) -> tuple[int, str]:
        """GET from inside the node namespace (metrics and health listen on its loopback)."""
        script = ("import sys, urllib.request, urllib.error\n"
                  "try:\n r = urllib.request.urlopen(sys.argv[1], timeout=10)\n"
                  " code, body = r.status, r.read()\n"
                  "except urllib.error.HTTPError as e:\n code, body = e.code, e.read()\n"
                  "print(code); sys.stdout.write(body.decode())\n")
        done = self.lab.node_run([sys.executable, "-c", script, url], check=True)
        code, _, body = done.stdout.partition("\n")
        return int(code), body

    def stats(self, name: str, port_name: str) -> agent_pb2.ServiceStats:
        reply = self.stub.GetStats(agent_pb2.GetStatsRequest(
            filter=agent_pb2.ServiceFilter(namespace="lab", name=name)), timeout=10)
        return next(s for s in reply.services if s.port_name == port_name)


def open_node(tmp: Path, extra_args: tuple[str, ...] = OBSERVE, backends: int = 2):
    lab = Lab(next(_names))
    lab.open()
    agent = None
    try:
        pods = [lab.add_pod(f"backend-{c}") for c in "ab"[:backends]]
        for pod in pods:
            pod.start_server([8080, 5353], udp=True)
        client = lab.add_pod("client")
        directory = tmp / "manifests"
        write_services(directory, [p.ip for p in pods])
        # --node-ip: np's NodePort is served on the node's address
        agent = AgentRunner(lab, directory, extra_args=(*extra_args, "--node-ip", lab.node_ip))
        agent.start()
        return Node(lab, agent, pods, client, directory)
    except BaseException:
        if agent is not None:
            agent.close()
        lab.close()
        raise


def close_node(node: Node) -> None:
    try:
        node.channel.close()
        node.agent.close()
    finally:
        node.lab.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = open_node(tmp_path_factory.mktemp("api"))
    try:
        yield n
    finally:
        close_node(n)


# ---- GetStatus / status ----------------------------------------------------------------

def test_status_names_the_programs_maps_and_source_the_kernel_holds(node):
    status = node.stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=10)
    assert status.synced and status.version and status.node_name == "bpfp-node"
    assert status.source_state.kind == "manifests"
    assert status.source_state.location == str(node.directory)
    assert status.source_state.complete
    assert status.last_sync_unix > 0 and status.syncs >= 1 and status.sync_errors == 0
    hooks = {(p.name, p.hook): p for p in status.programs}
    assert ("bpfp_connect4", "CGROUP_INET4_CONNECT") in hooks
    assert all(p.attached and p.program_id > 0 and p.target == str(node.lab.cgroup)
               for p in status.programs)
    maps = {m.name: m for m in status.maps}
    # IPv4 frontends: web (2 ports), empty (1), np ClusterIP + NodePort on the node's IPs
    assert maps["bpfp_svc4_v1"].entries == status.frontends
    assert maps["bpfp_slot4_v1"].entries == status.backends
    assert maps["bpfp_stats_v1"].type == "lru_percpu_hash"
    # sized from this node's memory (no --max-stats given); each map says what it holds
    assert maps["bpfp_stats_v1"].max_entries == derived_size("max_stats")
    assert maps["bpfp_ct_v1"].memory_bytes >= 160 * maps["bpfp_ct_v1"].max_entries
    assert set(status.errors) >= {"sync", "invalid_request", "events_dropped"}

    done = node.cli("status", "-o", "json")
    assert done.returncode == 0
    printed = json.loads(done.stdout)
    assert printed["synced"] and printed["frontends"] == status.frontends
    assert {m["name"] for m in printed["maps"]} == set(maps)
    table = node.cli("status").stdout
    assert table.startswith("synced:") and "bpfp_connect4" in table and "bpfp_svc4_v1" in table
    assert yaml.safe_load(node.cli("status", "-o", "yaml").stdout)["synced"] is True


# ---- services, backends ----------------------------------------------------------------

def test_services_filters_get_service_and_pages(node):
    everything = node.stub.ListServices(agent_pb2.ListServicesRequest(), timeout=10).services
    names = {(s.namespace, s.name, s.port_name) for s in everything}
    assert {("lab", "web", "http"), ("lab", "web", "dns"), ("lab", "empty", ""),
            ("lab", "np", "http")} <= names
    by_vip = node.stub.ListServices(agent_pb2.ListServicesRequest(
        filter=agent_pb2.ServiceFilter(address=VIP)), timeout=10).services
    assert {s.port_name for s in by_vip} == {"http", "dns"}
    assert {s.type for s in everything if s.name == "np"} == {"NodePort"}

    ports = node.stub.GetService(agent_pb2.GetServiceRequest(namespace="lab", name="web"),
                                 timeout=10).ports
    assert sorted(p.port_name for p in ports) == ["dns", "http"]
    assert {b.address for p in ports for b in p.backends} == {p.ip for p in node.backends}

    # one entry per page, following the tokens: the same entries, none twice
    seen, token = [], ""
    while True:
        page = node.stub.ListServices(agent_pb2.ListServicesRequest(page_size=1,
                                                                    page_token=token))
        assert len(page.services) <= 1
        seen += [(s.namespace, s.name, s.port_name, s.family) for s in page.services]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == len(everything)

    entries = json.loads(node.cli("services", "-o", "json", "-n", "lab").stdout)
    assert yaml.safe_load(node.cli("services", "-o", "yaml", "-n", "lab").stdout) == entries
    assert {(e["name"], e["port_name"]) for e in entries} >= {("web", "http"), ("np", "http")}
    table = node.cli("services", "--name", "web").stdout
    assert "lab/web" in table and "lab/empty" not in table and "CONNS" in table


def test_backends_lists_each_backend_of_each_port_with_its_state(node):
    rows = node.stub.ListBackends(agent_pb2.ListBackendsRequest(
        filter=agent_pb2.ServiceFilter(namespace="lab", name="web")), timeout=10).backends
    assert {(r.port_name, r.address, r.port, r.state) for r in rows} == \
        {(n, p.ip, port, "ready") for p in node.backends
         for n, port in (("http", 8080), ("dns", 5353))}
    one = node.backends[0].ip
    by_backend = node.stub.ListBackends(agent_pb2.ListBackendsRequest(
        filter=agent_pb2.ServiceFilter(address=one)), timeout=10).backends
    assert {r.address for r in by_backend} == {one}
    assert {r.name for r in by_backend} == {"web", "np"}

    done = node.cli("backends", "--name", "web", "-o", "json")
    assert done.returncode == 0
    printed = json.loads(done.stdout)
    assert {(r["address"], r["port"]) for r in printed} == {(r.address, r.port) for r in rows}
    assert all(r["counters"] is not None for r in printed)
    assert "ready" in node.cli("backends", "--name", "web").stdout


# ---- counters --------------------------------------------------------------------------

def test_stats_count_the_connections_and_refusals_the_test_made(node):
    before_http = node.stats("web", "http")
    before_dns = node.stats("web", "dns")
    before_empty = node.stats("empty", "")
    tcp = node.client.tcp(VIP, 80, count=40)
    assert tcp.errors == {}
    udp = node.client.udp(VIP, 53, count=30)      # unconnected: one count per datagram
    assert udp.errors == {}
    refused = node.client.tcp(EMPTY_VIP, 80, count=3)
    assert refused.answered == 0

    http, dns, empty = node.stats("web", "http"), node.stats("web", "dns"), \
        node.stats("empty", "")
    assert http.counters.connections - before_http.counters.connections == 40
    assert dns.counters.connections - before_dns.counters.connections == 30
    assert empty.counters.refused - before_empty.counters.refused == 3
    assert http.counters.refused == before_http.counters.refused
    # per backend: exactly the answers each pod gave
    by_pod = {p.ip: p.name for p in node.backends}
    answered = {name: tcp.answers[f"{name}:8080"] for name in by_pod.values()}
    before = {b.address: b.counters.connections for b in before_http.backends}
    assert {by_pod[b.address]: b.counters.connections - before[b.address]
            for b in http.backends} == answered

    printed = json.loads(node.cli("stats", "--name", "web", "-o", "json").stdout)
    http_json = next(s for s in printed if s["port_name"] == "http")
    assert http_json["counters"]["connections"] == http.counters.connections
    table = node.cli("stats", "--name", "web").stdout
    assert "lab/web:http/TCP" in table and "->" in table

    # the same counters in Prometheus, both families of the port summed
    code, text = node.http_get("http://127.0.0.1:10249/metrics")
    assert code == 200
    line = ('bpfproxy_service_connections_total{namespace="lab",port_name="http",'
            'protocol="TCP",service="web"}')
    value = next(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line))
    assert value == http.counters.connections


def test_filters_that_cannot_be_right_are_refused_with_a_message(node):
    bad = [agent_pb2.ListServicesRequest(filter=agent_pb2.ServiceFilter(namespace="Bad_NS")),
           agent_pb2.ListServicesRequest(filter=agent_pb2.ServiceFilter(address="10.0.0.300")),
           agent_pb2.ListServicesRequest(page_token="not-a-token"),
           agent_pb2.ListServicesRequest(page_size=-1)]
    before = node.stub.GetStatus(agent_pb2.GetStatusRequest()).errors["invalid_request"]
    for request in bad:
        with pytest.raises(grpc.RpcError) as caught:
            node.stub.ListServices(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        node.stub.GetStats(agent_pb2.GetStatsRequest(
            filter=agent_pb2.ServiceFilter(name="x" * 64)), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as caught:
        node.stub.GetService(agent_pb2.GetServiceRequest(namespace="lab", name="nosuch"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        node.stub.GetService(agent_pb2.GetServiceRequest(namespace="lab"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = node.stub.GetStatus(agent_pb2.GetStatusRequest()).errors["invalid_request"]
    assert after - before == len(bad) + 2

    done = node.cli("services", "-n", "Bad_NS")
    assert done.returncode == 2 and "filter.namespace" in done.stderr
    assert node.cli("services", "--name", "nosuch").returncode == 3
    assert node.cli("backends", "--address", "nonsense").returncode == 2
    # the agent keeps serving
    assert node.cli("status").returncode == 0


# ---- health, reflection, metrics -------------------------------------------------------

def test_grpc_health_and_reflection_are_served(node):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(node.channel)
    for service in ("", "bpfproxy.v1.Agent"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service),
                            timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(node.channel)
    reply = next(reflect.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    listed = {s.name for s in reply.list_services_response.service}
    assert {"bpfproxy.v1.Agent", "grpc.health.v1.Health"} <= listed


def test_metrics_and_healthz_tell_what_the_api_tells(node):
    status = node.stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=10)
    code, text = node.http_get("http://127.0.0.1:10249/metrics")
    assert code == 200
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples["bpfproxy_sync_proxy_rules_duration_seconds_count"] >= 1
    assert samples["bpfproxy_frontends"] == status.frontends
    assert samples["bpfproxy_backend_slots"] == status.backends
    assert samples['bpfproxy_bpf_map_entries{map="bpfp_svc4_v1"}'] == status.frontends
    assert samples['bpfproxy_bpf_map_max_entries{map="bpfp_stats_v1"}'] == \
        derived_size("max_stats")
    assert samples['bpfproxy_bpf_map_memory_bytes{map="bpfp_ct_v1"}'] == \
        {m.name: m for m in status.maps}["bpfp_ct_v1"].memory_bytes
    assert samples["bpfproxy_synced"] == 1
    assert 'bpfproxy_errors_total{kind="sync"}' in samples
    assert any(k.startswith("bpfproxy_program_attached{") and v == 1
               for k, v in samples.items())
    # the programs' own counters, both programs, as status says them
    for event, count in status.datapath_events.items():
        program, _, name = event.partition(".")
        assert samples[f'bpfproxy_datapath_events_total{{event="{name}",program="{program}"}}'] \
            == count
    assert {"socket.revnat_failed", "tc.no_snat_port"} <= set(status.datapath_events)

    code, body = node.http_get("http://127.0.0.1:10256/healthz")
    verdict = json.loads(body)
    assert code == 200, verdict
    assert verdict["lastUpdated"] and verdict["currentTime"] and verdict["programsAttached"]
    code, body = node.http_get("http://127.0.0.1:10256/livez")
    assert code == 200 and json.loads(body)["currentTime"]
    assert node.http_get("http://127.0.0.1:10256/other")[0] == 404


# ---- events ----------------------------------------------------------------------------

def test_watch_streams_syncs_and_a_client_that_never_reads_slows_nothing(node):
    # a stream that is opened and never read, for the whole test
    idle_channel = grpc.insecure_channel(node.agent.api)
    idle = agent_pb2_grpc.AgentStub(idle_channel).WatchEvents(agent_pb2.WatchEventsRequest())
    watcher = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "watch", "--api", node.agent.api, "-o", "json",
         "--count", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        events: list = []
        reader_channel = grpc.insecure_channel(node.agent.api)
        stream = agent_pb2_grpc.AgentStub(reader_channel).WatchEvents(
            agent_pb2.WatchEventsRequest())
        reader = threading.Thread(target=lambda: events.extend(itertools.islice(stream, 3)),
                                  daemon=True)
        reader.start()
        extra = []
        for i in range(3):     # each change is one sync, seen by the agent in turn
            extra.append(manifests.service(f"added{i}", f"10.96.1.{i + 1}",
                                           [{"name": "p", "port": 80, "targetPort": 8080}]))
            write_services(node.directory, [p.ip for p in node.backends], tuple(extra))
            wanted = f"added{i}"
            node.agent.cli("status", "--api", node.agent.api)  # the API answers meanwhile
            _wait_listed(node, wanted)
        reader.join(timeout=30)
        assert len(events) == 3 and all(e.kind == "sync" for e in events)
        assert any(e.operations > 0 and e.event_to_kernel_seconds > 0 for e in events)
        out, err = watcher.communicate(timeout=30)
        assert watcher.returncode == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert len(lines) == 3 and lines[0]["kind"] == "sync"
        status = node.stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=10)
        assert status.sync_errors == 0
        stream.cancel()
        reader_channel.close()
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        idle.cancel()
        idle_channel.close()
        write_services(node.directory, [p.ip for p in node.backends])
        _wait_gone(node, "added0")


def _wait_listed(node: Node, name: str) -> None:
    import time
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(s.name == name for s in node.stub.ListServices(
                agent_pb2.ListServicesRequest(), timeout=10).services):
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} never reached the kernel\n{node.agent.log()[-3000:]}")


def _wait_gone(node: Node, name: str) -> None:
    import time
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not any(s.name == name for s in node.stub.ListServices(
                agent_pb2.ListServicesRequest(), timeout=10).services):
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} still in the kernel")


# ---- a node whose programs are gone ----------------------------------------------------

def test_healthz_fails_when_the_programs_are_detached(tmp_path):
    node = open_node(tmp_path, backends=1)
    try:
        assert node.http_get("http://127.0.0.1:10256/healthz")[0] == 200
        # unpinning the links detaches the programs while the agent runs
        for link in sorted((node.agent.bpffs / "links").iterdir()):
            link.unlink()
        from agent.datapath import loader
        assert loader.wait_detached(node.lab.cgroup, timeout=10) == []
        code, body = _wait_health(node, 503)
        assert "programs not attached" in json.loads(body)["reason"]
        status = node.stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=10)
        assert not any(p.attached for p in status.programs)
        assert "MISSING" in node.cli("status").stdout
    finally:
        close_node(node)


def _wait_health(node: Node, want: int) -> tuple[int, str]:
    import time
    deadline = time.monotonic() + 10       # the inventory caches for a second
    while True:
        code, body = node.http_get("http://127.0.0.1:10256/healthz")
        if code == want or time.monotonic() > deadline:
            return code, body
        time.sleep(0.2)
