"""The gRPC server in-process on a real socket: answers from a real synced AgentStatus,
refuses malformed requests, serves health and reflection, TLS and mutual TLS refuse
clients without the right certificate, and a client that never reads its event stream
loses events without slowing the publisher or other watchers."""
from __future__ import annotations

import asyncio
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.api import server
from agent.api.events import EventHub
from agent.api.generated import agent_pb2, agent_pb2_grpc
from agent.api.observed import Observed
from tests.unit.test_api_support import cluster, synced_status


@pytest.fixture(scope="module")
def status():
    objects, node_ips = cluster()
    return synced_status(objects, node_ips)[0]


def serve(observed: Observed, address: str, tls=None):
    """Run coroutine body(stub, channel) against a server started on address."""
    async def run(body, channel_factory=None):
        srv = await server.start(address, observed, tls)
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

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=d)


def _signed(d: Path, ca: str, name: str, san: str) -> None:
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
             f"{name}.key", "-out", f"{name}.csr", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
             cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "otherca")
    _signed(d, "ca", "server", "IP:127.0.0.1,DNS:localhost")
    _signed(d, "ca", "client", "DNS:client")
    _signed(d, "otherca", "stranger", "DNS:stranger")
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
