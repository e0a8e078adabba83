"""Python's cyclic collector around large syncs (agent/sync_step.py, issue 16): paused
while the first listing is read and synced, and what a full sync leaves frozen out of its
walks (reference counting still frees it)."""
from __future__ import annotations

import asyncio
import gc

import pytest

from agent import sync_step
from agent.agent import Agent
from tests.fakes import FakeServiceMaps
from tests.unit.test_agent import ScriptedSource, endpoint_slice, run, service, upserts


@pytest.fixture(autouse=True)
def collector_as_it_was():
    enabled = gc.isenabled()
    yield
    for timer in sync_step._start_pause:
        timer.cancel()
    sync_step._start_pause.clear()
    gc.unfreeze()
    if enabled:
        gc.enable()


def test_the_start_pause_ends_with_the_first_full_sync():
    async def scenario():
        sync_step.pause_collector_for_start()
        paused = not gc.isenabled()
        sync_step.freeze_after_full_sync()
        return paused

    assert gc.get_freeze_count() == 0
    assert asyncio.run(scenario())
    assert gc.isenabled() and gc.get_freeze_count() > 0


def test_garbage_cycles_of_the_start_are_collected_not_frozen():
    import weakref

    class Node:
        pass

    async def scenario():
        sync_step.pause_collector_for_start()
        cycle = Node()
        cycle.itself = cycle
        gone = weakref.ref(cycle)
        del cycle                     # garbage, but only the collector can free it
        sync_step.freeze_after_full_sync()
        return gone

    assert asyncio.run(scenario())() is None


def test_the_start_pause_ends_by_itself_when_no_sync_comes(monkeypatch):
    monkeypatch.setattr(sync_step, "START_PAUSE_LONGEST", 0.05)

    async def scenario():
        sync_step.pause_collector_for_start()
        paused = not gc.isenabled()
        await asyncio.sleep(0.2)
        return paused

    assert asyncio.run(scenario())
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_an_agent_that_freezes_its_heap_does_so_after_a_full_sync_only_when_asked():
    def synced(freeze_heap: bool) -> int:
        gc.unfreeze()
        source = ScriptedSource([upserts(service("web", ["10.96.0.1"]),
                                         endpoint_slice("web", ["10.0.0.1"]))])
        run(Agent(source, FakeServiceMaps(), min_sync_period=0.01, freeze_heap=freeze_heap))
        return gc.get_freeze_count()

    assert synced(False) == 0
    assert synced(True) > 0
    assert gc.isenabled()


def test_a_large_incremental_sync_freezes_the_heap_as_a_full_one_does(monkeypatch):
    """A churn arrives as incremental batches (under half the services each): a batch of
    many services leaves as much long-lived memory as a full sync, frozen alike; a small
    one does not freeze (its young objects are the collector's business)."""
    from agent import agent as agent_module
    monkeypatch.setattr(agent_module, "FREEZE_AFTER_SERVICES", 3)
    services = [service(f"s{i}", [f"10.96.0.{i + 1}"]) for i in range(10)]
    slices = [endpoint_slice(f"s{i}", ["10.0.0.1"]) for i in range(10)]

    def freezes(changed: int) -> list[tuple[int, int]]:
        batch = upserts(*[endpoint_slice(f"s{i}", ["10.0.0.2"]) for i in range(changed)])
        agent = Agent(ScriptedSource([upserts(*services, *slices), batch]),
                      FakeServiceMaps(), min_sync_period=0.01, freeze_heap=True)
        seen = []
        monkeypatch.setattr(agent_module, "freeze_after_full_sync", lambda: seen.append(
            (agent.status.syncs, agent.status.full_syncs)))
        run(agent)
        assert agent.status.full_syncs == 1 and agent.status.syncs == 2
        return seen

    assert freezes(2) == [(1, 1)]                  # the first, full sync only
    assert freezes(4) == [(1, 1), (2, 1)]          # and the large incremental one
