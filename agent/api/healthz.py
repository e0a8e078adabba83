"""Health on --healthz (default 0.0.0.0:10256, kube-proxy's port): /healthz is 200 while the
last sync is recent and our programs are attached, else 503; /livez is 200 while the
agent's loop turns. JSON bodies like kube-proxy's (lastUpdated, currentTime, ...).

Served from its own thread: a stuck loop still gets an answer, and that answer is 503."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from agent.api.metrics import split_address
from agent.api.observed import Observed

log = logging.getLogger(__name__)

DEFAULT_HEALTHZ = "0.0.0.0:10256"
HEARTBEAT = 1.0            # seconds between the loop's heartbeats
LOOP_STALE = 30.0          # /livez fails when the loop has not beaten for this long


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat().replace("+00:00", "Z") \
        if unix else ""


class Health:
    """The verdicts, kept apart from HTTP so that they are testable alone."""

    def __init__(self, observed: Observed, now=time.time) -> None:
        self.observed = observed
        self.now = now
        self.loop_beat = now()

    def healthz(self) -> tuple[int, dict]:
        """kube-proxy: healthy while the last sync is within 2 sync periods (ours syncs at
        least once per period even with no change)."""
        s, now = self.observed.status, self.now()
        reasons = []
        if not s.synced:
            reasons.append("first sync not yet in the kernel")
        elif now - s.last_sync_unix > 2 * self.observed.sync_period:
            reasons.append(f"last sync {now - s.last_sync_unix:.0f}s ago (more than 2 sync "
                           f"periods of {self.observed.sync_period:g}s)")
        if self.observed.status.failure:
            reasons.append(self.observed.status.failure)
        if self.observed.source_stalled:   # its changes are not reaching the kernel
            reasons.append(self.observed.source_stalled)
        attached = True
        if self.observed.inventory is not None:
            attached, missing = self.observed.inventory.programs_attached()
            if not attached:
                reasons.append(f"programs not attached: {missing}")
        body = {"lastUpdated": _iso(s.last_sync_unix), "currentTime": _iso(now),
                "nodeEligible": True, "synced": s.synced, "programsAttached": attached}
        if reasons:
            body["reason"] = "; ".join(reasons)
        return (503 if reasons else 200), body

    def livez(self) -> tuple[int, dict]:
        now = self.now()
        stale = now - self.loop_beat > LOOP_STALE
        body = {"lastUpdated": _iso(self.loop_beat), "currentTime": _iso(now)}
        if stale:
            body["reason"] = f"agent loop has not turned for {now - self.loop_beat:.0f}s"
        return (503 if stale else 200), body

    async def beat(self) -> None:
        """Run on the agent's loop: each turn proves the loop is alive."""
        while True:
            self.loop_beat = self.now()
            await asyncio.sleep(HEARTBEAT)


def _handler(health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 10       # a client that sends nothing is dropped, not waited on forever

        def do_GET(self):  # noqa: N802 - http.server's name
            route = {"/healthz": health.healthz, "/livez": health.livez}.get(
                self.path.split("?", 1)[0])
            code, body = route() if route else (404, {"error": f"no {self.path[:100]!r}; "
                                                       "try /healthz or /livez"})
            payload = (json.dumps(body) + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, fmt, *args):   # probes every few seconds: not info-level news
            log.debug("event=healthz_request %s", fmt % args)

    return Handler


class _ThreadingHTTPServer6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def serve(address: str, observed: Observed, bind: Callable | None = None
          ) -> tuple[ThreadingHTTPServer, Health]:
    """Start the server in a daemon thread; the caller runs health.beat() on its loop.
    bind(fn, *args): where the port is bound (capabilities.PortBinder.run, for a port below
    1024 after the capability drop); the serving thread starts here either way."""
    host, port = split_address(address, "--healthz")
    health = Health(observed)
    server_class = _ThreadingHTTPServer6 if ":" in host else ThreadingHTTPServer
    server = bind(server_class, (host, port), _handler(health)) if bind else \
        server_class((host, port), _handler(health))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="healthz", daemon=True).start()
    log.info("event=healthz_listening address=%s", address)
    return server, health
