"""The gRPC status API: answers from the agent's applied state, never writes it.

Listens on a unix socket (unix:///run/bpfproxy/api.sock) or host:port."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc

from agent.agent import AgentStatus
from agent.api.generated import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_API = "unix:///run/bpfproxy/api.sock"


def service_ports_message(status: AgentStatus) -> list[agent_pb2.ServicePort]:
    return [agent_pb2.ServicePort(
        namespace=sp.name.namespace, name=sp.name.name, port_name=sp.name.port_name,
        protocol=sp.name.protocol.value,
        frontends=[agent_pb2.Frontend(address=str(f.address), port=f.port, kind=kind)
                   for f, kind in sp.frontends],
        backends=[agent_pb2.Backend(address=str(b.address), port=b.port, state=state)
                  for b, state in sp.backends])
        for sp in status.services]


class AgentService(agent_pb2_grpc.AgentServicer):
    def __init__(self, status: AgentStatus) -> None:
        self.status = status

    async def GetStatus(self, request, context):
        s = self.status
        service_ports, frontends, backends = s.view.counts
        return agent_pb2.Status(
            synced=s.synced, node_name=s.node_name, service_ports=service_ports,
            frontends=frontends, backends=backends, last_sync_unix=s.last_sync_unix,
            syncs=s.syncs, sync_errors=s.sync_errors, source=s.source,
            last_event_to_kernel_seconds=s.last_event_to_kernel_seconds,
            last_sync_seconds=s.last_sync_seconds, change_syncs=s.change_syncs)

    async def ListServices(self, request, context):
        return agent_pb2.ListServicesResponse(services=service_ports_message(self.status))


async def start(address: str, status: AgentStatus) -> grpc.aio.Server:
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServicer_to_server(AgentService(status), server)
    if address.startswith("unix://"):
        path = Path(address.removeprefix("unix://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()    # left by an agent that was killed; we own this path
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on --api {address}")
    await server.start()
    if address.startswith("unix://"):
        os.chmod(address.removeprefix("unix://"), 0o660)
    log.info("event=api_listening address=%s", address)
    return server
