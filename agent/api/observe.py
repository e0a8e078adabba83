"""Starts and stops what observes the agent: the gRPC API, metrics and health, all fed by
one event hub hooked into Agent.on_event. The CLI's agent command calls start() once.

Metrics or health that cannot bind are logged and left off: the agent keeps serving."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from agent.api import healthz, metrics, server
from agent.api.observed import Observed
from agent.datapath.inventory import Inventory

log = logging.getLogger(__name__)


def _enabled(address: str) -> bool:
    return bool(address) and address.lower() not in ("off", "0", "none")


def tls_files(args) -> server.TlsFiles | None:
    cert, key, ca = args.api_tls_cert, args.api_tls_key, args.api_tls_ca
    if cert is None and key is None:
        if ca is not None:
            raise ValueError("--api-tls-ca needs --api-tls-cert and --api-tls-key (mutual "
                             "TLS is TLS with client certificates)")
        return None
    if cert is None or key is None:
        raise ValueError("--api-tls-cert and --api-tls-key go together")
    for flag, path in (("--api-tls-cert", cert), ("--api-tls-key", key),
                       ("--api-tls-ca", ca)):
        if path is not None and not path.is_file():
            raise ValueError(f"{flag} {path}: no such file")
    return server.TlsFiles(cert, key, ca)


@dataclass
class Observers:
    api: object
    http: list = field(default_factory=list)      # servers with shutdown()
    tasks: list = field(default_factory=list)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for http in self.http:
            # shutdown() waits for serve_forever to return: not on the loop
            await asyncio.get_running_loop().run_in_executor(None, http.shutdown)
            http.server_close()
        await self.api.stop(grace=0.5)


async def start(args, agent, cgroup, source_name: str, bind=None,
                xdp_fallback: dict[str, str] | None = None) -> Observers:
    """Raises ValueError for bad flags, OSError when the API cannot listen. bind(fn, *args)
    binds the ports (capabilities.PortBinder.run: below 1024 after the capability drop).
    xdp_fallback: interfaces the loader left to TC under --acceleration best-effort, and
    why (status and metrics show it)."""
    for flag in ("metrics", "healthz"):
        if _enabled(getattr(args, flag)):
            metrics.split_address(getattr(args, flag), f"--{flag}")    # ValueError early
    tls = tls_files(args)
    kind, _, location = source_name.partition(":")
    inventory = Inventory(args.bpffs, cgroup, _interfaces(args),
                          expect_tc=_tc_datapath_present(),
                          acceleration=getattr(args, "acceleration", "disabled"),
                          xdp_fallback=xdp_fallback)
    observed = Observed(agent.status, inventory, source=agent.source, source_kind=kind,
                        source_location=location, sync_period=args.sync_period)
    agent.on_event = observed.hub.publish
    observers = Observers(await server.start(args.api, observed, tls, bind=bind))
    if _enabled(args.metrics):
        try:
            observers.http.append(metrics.serve(args.metrics, observed, bind))
        except OSError as exc:
            log.error("event=metrics_failed address=%s error=%r action=serving_without",
                      args.metrics, str(exc))
    if _enabled(args.healthz):
        try:
            http, health = healthz.serve(args.healthz, observed, bind)
            observers.http.append(http)
            observers.tasks.append(asyncio.create_task(health.beat(), name="healthz-beat"))
        except OSError as exc:
            log.error("event=healthz_failed address=%s error=%r action=serving_without",
                      args.healthz, str(exc))
    return observers


def listen_ports(args) -> list[int]:
    """The TCP ports the API, metrics and health listen on (a unix --api has none)."""
    ports = []
    for flag in ("api", "metrics", "healthz"):
        address = getattr(args, flag)
        if not _enabled(address) or address.startswith("unix:"):
            continue
        _, _, port = address.rpartition(":")
        if port.isdigit():
            ports.append(int(port))
    return ports


def _interfaces(args) -> tuple[str, ...]:
    return tuple(i.strip() for i in (getattr(args, "interfaces", "") or "").split(",")
                 if i.strip())


def _tc_datapath_present() -> bool:
    """Health expects TC programs on --interfaces only once the TC datapath exists."""
    with contextlib.suppress(ImportError):
        import importlib.util
        return importlib.util.find_spec("agent.datapath.tc") is not None
    return False
