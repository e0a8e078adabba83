"""Issue 14.1 through the API: status, services, the CLI's output and metrics list what
the kernel holds, and name what is held back (file, object, why) as such."""
from __future__ import annotations

import asyncio

from prometheus_client import generate_latest

from agent import cli_output
from agent.agent import Agent
from agent.api import client, server
from agent.api.generated import agent_pb2, agent_pb2_grpc
from agent.api.metrics import Metrics
from agent.api.observed import Observed
from agent.model.types import ObjectKey
from agent.planner import plan
from agent.sources.events import HeldBack, ObjectChange
from tests.fakes import FakeServiceMaps
from tests.unit.test_agent import _desired, endpoint_slice, service

KEPT = ObjectKey("Service", "ns", "b")
HELD = (HeldBack("b.yaml", "while parsing a block mapping", (KEPT,)),
        HeldBack("x.yaml", "while scanning a quoted scalar", unknown=True))


class HoldingSource:
    """One listing, with a file broken after a good read and one never read."""
    held_back = HELD
    malformed_documents = 2

    async def changes(self):
        objects = [service("a", ["10.96.0.1"]), endpoint_slice("a", ["10.0.0.1"]),
                   service("b", ["10.96.0.2"])]
        yield [ObjectChange(o.key, o) for o in objects]
        await asyncio.Event().wait()


def synced() -> tuple[Agent, FakeServiceMaps]:
    """An agent restarted on a kernel holding a, b and x (x: of the file never read)."""
    maps = FakeServiceMaps()
    maps.apply(plan({**_desired("a", "10.96.0.1"), **_desired("x", "10.96.0.9")}, {}).ops)

    async def run() -> Agent:
        agent = Agent(HoldingSource(), maps)
        done = asyncio.Event()
        agent.on_event = lambda kind, fields: done.set() if kind == "sync" else None
        task = asyncio.create_task(agent.run())
        await asyncio.wait_for(done.wait(), 10)
        agent.stop()
        await asyncio.wait_for(task, 10)
        return agent

    return asyncio.run(run()), maps


def test_status_services_and_metrics_show_what_is_held_back(tmp_path):
    agent, maps = synced()
    kernel = {str(f) for s in maps.read_back().values() for f in s.frontends}
    assert kernel == {"10.96.0.1:80/TCP", "10.96.0.2:80/TCP", "10.96.0.9:80/TCP"}
    observed = Observed(agent.status, source=agent.source, source_kind="manifests",
                        source_location="/m")
    address = f"unix://{tmp_path}/api.sock"

    async def ask():
        srv = await server.start(address, observed, None, server.WatchLimits())
        try:
            async with grpc_channel(address) as channel:
                stub = agent_pb2_grpc.AgentStub(channel)
                status = await stub.GetStatus(agent_pb2.GetStatusRequest())
                services = await stub.ListServices(agent_pb2.ListServicesRequest())
                return status, services.services
        finally:
            await srv.stop(grace=None)

    status, services = asyncio.run(ask())
    listed = {f"{f.address}:{f.port}/{s.protocol}" for s in services for f in s.frontends}
    assert listed == kernel and status.service_ports == len(maps.read_back())
    (adopted,) = [s for s in services if s.held_back]
    assert (adopted.namespace, adopted.name) == ("", "") and "x.yaml" in adopted.held_back
    assert [f.address for f in adopted.frontends] == ["10.96.0.9"]
    held = [(h.origin, list(h.objects), h.unknown) for h in status.source_state.held_back]
    assert held == [("b.yaml", ["Service ns/b"], False), ("x.yaml", [], True)]
    assert status.errors["source_malformed_documents"] == 2

    entry = client.service_entry(adopted)
    assert entry["held_back"] == adopted.held_back and entry["name"] == ""
    assert "held_back" not in client.service_entry(next(s for s in services if s.name == "a"))
    text = cli_output.status_text(client.to_plain(status))
    assert "held back    b.yaml: while parsing a block mapping (Service ns/b)" in text
    assert "held back    x.yaml: while scanning a quoted scalar (content unknown" in text
    assert "(adopted, owner unknown)" in cli_output.services_table(
        [client.to_plain(s) for s in services], None)

    metrics = generate_latest(Metrics(observed).registry).decode()
    assert ('bpfproxy_source_held_back{object="Service ns/b",origin="b.yaml",'
            'reason="while parsing a block mapping"} 1.0') in metrics
    assert 'bpfproxy_source_held_back{object="",origin="x.yaml"' in metrics
    assert "bpfproxy_service_ports_held_back 1.0" in metrics
    assert f"bpfproxy_service_ports {float(len(maps.read_back()))}" in metrics


def grpc_channel(address: str):
    import grpc
    return grpc.aio.insecure_channel(address)
