"""A manifest source stuck on one file (issue 13 A2): /healthz fails and `bpfproxy status`
says why, while the agent's loop keeps turning; both recover when the read ends."""
from __future__ import annotations

import asyncio
import threading
import time

from agent import cli_output
from agent.agent import AgentStatus
from agent.api.healthz import Health
from agent.api.observed import Observed
from agent.sources import manifests
from agent.sources.manifests import ManifestSource
from tests.unit.test_manifest_source import svc, write

WAIT = 5.0


def status_of(observed: Observed) -> dict:
    """GetStatus as the CLI receives it, the fields status_text reads."""
    return {"synced": True, "service_ports": 1, "frontends": 1, "backends": 1,
            "node_name": "n", "source": "manifests", "version": "v",
            "last_sync_unix": 0.0, "last_sync_seconds": 0.0,
            "last_event_to_kernel_seconds": 0.0, "syncs": 1, "full_syncs": 1,
            "change_syncs": 0, "sync_errors": 0, "errors": {}, "programs": [], "maps": [],
            "source_state": {"kind": "manifests", "location": "d",
                             "complete": observed.source_complete,
                             "stalled": observed.source_stalled}}


def test_a_stuck_read_fails_healthz_and_shows_in_status(tmp_path, monkeypatch):
    # A parse that does not end (what a pathological file would cost), held by an event.
    reading, release = threading.Event(), threading.Event()
    real = manifests._load_documents

    def stuck(path, *args):
        if path.name == "slow.yaml":
            reading.set()
            release.wait(WAIT * 4)
        return real(path, *args)

    monkeypatch.setattr(manifests, "_load_documents", stuck)
    write(tmp_path, "web.yaml", svc("web"))
    source = ManifestSource(tmp_path, stall_seconds=0.05)
    status = AgentStatus(synced=True, last_sync_unix=time.time())
    observed = Observed(status, source=source)
    health = Health(observed)
    assert health.healthz()[0] == 200

    async def scenario():
        changes = source.changes()
        await asyncio.wait_for(anext(changes), WAIT)
        write(tmp_path, "slow.yaml", svc("slow", ip="10.96.0.11"))
        pending = asyncio.ensure_future(anext(changes))
        await asyncio.to_thread(reading.wait, WAIT)
        # the loop keeps turning while the source's thread is stuck
        turns = 0
        while not source.stalled and turns < WAIT * 100:
            await asyncio.sleep(0.01)
            turns += 1
        code, body = health.healthz()
        text = cli_output.status_text(status_of(observed))
        release.set()
        batch = await asyncio.wait_for(pending, WAIT)
        await changes.aclose()
        return code, body, text, batch

    code, body, text, batch = asyncio.run(scenario())
    assert code == 503 and "manifest source stalled: reading slow.yaml" in body["reason"]
    assert "STALLED: manifest source stalled: reading slow.yaml" in text
    assert [c.key.name for c in batch] == ["slow"]
    status.last_sync_unix = time.time()
    assert source.stalled == "" and health.healthz()[0] == 200
