"""The agent loop with the fake kernel door: never a half-listed world, never raising into
the loop, retrying failures, repairing drift, serving only what the datapath can."""
from __future__ import annotations

import asyncio
import ipaddress

from agent.agent import Agent
from agent.model.objects import parse_endpoint_slice, parse_service
from agent.planner import BackendAddr, plan
from agent.sources.events import ObjectChange
from tests.fakes import FakeServiceMaps


def service(name: str, ips: list[str], port: int = 80, protocol: str = "TCP"):
    return parse_service({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {"clusterIP": ips[0], "clusterIPs": ips,
                 "ports": [{"port": port, "protocol": protocol, "targetPort": 8080}]}})


def endpoint_slice(name: str, addresses: list[str], family: str = "IPv4",
                   protocol: str = "TCP"):
    return parse_endpoint_slice({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{name}-{family}", "namespace": "ns",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": family, "ports": [{"port": 8080, "protocol": protocol}],
        "endpoints": [{"addresses": [a]} for a in addresses]})


def upserts(*objects):
    return [ObjectChange(o.key, o) for o in objects]


class ScriptedSource:
    """Yields the given batches (a pause between them), then waits forever or raises."""

    def __init__(self, batches, fail: Exception | None = None, complete: bool = True):
        self.batches, self.fail, self.complete = batches, fail, complete

    async def changes(self):
        for batch in self.batches:
            yield batch
            await asyncio.sleep(0.05)
        if self.fail:
            raise self.fail
        await asyncio.Event().wait()


async def run_for(agent: Agent, seconds: float) -> int:
    task = asyncio.create_task(agent.run())
    await asyncio.sleep(seconds)
    agent.stop()
    return await asyncio.wait_for(task, 5)


def frontends(maps: FakeServiceMaps) -> set[str]:
    return {str(f) for f in maps.frontends}


def test_dual_stack_service_writes_only_the_family_the_datapath_serves(caplog):
    maps = FakeServiceMaps(families=frozenset({4}))
    source = ScriptedSource([upserts(
        service("web", ["10.96.0.1", "fd00::1"]),
        endpoint_slice("web", ["10.0.0.1"]), endpoint_slice("web", ["fd00:10::1"], "IPv6"))])
    agent = Agent(source, maps, min_sync_period=0.01)
    assert asyncio.run(run_for(agent, 0.3)) == 0
    assert frontends(maps) == {"10.96.0.1:80/TCP"}
    assert "event=service_port_unsupported" in caplog.text and "IPv6" in caplog.text
    assert agent.status.synced and len(agent.status.services) == 1
    assert 0 < agent.status.last_event_to_kernel_seconds < 1


def test_sctp_services_are_written_like_tcp_and_udp():
    maps = FakeServiceMaps()
    source = ScriptedSource([upserts(service("s", ["10.96.0.2"], protocol="SCTP"),
                                     endpoint_slice("s", ["10.0.0.1"], protocol="SCTP"))])
    asyncio.run(run_for(Agent(source, maps, min_sync_period=0.01), 0.3))
    assert frontends(maps) == {"10.96.0.2:80/SCTP"}


def test_a_source_that_dies_before_listing_stops_the_agent_instead_of_hanging():
    maps = FakeServiceMaps()
    agent = Agent(ScriptedSource([], fail=OSError("directory vanished")), maps)
    code = asyncio.run(asyncio.wait_for(agent.run(), 5))
    assert code == 1 and "directory vanished" in agent.status.failure
    assert not agent.status.synced


class FlakyMaps(FakeServiceMaps):
    def __init__(self, failures: int):
        super().__init__()
        self.failures = failures

    def apply(self, ops):
        if self.failures:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        super().apply(ops)


def test_a_failed_write_is_counted_and_retried_without_a_new_event():
    maps = FlakyMaps(failures=2)
    source = ScriptedSource([upserts(service("web", ["10.96.0.1"]),
                                     endpoint_slice("web", ["10.0.0.1"]))])
    agent = Agent(source, maps, min_sync_period=0.01, sync_period=60)
    asyncio.run(run_for(agent, 2.5))             # retries after 0.5 s, then 1 s
    assert agent.status.sync_errors == 2
    assert agent.status.synced and frontends(maps) == {"10.96.0.1:80/TCP"}


def test_an_incomplete_listing_keeps_what_the_kernel_already_serves():
    maps = FakeServiceMaps()
    adopted = plan({**_desired("a", "10.96.0.1"), **_desired("b", "10.96.0.2")}, {})
    maps.apply(adopted.ops)
    source = ScriptedSource([upserts(service("a", ["10.96.0.1"]))], complete=False)
    agent = Agent(source, maps, min_sync_period=0.01)
    asyncio.run(run_for(agent, 0.3))
    assert frontends(maps) == {"10.96.0.1:80/TCP", "10.96.0.2:80/TCP"}

    source = ScriptedSource([upserts(service("a", ["10.96.0.1"]))], complete=True)
    asyncio.run(run_for(Agent(source, maps, min_sync_period=0.01), 0.3))
    assert frontends(maps) == {"10.96.0.1:80/TCP"}


def test_the_periodic_sync_repairs_an_entry_deleted_behind_its_back():
    maps = FakeServiceMaps()
    source = ScriptedSource([upserts(service("web", ["10.96.0.1"]),
                                     endpoint_slice("web", ["10.0.0.1", "10.0.0.2"]))])
    agent = Agent(source, maps, min_sync_period=0.01, sync_period=0.2)

    async def scenario():
        task = asyncio.create_task(agent.run())
        await asyncio.sleep(0.2)
        maps.frontends.clear()               # someone deletes the frontend from outside
        await asyncio.sleep(0.6)
        agent.stop()
        return await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert frontends(maps) == {"10.96.0.1:80/TCP"}


def test_nothing_is_written_before_the_first_listing():
    maps = FakeServiceMaps()
    maps.apply(plan(_desired("old", "10.96.0.9"), {}).ops)

    class Silent:
        complete = True

        async def changes(self):
            await asyncio.Event().wait()
            yield []

    agent = Agent(Silent(), maps, min_sync_period=0.01)
    asyncio.run(run_for(agent, 0.3))
    assert frontends(maps) == {"10.96.0.9:80/TCP"}
    assert not agent.status.synced


def _desired(name: str, vip: str):
    from agent.model import desired_state
    return desired_state([service(name, [vip])], [endpoint_slice(name, ["10.0.0.1"])])




def test_changes_are_synced_incrementally_and_match_a_full_sync():
    services = [service(f"s{i:02d}", [f"10.96.0.{i + 1}"]) for i in range(40)]
    slices = [endpoint_slice(f"s{i:02d}", ["10.0.0.1", "10.0.0.2"]) for i in range(40)]
    batches = [upserts(*services, *slices),
               upserts(endpoint_slice("s03", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])),
               [ObjectChange(services[5].key, None)],                  # a service goes
               upserts(service("s07", ["10.96.0.8"], port=81))]        # a port changes
    maps = FakeServiceMaps()
    agent = Agent(ScriptedSource(batches), maps, min_sync_period=0.01)
    asyncio.run(run_for(agent, 0.6))
    assert agent.status.full_syncs == 1 and agent.status.syncs == 4
    from agent.model import desired_state
    final_services = [s for s in services if s.name not in ("s05", "s07")] + \
        [service("s07", ["10.96.0.8"], port=81)]
    final_slices = [s for s in slices if s.service_name != "s03"] + \
        [endpoint_slice("s03", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])]
    assert plan(desired_state(final_services, final_slices), maps.read_back()).ops == ()
    assert "10.96.0.6:80/TCP" not in frontends(maps) and "10.96.0.8:81/TCP" in frontends(maps)


def test_external_frontends_get_their_own_backends_under_a_local_policy():
    """iTP=Local: a ClusterIP connection from this node gets only this node's endpoints
    (none here: refused); a NodePort connection from this node is short-circuited to the
    cluster-wide ones, as kube-proxy does."""
    import ipaddress

    from agent.model.types import NodeContext
    svc = parse_service({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "ns"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
                 "internalTrafficPolicy": "Local",
                 "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}]}})
    remote = parse_endpoint_slice({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "ns",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"port": 8080}],
        "endpoints": [{"addresses": ["10.0.0.9"], "nodeName": "other"}]})
    maps = FakeServiceMaps()
    node = NodeContext("this", (ipaddress.ip_address("192.0.2.5"),))
    agent = Agent(ScriptedSource([upserts(svc, remote)]), maps, min_sync_period=0.01, node=node)
    asyncio.run(run_for(agent, 0.3))
    counts = {str(f): count for f, (_, count, *_) in maps.frontends.items()}
    assert counts == {"10.96.0.1:80/TCP": 0, "192.0.2.5:30080/TCP": 1}
    [port] = agent.status.services
    assert {kind for _, kind in port.frontends} == {"ClusterIP", "NodePort"}
    assert [str(b.address) for b, _ in port.backends] == ["10.0.0.9"]


def test_removed_udp_backends_are_handed_to_the_socket_cleanup():
    calls = []

    def cleanup(removed, still_served):
        calls.append(({str(b.address) for b in removed}, still_served))
        return 0

    dns = service("dns", ["10.96.0.53"], port=53, protocol="UDP")
    batches = [upserts(dns, endpoint_slice("dns", ["10.0.0.1", "10.0.0.2"], protocol="UDP")),
               upserts(endpoint_slice("dns", ["10.0.0.2"], protocol="UDP"))]
    agent = Agent(ScriptedSource(batches), FakeServiceMaps(), min_sync_period=0.01,
                  udp_cleanup=cleanup)
    asyncio.run(run_for(agent, 0.4))
    assert [removed for removed, _ in calls] == [{"10.0.0.1"}]
    still_served = calls[0][1]
    frontend = next(iter(agent._plan.owners))
    kept = BackendAddr(ipaddress.ip_address("10.0.0.2"), 8080)
    gone = BackendAddr(ipaddress.ip_address("10.0.0.1"), 8080)
    assert still_served(frontend, kept) and not still_served(frontend, gone)
