"""The gRPC server in-process on a real socket: answers from a real synced AgentStatus,
refuses malformed requests, serves health and reflection, TLS and mutual TLS refuse
clients without the right certificate (TLS without them is warned about), a client that
never reads its event stream loses events without slowing the publisher or other watchers
and cannot hold its place for ever, and the unix socket is never reached before its mode
is right, nor chmod-ed through a link."""
from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import socket
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent import cli
from agent.api import queries, server
from agent.api.events import EventHub
from agent.api.generated import agent_pb2, agent_pb2_grpc
from agent.api.observed import Observed
from tests.unit.test_api_support import cluster, synced_status


@pytest.fixture(scope="module")
def status():
    objects, node_ips = cluster()
    return synced_status(objects, node_ips)[0]


def serve(observed: Observed, address: str, tls=None,
          watch_limits: server.WatchLimits | None = None):
    """Run coroutine body(stub, channel) against a server started on address."""
    async def run(body, channel_factory=None):
        srv = await server.start(address, observed, tls, watch_limits or server.WatchLimits())
        try:
            channel = (channel_factory or grpc.aio.insecure_channel)(address)
            async with channel:
                return await body(agent_pb2_grpc.AgentStub(channel), channel)
        finally:
            await srv.stop(grace=None)
    return run


def test_rpcs_answer_from_the_applied_state(status, tmp_path):
    address = f"unix://{tmp_path}/api.sock"
    observed = Observed(status, source_kind="manifests", source_location="/m")

    async def body(stub, channel):
        got = await stub.GetStatus(agent_pb2.GetStatusRequest())
        assert got.synced and got.service_ports == status.view.counts[0]
        assert got.source_state.kind == "manifests" and got.version
        services = (await stub.ListServices(agent_pb2.ListServicesRequest())).services
        assert {(s.name, s.port_name, s.type) for s in services} == {
            ("web", "http", "ClusterIP"), ("web", "https", "ClusterIP"),
            ("db", "sql", "ClusterIP"), ("np", "http", "NodePort")}
        page = await stub.ListBackends(agent_pb2.ListBackendsRequest(page_size=2))
        assert len(page.backends) == 2 and page.next_page_token
        web = await stub.GetService(agent_pb2.GetServiceRequest(namespace="ns", name="web"))
        assert [p.port_name for p in web.ports] == ["http", "https"]
        for call, request, code in (
                (stub.GetService, agent_pb2.GetServiceRequest(namespace="ns", name="nope"),
                 grpc.StatusCode.NOT_FOUND),
                (stub.ListServices, agent_pb2.ListServicesRequest(
                    filter=agent_pb2.ServiceFilter(namespace="NS!")),
                 grpc.StatusCode.INVALID_ARGUMENT),
                (stub.ListBackends, agent_pb2.ListBackendsRequest(page_token="%%%"),
                 grpc.StatusCode.INVALID_ARGUMENT),
                (stub.GetStats, agent_pb2.GetStatsRequest(),     # no kernel here
                 grpc.StatusCode.UNAVAILABLE)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(request)
            assert caught.value.code() == code and caught.value.details()
        assert (await stub.GetStatus(agent_pb2.GetStatusRequest())).errors[
            "invalid_request"] == 2
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="bpfproxy.v1.Agent"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # unix socket: owner and group only
        assert stat.S_IMODE((tmp_path / "api.sock").stat().st_mode) == 0o660

    asyncio.run(serve(observed, address)(body))


def test_a_watcher_that_never_reads_loses_events_and_slows_no_one(status, tmp_path):
    address = f"unix://{tmp_path}/api.sock"
    hub = EventHub(queue_size=4)
    observed = Observed(status, hub=hub)
    total = 300

    async def body(stub, channel):
        # its own connection, with no window growth: it is the reader that stalls
        idle_channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)])
        idle = agent_pb2_grpc.AgentStub(idle_channel).WatchEvents(
            agent_pb2.WatchEventsRequest())                              # never read (yet)
        reader = stub.WatchEvents(agent_pb2.WatchEventsRequest())
        while hub.subscribers < 2:        # both streams registered before publishing
            await asyncio.sleep(0.01)
        received = []
        for i in range(total):
            # publish() is synchronous: it cannot wait for any client
            hub.publish("sync_failed", {"message": f"{i} " + "x" * 32768})
            received.append(await reader.read())     # the reader keeps up, in lockstep
        assert [int(e.message.split()[0]) for e in received] == list(range(total))
        assert all(e.dropped_before == 0 for e in received)
        assert hub.dropped > 0
        errors = (await stub.GetStatus(agent_pb2.GetStatusRequest())).errors
        assert errors["events_dropped"] == hub.dropped
        # the idle client finally reads: what it got plus what it was told it missed
        got, missed = 0, 0
        while got + missed < total:
            event = await asyncio.wait_for(idle.read(), 30)
            got, missed = got + 1, missed + event.dropped_before
        assert got + missed == total and missed == hub.dropped
        idle.cancel()
        reader.cancel()
        await idle_channel.close()

    asyncio.run(serve(observed, address)(body))


# ---- TLS -------------------------------------------------------------------------------

def _write_key(d: Path, name: str) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    (d / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return key


def _certificate(d: Path, name: str, issuer: str | None = None, san=()) -> None:
    """{name}.key and {name}.crt, valid for a day: a CA when issuer is None, else a leaf
    signed by the CA in {issuer}.key/.crt with the subject alternative names in san."""
    key = _write_key(d, name)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    if issuer is None:
        issuer_name, signer = subject, key
    else:
        issuer_name = x509.load_pem_x509_certificate((d / f"{issuer}.crt").read_bytes()).subject
        signer = serialization.load_pem_private_key((d / f"{issuer}.key").read_bytes(), None)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None),
                              critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    (d / f"{name}.crt").write_bytes(
        builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Two CAs and three leaves, made in-process (no openssl command needed)."""
    d = tmp_path_factory.mktemp("pki")
    _certificate(d, "ca")
    _certificate(d, "otherca")
    _certificate(d, "server", "ca", [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.DNSName("localhost")])
    _certificate(d, "client", "ca", [x509.DNSName("client")])
    _certificate(d, "stranger", "otherca", [x509.DNSName("stranger")])
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(pki: Path, ca: str = "ca", cert: str | None = None):
    def factory(address: str):
        return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(
            root_certificates=(pki / f"{ca}.crt").read_bytes(),
            private_key=(pki / f"{cert}.key").read_bytes() if cert else None,
            certificate_chain=(pki / f"{cert}.crt").read_bytes() if cert else None))
    return factory


async def _status_code(stub, channel) -> grpc.StatusCode:
    try:
        await stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=10)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()


@pytest.mark.parametrize("mutual, client, want", [
    (False, {"ca": "ca"}, grpc.StatusCode.OK),
    (False, {"ca": "otherca"}, grpc.StatusCode.UNAVAILABLE),   # server cert not trusted
    (False, None, grpc.StatusCode.UNAVAILABLE),                # plaintext to a TLS port
    (True, {"ca": "ca", "cert": "client"}, grpc.StatusCode.OK),
    (True, {"ca": "ca"}, grpc.StatusCode.UNAVAILABLE),         # no client certificate
    (True, {"ca": "ca", "cert": "stranger"}, grpc.StatusCode.UNAVAILABLE),  # wrong CA
], ids=["tls", "tls-untrusted-server", "plaintext", "mtls", "mtls-no-cert",
        "mtls-foreign-cert"])
def test_tls_and_mutual_tls_refuse_clients_without_the_right_certificate(
        status, pki, mutual, client, want):
    tls = server.TlsFiles(pki / "server.crt", pki / "server.key",
                          pki / "ca.crt" if mutual else None)
    address = f"127.0.0.1:{_free_port()}"
    factory = _client(pki, **client) if client else grpc.aio.insecure_channel
    got = asyncio.run(serve(Observed(status), address, tls)(_status_code, factory))
    assert got == want


# ---- watchers cannot hold their place forever -------------------------------------------

async def _until(condition, what: str, tick=None, timeout: float = 30.0) -> None:
    """Poll condition (calling tick each round); fail with `what` past the bound."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not in time: {what}"
        if tick is not None:
            tick()
        await asyncio.sleep(0.01)


def test_a_watcher_that_stops_reading_is_ended_and_its_place_freed(status, tmp_path):
    """Its events pile up in gRPC's buffers; once one has waited stall_seconds its hub
    place is freed (counted, logged), and the call itself ends with the connection's age
    (a client cannot hold a place, or a call, by not reading)."""
    address = f"unix://{tmp_path}/api.sock"
    hub = EventHub(queue_size=4, max_subscribers=1)
    observed = Observed(status, hub=hub)
    limits = server.WatchLimits(stall_seconds=0.5, lifetime_seconds=(2.0, 2.0))

    async def body(stub, channel):
        idle_channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)])
        idle = agent_pb2_grpc.AgentStub(idle_channel).WatchEvents(
            agent_pb2.WatchEventsRequest())
        await _until(lambda: hub.subscribers == 1, "the watch is registered")
        sent = iter(range(10**6))
        await _until(lambda: hub.subscribers == 0, "the stalled watch is ended",
                     tick=lambda: hub.publish("sync_failed",
                                              {"message": f"{next(sent)} " + "x" * 32768}))
        errors = (await stub.GetStatus(agent_pb2.GetStatusRequest())).errors
        assert errors["watch_stalled"] == 1
        # its place is free again: a new watcher (on a connection of its own) gets events
        async with grpc.aio.insecure_channel(address) as fresh:
            reader = agent_pb2_grpc.AgentStub(fresh).WatchEvents(
                agent_pb2.WatchEventsRequest())
            await _until(lambda: hub.subscribers == 1, "a new watch is registered")
            hub.publish("sync_failed", {"message": "after"})
            assert (await asyncio.wait_for(reader.read(), 30)).message == "after"
            reader.cancel()
        # the stalled call ends too: what was buffered, then an error, not a hang
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                await asyncio.wait_for(idle.read(), 30)
        assert ended.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        await idle_channel.close()

    asyncio.run(serve(observed, address, watch_limits=limits)(body))


async def _messages(call) -> list[str]:
    return [event.message async for event in call]


def test_a_watch_ends_at_its_lifetime_and_the_client_watches_again(status, tmp_path):
    address = f"unix://{tmp_path}/api.sock"
    hub = EventHub()
    observed = Observed(status, hub=hub)
    limits = server.WatchLimits(lifetime_seconds=(0.3, 0.3))

    async def body(stub, channel):
        for _ in range(2):
            call = stub.WatchEvents(agent_pb2.WatchEventsRequest())
            await _until(lambda: hub.subscribers == 1, "the watch is registered")
            hub.publish("sync_failed", {"message": "one"})
            got = await asyncio.wait_for(_messages(call), 30)    # until the server ends it
            assert got == ["one"]
            assert await call.code() == grpc.StatusCode.OK
            await _until(lambda: hub.subscribers == 0, "the subscription is closed")

    asyncio.run(serve(observed, address, watch_limits=limits)(body))


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_tls_without_client_certificates_is_warned_about_as_plain_tcp_is(
        status, pki, mutual, caplog):
    """Without --api-tls-ca any client that reaches the port reads the node's services."""
    tls = server.TlsFiles(pki / "server.crt", pki / "server.key",
                          pki / "ca.crt" if mutual else None)
    address = f"127.0.0.1:{_free_port()}"
    client = _client(pki, "ca", "client" if mutual else None)
    with caplog.at_level(logging.WARNING, logger="agent.api.server"):
        got = asyncio.run(serve(Observed(status), address, tls)(_status_code, client))
    assert got == grpc.StatusCode.OK
    warned = [r.getMessage() for r in caplog.records if "event=api_insecure" in r.getMessage()]
    if mutual:
        assert warned == []
    else:
        assert len(warned) == 1 and "--api-tls-ca" in warned[0] and address in warned[0]


# ---- the unix socket -------------------------------------------------------------------

def test_the_socket_is_0660_when_it_appears_and_no_link_is_followed(
        status, tmp_path, monkeypatch):
    """Someone swaps the socket's path for a symlink to another file just after gRPC
    binds: the socket must still end up at the path with its mode, and the other file
    keep its own (a chmod after bind would follow the link)."""
    run_dir = tmp_path / "run"
    path = run_dir / "api.sock"
    victim = tmp_path / "bpfp-victim"
    victim.write_text("not the agent's\n")
    victim.chmod(0o600)
    path_at_bind = []
    real_server = grpc.aio.server

    def server_with_a_swap_after_bind(*args, **kwargs):
        srv = real_server(*args, **kwargs)
        bind = srv.add_insecure_port

        def bind_then_swap(address: str) -> int:
            bound = bind(address)
            path_at_bind.append(path.exists())
            if path.exists():
                path.unlink()
            path.symlink_to(victim)
            return bound

        srv.add_insecure_port = bind_then_swap
        return srv

    monkeypatch.setattr(grpc.aio, "server", server_with_a_swap_after_bind)

    async def body(stub, channel):
        assert stat.S_IMODE(victim.stat().st_mode) == 0o600, "a chmod followed the link"
        mode = path.lstat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
        assert sorted(p.name for p in run_dir.iterdir()) == ["api.sock"]   # no staging left
        assert (await stub.GetStatus(agent_pb2.GetStatusRequest())).synced

    asyncio.run(serve(Observed(status), f"unix://{path}")(body))
    assert path_at_bind == [False]           # nothing listened at the path before it was ready
    assert victim.read_text() == "not the agent's\n"
    assert not path.exists() and not path.is_symlink()      # removed when the server stopped


def test_a_stale_socket_is_replaced_and_another_agents_is_not_removed(status, tmp_path):
    path = tmp_path / "api.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))                   # left by an agent that was killed
    stale.close()

    async def run():
        srv = await server.start(f"unix://{path}", Observed(status))
        try:
            async with grpc.aio.insecure_channel(f"unix://{path}") as channel:
                assert (await agent_pb2_grpc.AgentStub(channel).GetStatus(
                    agent_pb2.GetStatusRequest())).synced
            # a newer agent took the path over meanwhile: stopping must leave its socket
            path.unlink()
            newer = socket.socket(socket.AF_UNIX)
            newer.bind(str(path))
            newer.close()
        finally:
            await srv.stop(grace=None)

    asyncio.run(run())
    assert stat.S_ISSOCK(path.lstat().st_mode)


def test_the_cli_watches_on_past_a_stream_s_lifetime(status, tmp_path, capsys):
    """`bpfproxy watch` is not ended by a stream reaching its lifetime: it watches again."""
    address = f"unix://{tmp_path}/api.sock"
    hub = EventHub()
    limits = server.WatchLimits(lifetime_seconds=(0.3, 0.3))
    wanted = 12

    async def body(stub, channel):
        watcher = asyncio.ensure_future(asyncio.to_thread(
            cli.main, ["watch", "--api", address, "--count", str(wanted), "-o", "json"]))
        while not watcher.done():           # one event per 50 ms: several lifetimes
            hub.publish("sync_failed", {"message": "tick"})
            await asyncio.sleep(0.05)
        return await watcher

    code = asyncio.run(serve(Observed(status, hub=hub), address, watch_limits=limits)(body))
    assert code == 0
    assert capsys.readouterr().out.count('"tick"') == wanted


def test_services_reads_a_page_larger_than_grpc_s_default_receive_limit(tmp_path, capsys):
    """A page of service ports with many backends each is more than gRPC's default 4 MiB
    per message (the server sends it): the command line still reads it."""
    address = f"unix://{tmp_path}/api.sock"
    backends = [agent_pb2.Backend(address=f"10.244.{i // 250}.{i % 250}", port=8080,
                                  state="ready") for i in range(1000)]
    page = agent_pb2.ListServicesResponse(services=[agent_pb2.ServicePort(
        namespace="ns", name=f"svc-{n}", port_name="http", protocol="TCP", family=4,
        type="ClusterIP", frontends=[agent_pb2.Frontend(address="10.96.0.1", port=80,
                                                        kind="ClusterIP")],
        backends=backends) for n in range(200)])
    assert page.ByteSize() > 4 << 20

    class Servicer(agent_pb2_grpc.AgentServicer):
        async def ListServices(self, request, context):
            return page

    async def run():
        srv = grpc.aio.server()
        agent_pb2_grpc.add_AgentServicer_to_server(Servicer(), srv)
        srv.add_insecure_port(address)
        await srv.start()
        try:
            return await asyncio.to_thread(cli.main, ["services", "--api", address, "-o",
                                                      "json"])
        finally:
            await srv.stop(grace=None)

    assert asyncio.run(run()) == 0
    entries = json.loads(capsys.readouterr().out)
    assert len(entries) == 200 and all(len(e["backends"]) == 1000 for e in entries)


def test_service_port_messages_mark_what_the_manifest_source_allocated(status):
    """The frontends the manifest source allocated (a cluster IP, a node port) are marked;
    one the manifest gave is not, nor a Service it allocated nothing for."""
    from types import SimpleNamespace
    allocations = {("other", "np"): SimpleNamespace(cluster_ips={"10.96.0.30"},
                                                    node_ports={30080})}
    response = agent_pb2.ListServicesResponse()
    server.add_service_ports(response.services, status.view.service_ports, allocations)
    marked = {(p.name, f.kind): f.allocated for p in response.services for f in p.frontends}
    assert marked[("np", "ClusterIP")] and marked[("np", "NodePort")]
    assert not marked[("web", "ClusterIP")] and not marked[("db", "ClusterIP")]
    assert sorted(b.address for p in response.services
                  if p.name == "web" and p.port_name == "http"
                  for b in p.backends) == ["10.244.1.2", "10.244.1.3", "10.244.1.4"]
    one = server.service_port_message(next(sp for sp in status.view.service_ports
                                           if sp.name.name == "np"), allocations)
    assert one.name == "np" and all(f.allocated for f in one.frontends)


def _fresh_page(ports, allocations=None, token="") -> agent_pb2.ListServicesResponse:
    response = agent_pb2.ListServicesResponse(next_page_token=token)
    server.add_service_ports(response.services, ports, allocations)
    return response


def test_a_kept_encoding_is_reused_until_its_service_port_changes():
    """ListServices serves each service port's encoding kept from an earlier call (and an
    earlier sync's view): the same bytes as the message built afresh, kept while the port
    is unchanged, made again when a sync changes it or the manifest source's allocation
    for it changes."""
    from types import SimpleNamespace

    from agent.sources.events import ObjectChange
    from tests.unit.test_api_support import endpoint_slice
    objects, node_ips = cluster()
    status, agent = synced_status(objects, node_ips)
    ports = sorted(status.services, key=queries.service_key)
    first = server.encoded_page(ports, status.memo, {}, "tok")
    assert first == _fresh_page(ports, token="tok").SerializeToString()
    kept = {(e.port.name.name, e.port.name.port_name): e.kept
            for e in status.memo.ports.values()}

    # web gains a backend: a change sync, a new view; only web's ports are merged again
    slice_ = endpoint_slice("web", ["10.244.1.2", "10.244.1.3", "10.244.1.4", "10.244.1.9"],
                            ["http", "https"])
    agent._changes.record_batch([ObjectChange(slice_.key, slice_)])
    assert asyncio.run(agent._sync_once())
    ports = sorted(status.services, key=queries.service_key)
    page = agent_pb2.ListServicesResponse.FromString(
        server.encoded_page(ports, status.memo, {}))
    assert page == _fresh_page(ports)
    web = [p for p in page.services if p.name == "web"]
    assert len(web) == 2 and all("10.244.1.9" in {b.address for b in p.backends} for p in web)
    now = {(e.port.name.name, e.port.name.port_name): e.kept for e in status.memo.ports.values()}
    assert now[("db", "sql")] is kept[("db", "sql")]          # the same bytes, not rebuilt
    assert now[("np", "http")] is kept[("np", "http")]
    assert now[("web", "http")] != kept[("web", "http")]

    # the manifest source allocated np's cluster IP: np's encoding is made again
    allocations = {("other", "np"): SimpleNamespace(cluster_ips={"10.96.0.30"},
                                                    node_ports=set())}
    page = server.encoded_page(ports, status.memo, allocations)
    assert page == _fresh_page(ports, allocations).SerializeToString()
    assert any(f.allocated for p in agent_pb2.ListServicesResponse.FromString(page).services
               if p.name == "np" for f in p.frontends)


def test_a_periodic_re_read_keeps_every_encoding():
    """A sync that re-reads the kernel makes new kernel records of the same content: the
    service ports' merged form and encodings are kept (compared, not rebuilt)."""
    objects, node_ips = cluster()
    status, agent = synced_status(objects, node_ips)
    ports = sorted(status.services, key=queries.service_key)
    server.encoded_page(ports, status.memo, {})
    before = {key: (e.port, e.kept) for key, e in status.memo.ports.items()}
    assert len(before) == 4 and all(kept is not None for _, kept in before.values())
    view = status.view
    assert asyncio.run(agent._sync_once(reread_kernel=True))
    assert status.view is not view
    again = sorted(status.services, key=queries.service_key)
    assert again == ports and all(a is b for a, b in zip(again, ports, strict=True))
    assert server.encoded_page(again, status.memo, {}) == _fresh_page(again).SerializeToString()
    assert {key: (e.port, e.kept) for key, e in status.memo.ports.items()} == before


def test_a_client_command_imports_none_of_the_agent_s_parts(tmp_path):
    """`bpfproxy services` (any command that only asks the API) parses its flags without
    the agent's, whose defaults import the datapath, planner and model (~0.1 s a call);
    its arguments parse as with the whole parser."""
    import subprocess
    import sys
    probe = ("import sys; from agent import cli; code = cli.main(['services', '--api', "
             f"'unix://{tmp_path}/none.sock', '-o', 'json']); "
             "print(code, sorted(m for m in sys.modules if m.startswith(("
             "'agent.datapath', 'agent.planner', 'agent.model', 'agent.sources'))))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert done.stdout.strip() == "1 []", done.stdout + done.stderr
    for argv in (["services", "-n", "ns", "-o", "json"], ["status", "--wait", "3"],
                 ["--log-level", "debug", "watch", "--count", "2"],
                 ["stats", "--api", "h:1", "--tls-ca", "ca.pem"]):
        assert cli._command(argv) in cli.CLIENT_COMMANDS
        assert vars(cli.build_parser(agent_flags=False).parse_args(argv)) == \
            vars(cli.build_parser().parse_args(argv))
    assert cli._command(["agent", "--manifests", "m"]) not in cli.CLIENT_COMMANDS


def test_status_counts_the_agent_s_own_maps_from_the_applied_plan():
    """The maps only the agent writes are counted from the plan the kernel took (no walk
    of 300k entries each second while status is polled): the same figures as the maps
    hold, after the first sync and after a change; unknown (read from the kernel) before
    the first sync."""
    from agent.datapath import layout
    from agent.planner.capacity import BUDGETED_MAPS
    from agent.sources.events import ObjectChange
    from tests.unit.test_api_support import endpoint_slice
    objects, node_ips = cluster()
    status, agent = synced_status(objects, node_ips)

    def held() -> dict[str, int]:
        entries = agent.maps.entries()
        return {layout.MAPS[name].pin: entries.get(name, 0) for name in BUDGETED_MAPS}

    observed = Observed(status)
    assert observed.map_entries == held()
    # web: 3 backends x 2 ports; np: 1 backend, in its internal and its external svc_id
    assert observed.map_entries["bpfp_slot4_v1"] == 3 * 2 + 2
    slice_ = endpoint_slice("web", ["10.244.1.2"], ["http", "https"])     # two slots go
    agent._changes.record_batch([ObjectChange(slice_.key, slice_)])
    assert asyncio.run(agent._sync_once())
    assert observed.map_entries == held() and observed.map_entries["bpfp_slot4_v1"] == 4
    assert Observed(server.AgentStatus()).map_entries is None


def test_an_ipv4_address_is_written_as_ipaddress_writes_it():
    from hypothesis import given
    from hypothesis import strategies as st

    @given(st.integers(0, 2**32 - 1))
    def check(n):
        address = ipaddress.IPv4Address(n)
        assert server._ipv4_text(address) == server._ipv4_text(n) == str(address)
    check()
