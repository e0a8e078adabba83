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
