"""The service health check server: one HTTP listener per healthCheckNodePort and address,
answering as kube-proxy's pkg/proxy/healthcheck/service_health.go does; 200 while the service
has ready endpoints on this node, else 503, so the load balancer sends traffic only here."""
from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import json
import logging
import socket
from collections.abc import Callable, Iterable, Mapping

from agent.model.health import ServiceHealth
from agent.model.types import IPAddress

log = logging.getLogger(__name__)

# kube-proxy listens on every address unless --nodeport-addresses narrows it; both
# wildcards, as an IPv6 socket here is IPv6-only (asyncio sets IPV6_V6ONLY).
ALL_ADDRESSES = (ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::"))
REQUEST_LIMIT = 8192       # bytes of request line and headers; a prober sends a few hundred
REQUEST_TIMEOUT = 10.0     # seconds for a client to send its request
_REASONS = {200: "OK", 400: "Bad Request", 503: "Service Unavailable"}


class ServiceHealthServer:
    """update(health) after each sync: listeners open for new ports and close for gone ones;
    a port that cannot be bound is logged and tried again at the next update. Answers are
    read from the latest health at request time, so a changed count needs no new listener.

    proxy_healthy: kube-proxy's serviceProxyHealthy (its /healthz verdict); while False,
    every answer is 503 whatever the count."""

    def __init__(self, addresses: Iterable[IPAddress] = (),
                 proxy_healthy: Callable[[], bool] = lambda: True) -> None:
        self.addresses = tuple(dict.fromkeys(addresses)) or ALL_ADDRESSES
        self.proxy_healthy = proxy_healthy
        self._health: dict[int, ServiceHealth] = {}
        self._listeners: dict[tuple[int, IPAddress], asyncio.AbstractServer] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    @property
    def listening(self) -> frozenset[tuple[int, IPAddress]]:
        """(port, address) of every open listener."""
        return frozenset(self._listeners)

    def update(self, health: Mapping[int, ServiceHealth]) -> asyncio.Task:
        """Serve `health` (port -> service) from now on. Call on the event loop; the
        listeners change in the returned task (awaiting it is optional)."""
        self._health = dict(health)
        task = asyncio.get_running_loop().create_task(self.reconcile(), name="service-health")
        self._tasks.add(task)                   # the loop keeps only weak references
        task.add_done_callback(self._tasks.discard)
        return task

    async def reconcile(self) -> None:
        """Open and close listeners to match the latest health. Never raises."""
        async with self._lock:
            if self._closed:
                return
            wanted = {(port, address) for port in self._health for address in self.addresses}
            for key in [k for k in self._listeners if k not in wanted]:
                await self._close(key)
            for key in sorted(wanted - self._listeners.keys(), key=str):
                await self._open(*key)

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            for key in list(self._listeners):
                await self._close(key)

    async def _open(self, port: int, address: IPAddress) -> None:
        try:
            server = await asyncio.start_server(
                lambda r, w: self._answer(port, r, w), host=str(address), port=port,
                family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                reuse_address=True, limit=REQUEST_LIMIT)
        except OSError as exc:
            health = self._health.get(port)
            log.warning("event=health_check_port_failed port=%d address=%s service=%s "
                        "error=%r action=retry_next_sync", port, address,
                        f"{health.namespace}/{health.name}" if health else "-", str(exc))
            return
        self._listeners[port, address] = server
        log.info("event=health_check_port_opened port=%d address=%s", port, address)

    async def _close(self, key: tuple[int, IPAddress]) -> None:
        server = self._listeners.pop(key)
        server.close()
        with contextlib.suppress(OSError):
            await server.wait_closed()
        log.info("event=health_check_port_closed port=%d address=%s", *key)

    async def _answer(self, port: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                    ConnectionError):
                return              # no complete request: nothing to answer
            method, _, rest = head.partition(b" ")
            if not method.isalpha() or not rest.split(b"\r\n", 1)[0].rstrip().endswith(
                    (b"HTTP/1.0", b"HTTP/1.1")):
                writer.write(_response(400, b"", {}))
            else:
                health = self._health.get(port)
                if health is None:
                    return          # closed meanwhile; kube-proxy answers nothing either
                family = writer.get_extra_info("socket").family
                status, headers, body = answer(health, 6 if family == socket.AF_INET6 else 4,
                                               self.proxy_healthy())
                writer.write(_response(status, b"" if method == b"HEAD" else body, headers,
                                       len(body)))
            await writer.drain()
        except Exception:   # noqa: BLE001 -- one bad connection must not reach the loop
            log.debug("event=health_check_request_failed port=%d", port, exc_info=True)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def answer(health: ServiceHealth, family: int, proxy_healthy: bool
           ) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) exactly as service_health.go's hcHandler writes them: the
    body is its dedented template, tabs included."""
    count = health.local_endpoints_for(family)
    body = (f'{{\n\t"service": {{\n\t\t"namespace": {json.dumps(health.namespace)},\n'
            f'\t\t"name": {json.dumps(health.name)}\n\t}},\n'
            f'\t"localEndpoints": {count},\n'
            f'\t"serviceProxyHealthy": {"true" if proxy_healthy else "false"}\n}}')
    headers = {"Content-Type": "application/json", "X-Content-Type-Options": "nosniff",
               "X-Load-Balancing-Endpoint-Weight": str(count)}
    return (200 if count and proxy_healthy else 503), headers, body.encode()


def _response(status: int, body: bytes, headers: Mapping[str, str],
              length: int | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", *(f"{k}: {v}" for k, v in headers.items()),
             f"Date: {email.utils.formatdate(usegmt=True)}",
             f"Content-Length: {len(body) if length is None else length}",
             "Connection: close", "", ""]
    return "\r\n".join(lines).encode() + body
