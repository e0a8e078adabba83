"""The service health check server with real sockets on loopback and a real HTTP client:
kube-proxy's status codes, headers and body, listeners following update(), a port that
cannot be bound logged and retried, never raising."""
from __future__ import annotations

import asyncio
import http.client
import ipaddress
import logging
import socket

import pytest

from agent.api.service_health import ServiceHealthServer, answer
from agent.model.health import ServiceHealth

LOOPBACK, LOOPBACK6 = ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")


def free_port(family=socket.AF_INET, host="127.0.0.1") -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def has_ipv6_loopback() -> bool:
    try:
        free_port(socket.AF_INET6, "::1")
    except OSError:
        return False
    return True


def get(port: int, method="GET", path="/", host="127.0.0.1"):
    """(status, headers, body) from a real HTTP client; run it off the loop."""
    connection = http.client.HTTPConnection(host, port, timeout=5)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


async def fetch(port: int, **kw):
    return await asyncio.to_thread(get, port, **kw)


def web(count: int, by_family=()) -> ServiceHealth:
    return ServiceHealth("lab", "web", count, by_family)


# service_health.go hcHandler's dedented template, byte for byte
BODY = ('{\n\t"service": {\n\t\t"namespace": "lab",\n\t\t"name": "web"\n\t},\n'
        '\t"localEndpoints": %d,\n\t"serviceProxyHealthy": %s\n}')


def test_answers_as_kube_proxy_does():
    async def scenario():
        port = free_port()
        server = ServiceHealthServer([LOOPBACK])
        try:
            await server.update({port: web(2)})
            status, headers, body = await fetch(port)
            assert status == 200
            assert headers["Content-Type"] == "application/json"
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert headers["X-Load-Balancing-Endpoint-Weight"] == "2"
            assert body.decode() == BODY % (2, "true")

            await server.update({port: web(0)})        # the count changed: same listener
            status, headers, body = await fetch(port, method="POST", path="/any/path?x=1")
            assert status == 503
            assert headers["X-Load-Balancing-Endpoint-Weight"] == "0"
            assert body.decode() == BODY % (0, "true")

            status, headers, body = await fetch(port, method="HEAD")
            assert (status, body) == (503, b"")
        finally:
            await server.close()
    asyncio.run(scenario())


def test_unhealthy_proxy_answers_503_whatever_the_count():
    async def scenario():
        port = free_port()
        server = ServiceHealthServer([LOOPBACK], proxy_healthy=lambda: False)
        try:
            await server.update({port: web(3)})
            status, headers, body = await fetch(port)
            assert status == 503
            assert headers["X-Load-Balancing-Endpoint-Weight"] == "3"
            assert body.decode() == BODY % (3, "false")
        finally:
            await server.close()
    asyncio.run(scenario())


def test_listeners_follow_updates():
    async def scenario():
        first, second = free_port(), free_port()
        server = ServiceHealthServer([LOOPBACK])
        try:
            await server.update({first: web(1), second: web(0)})
            assert server.listening == {(first, LOOPBACK), (second, LOOPBACK)}
            assert (await fetch(first))[0] == 200 and (await fetch(second))[0] == 503

            await server.update({second: ServiceHealth("lab", "other", 4)})
            assert server.listening == {(second, LOOPBACK)}
            with pytest.raises(ConnectionRefusedError):
                await fetch(first)
            status, _, body = await fetch(second)
            assert status == 200 and b'"name": "other"' in body

            await server.update({})
            assert server.listening == frozenset()
            with pytest.raises(ConnectionRefusedError):
                await fetch(second)
        finally:
            await server.close()
    asyncio.run(scenario())


def test_a_port_in_use_is_logged_and_retried_at_the_next_update(caplog):
    async def scenario():
        busy, fine = free_port(), free_port()
        squatter = socket.socket()
        squatter.bind(("127.0.0.1", busy))
        squatter.listen()
        server = ServiceHealthServer([LOOPBACK])
        try:
            with caplog.at_level(logging.WARNING, logger="agent.api.service_health"):
                await server.update({busy: web(1), fine: web(1)})
            [failed] = [r.getMessage() for r in caplog.records
                        if "event=health_check_port_failed" in r.getMessage()]
            assert f"port={busy} " in failed and "error=" in failed and "lab/web" in failed
            assert server.listening == {(fine, LOOPBACK)}
            assert (await fetch(fine))[0] == 200          # the other port is served

            squatter.close()
            await server.update({busy: web(1), fine: web(1)})
            assert server.listening == {(busy, LOOPBACK), (fine, LOOPBACK)}
            assert (await fetch(busy))[0] == 200
        finally:
            squatter.close()
            await server.close()
    asyncio.run(scenario())


def test_bad_requests_never_break_the_server():
    async def scenario():
        port = free_port()
        server = ServiceHealthServer([LOOPBACK])
        try:
            await server.update({port: web(1)})
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x16\x03\x01 not http at all\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.1 400 Bad Request\r\n")
            writer.close()
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")      # hangs up mid-request
            writer.close()
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n")   # too long
            writer.close()
            assert (await fetch(port))[0] == 200
        finally:
            await server.close()
    asyncio.run(scenario())


def test_close_stops_every_listener_and_later_updates():
    async def scenario():
        port = free_port()
        server = ServiceHealthServer([LOOPBACK])
        await server.update({port: web(1)})
        await server.close()
        assert server.listening == frozenset()
        await server.update({port: web(1)})
        assert server.listening == frozenset()
        with pytest.raises(ConnectionRefusedError):
            await fetch(port)
    asyncio.run(scenario())


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_each_family_answers_with_its_own_count():
    """kube-proxy (#137370): the IPv4 and IPv6 health servers each report their family."""
    async def scenario():
        port = free_port()
        server = ServiceHealthServer([LOOPBACK, LOOPBACK6])
        try:
            await server.update({port: web(2, ((4, 2), (6, 0)))})
            status, headers, _ = await fetch(port)
            assert (status, headers["X-Load-Balancing-Endpoint-Weight"]) == (200, "2")
            status, headers, _ = await fetch(port, host="::1")
            assert (status, headers["X-Load-Balancing-Endpoint-Weight"]) == (503, "0")
        finally:
            await server.close()
    asyncio.run(scenario())


def test_names_are_json_quoted():
    status, _, body = answer(ServiceHealth("ns", 'we"b', 1), 4, True)
    assert status == 200 and b'"name": "we\\"b"' in body


# --- the agent hands the health checks over after each sync the kernel accepted ----------

class QueueSource:
    """Yields the batches a test puts, as a real source does: first the listing."""

    held_back = ()

    def __init__(self) -> None:
        self.batches: asyncio.Queue = asyncio.Queue()

    async def changes(self):
        while True:
            yield await self.batches.get()


def lb_local(name: str, health_port: int, cluster_ip: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "lab", "name": name},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                     "healthCheckNodePort": health_port, "clusterIP": cluster_ip,
                     "ports": [{"port": 80, "nodePort": 30080}]}}


def slice_on(service: str, node: str, address: str = "10.244.1.5") -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "lab", "name": f"{service}-1",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "ports": [{"port": 8080}],
            "endpoints": [{"addresses": [address], "nodeName": node}]}


def test_the_agent_reports_health_after_full_and_incremental_syncs():
    from agent.agent import Agent
    from agent.model.objects import parse_object
    from agent.model.types import NodeContext
    from agent.sources.events import ObjectChange
    from tests.fakes import FakeServiceMaps

    def upsert(*raw):
        return [ObjectChange(o.key, o) for o in map(parse_object, raw)]

    async def scenario():
        source, reports = QueueSource(), asyncio.Queue()
        seen = []

        def record(health):
            seen.append(health)
            reports.put_nowait({port: (h.name, h.local_endpoints) for port, h in health.items()})
            if len(seen) == 2:
                raise RuntimeError("an observer's failure must not stop the agent")

        async def next_report():
            return await asyncio.wait_for(reports.get(), 10)

        agent = Agent(source, FakeServiceMaps(), min_sync_period=0.01, sync_period=60,
                      node=NodeContext("n1"), service_health=record)
        task = asyncio.create_task(agent.run())
        try:
            # enough other services that a change to one is synced incrementally
            others = [{"apiVersion": "v1", "kind": "Service",
                       "metadata": {"namespace": "lab", "name": f"other{i}"},
                       "spec": {"clusterIP": f"10.96.1.{i}", "ports": [{"port": 80}]}}
                      for i in range(10)]
            await source.batches.put(upsert(lb_local("web", 32000, "10.96.0.1"),
                                            slice_on("web", "n1"),
                                            lb_local("api", 32001, "10.96.0.2"), *others))
            assert await next_report() == {32000: ("web", 1), 32001: ("api", 0)}   # full
            await source.batches.put(upsert(slice_on("web", "n2")))    # moved away
            assert await next_report() == {32000: ("web", 0), 32001: ("api", 0)}
            await source.batches.put(upsert(slice_on("api", "n1", "10.244.1.6")))
            assert await next_report() == {32000: ("web", 0), 32001: ("api", 1)}
            key = parse_object(lb_local("web", 32000, "10.96.0.1")).key
            await source.batches.put([ObjectChange(key, None)])       # deleted
            assert await next_report() == {32001: ("api", 1)}
            assert agent.status.full_syncs == 1 and agent.status.syncs == 4
        finally:
            agent.stop()
            await asyncio.wait_for(task, 10)
    asyncio.run(scenario())
