"""A source read while the loader child compiles (agent/read_ahead.py): what the agent
takes later is what it would have taken then, batch by batch, with held_back as of each
batch and the source's events before the batch they came with."""
from __future__ import annotations

import asyncio

import pytest

from agent.agent import Agent
from agent.read_ahead import ReadAhead
from agent.sources.events import HeldBack, ObjectChange
from tests.fakes import FakeServiceMaps
from tests.unit.test_agent import TIMEOUT, Watch, service, upserts

BROKEN = (HeldBack("c.yaml", "while parsing a flow mapping", unknown=True),)


class Steps:
    """Yields its batches at once, each with its held_back, telling on_event before each;
    then ends, raises, or waits (recording that its clean-up ran)."""

    def __init__(self, steps, fail: Exception | None = None, wait: bool = False):
        self.steps, self.fail, self.wait = steps, fail, wait
        self.held_back: tuple[HeldBack, ...] = ()
        self.on_event = None
        self.read = 0
        self.cleaned_up = False
        self.complete = "the source's own"

    async def changes(self):
        try:
            for number, (batch, held) in enumerate(self.steps):
                self.held_back = held
                if self.on_event is not None:
                    self.on_event("source_input", {"message": f"before batch {number}"})
                self.read += 1
                yield batch
            if self.fail:
                raise self.fail
            if self.wait:
                await asyncio.Event().wait()
        finally:
            self.cleaned_up = True


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_batches_read_before_anyone_takes_them_come_with_their_held_back_and_events():
    a, b = service("a", ["10.96.0.1"]), service("b", ["10.96.0.2"])
    source = Steps([(upserts(a), ()), (upserts(b), BROKEN), ([ObjectChange(a.key, None)], ())])

    async def scenario():
        ahead = ReadAhead(source)
        await _settle()
        read_before = source.read              # nobody consumed yet
        told, taken = [], []
        ahead.on_event = lambda kind, fields: told.append(fields["message"])
        async for batch in ahead.changes():
            taken.append(([c.key.name for c in batch], ahead.held_back, list(told)))
        await ahead.close()
        return read_before, taken, ahead

    read_before, taken, ahead = asyncio.run(scenario())
    assert read_before == 3
    assert taken == [(["a"], (), ["before batch 0"]),
                     (["b"], BROKEN, ["before batch 0", "before batch 1"]),
                     (["a"], (), ["before batch 0", "before batch 1", "before batch 2"])]
    assert ahead.complete == "the source's own"


def test_a_source_failure_reaches_the_consumer_after_the_batches_before_it():
    source = Steps([(upserts(service("a", ["10.96.0.1"])), ())], fail=OSError("gone"))

    async def scenario():
        ahead = ReadAhead(source)
        taken = []
        with pytest.raises(OSError, match="gone"):
            async for batch in ahead.changes():
                taken.append(batch)
        await ahead.close()
        return taken

    assert len(asyncio.run(scenario())) == 1


def test_close_runs_the_sources_clean_up():
    source = Steps([([], ())], wait=True)

    async def scenario():
        ahead = ReadAhead(source)
        await _settle()
        assert not source.cleaned_up
        await ahead.close()

    asyncio.run(scenario())
    assert source.cleaned_up


def test_the_agent_takes_a_listing_read_ahead_and_its_bad_input(tmp_path):
    """A manifest directory read before the Agent exists (as agent/main.py does while the
    loader compiles): the Agent syncs it, and its bad input reaches the event stream."""
    from agent.sources.manifests import ManifestSource
    (tmp_path / "web.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\n"
        "spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n"
        "---\nkind: Servce\napiVersion: v1\nmetadata: {name: typo}\n")
    maps = FakeServiceMaps()

    async def scenario():
        source = ManifestSource(tmp_path)
        ahead = ReadAhead(source)
        async with asyncio.timeout(TIMEOUT):
            while ahead._items.qsize() < 2:      # the event, then the first batch
                await asyncio.sleep(0.01)
        agent = Agent(ahead, maps, min_sync_period=0.01)
        watch = Watch(agent)
        task = asyncio.create_task(agent.run())
        try:
            await watch.until(lambda: agent.status.synced and any(
                kind == "source_input" for kind, _ in watch.events), "synced, input told")
        finally:
            agent.stop()
            await asyncio.wait_for(task, 5)
            await ahead.close()
        return watch.events

    events = asyncio.run(scenario())
    told = [f["message"] for kind, f in events if kind == "source_input"]
    assert told == ["web.yaml document[1]: apiVersion 'v1', kind 'Servce' is not read: "
                    "ignored (did you mean apiVersion: v1, kind: Service?)"]
    assert {str(f) for f in maps.frontends} == {"10.96.0.1:80/TCP"}
