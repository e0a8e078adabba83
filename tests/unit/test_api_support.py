"""Shared by the test_api_* unit tests: a real Agent synced once on the fake kernel door,
so the API reads a real AppliedView (planner ids, scopes, merged service ports)."""
from __future__ import annotations

import asyncio

from agent.agent import Agent, AgentStatus
from agent.model.objects import parse_endpoint_slice, parse_service
from agent.sources.events import ObjectChange
from lab import manifests
from tests.fakes import FakeServiceMaps


def service(name: str, ip: str, ports: list[tuple[str, int]], namespace: str = "ns",
            node_port: bool = False):
    service_ports = [{"name": n, "port": p, "protocol": "TCP", "targetPort": 8080,
                      **({"nodePort": 30000 + p} if node_port else {})} for n, p in ports]
    return parse_service(manifests.service(
        name, ip, service_ports, namespace, service_type="NodePort" if node_port else "ClusterIP"))


def endpoint_slice(name: str, addresses: list[str], port_names: list[str],
                   namespace: str = "ns"):
    return parse_endpoint_slice(manifests.endpoint_slice(
        name, addresses, [{"name": n, "port": 8080, "protocol": "TCP"} for n in port_names],
        namespace, name=f"{name}-1", node_name="n1"))


class OnceSource:
    held_back = ()

    def __init__(self, objects) -> None:
        self.objects = objects

    async def changes(self):
        yield [ObjectChange(o.key, o) for o in self.objects]
        await asyncio.Event().wait()


def synced_status(objects, node_ips=()) -> tuple[AgentStatus, Agent]:
    """Run a real Agent until its first sync is in the (fake) kernel."""
    from agent.model.types import NodeContext

    async def run() -> Agent:
        agent = Agent(OnceSource(objects), FakeServiceMaps(),
                      node=NodeContext("n1", tuple(node_ips), ()))
        synced = asyncio.Event()
        agent.on_event = lambda kind, fields: synced.set() if kind == "sync" else None
        task = asyncio.create_task(agent.run())
        await asyncio.wait_for(synced.wait(), 10)
        agent.stop()
        await asyncio.wait_for(task, 10)
        return agent

    agent = asyncio.run(run())
    return agent.status, agent


def cluster():
    """web (2 ports, 3 backends), db (1 port, no backends), np in another namespace with
    a NodePort (so it has an internal and an external svc_id)."""
    import ipaddress
    return [service("web", "10.96.0.10", [("http", 80), ("https", 443)]),
            endpoint_slice("web", ["10.244.1.2", "10.244.1.3", "10.244.1.4"],
                           ["http", "https"]),
            service("db", "10.96.0.20", [("sql", 5432)]),
            service("np", "10.96.0.30", [("http", 80)], namespace="other", node_port=True),
            endpoint_slice("np", ["10.244.1.5"], ["http"], namespace="other")], \
        (ipaddress.ip_address("192.168.50.1"),)
