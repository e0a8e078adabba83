"""A source read ahead of its consumer: agent/main.py starts reading it while the loader
child still compiles (seconds of a second core), and the Agent, built once the maps are
there, takes what was read as if it came now.

Each batch keeps what it was handed on with: the source's held_back as of that batch (the
Agent reads held_back for the batches it recorded, not for those still queued) and, before
it, the events the source told on_event (bad input), in their order."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from agent.sources.events import HeldBack, ObjectChange

log = logging.getLogger(__name__)

_END = object()


class ReadAhead:
    """Wraps a source (agent.Source); reading starts at construction, on the running loop.
    Other attributes (complete, stalled, counters) are the source's own, read live."""

    def __init__(self, source) -> None:
        self._source = source
        self._items: asyncio.Queue = asyncio.Queue()
        self._held_back: tuple[HeldBack, ...] = ()
        # set by the consumer (the Agent); what the source tells meanwhile waits in order
        self.on_event: Callable[[str, dict], None] | None = None
        if hasattr(source, "on_event"):
            source.on_event = lambda kind, fields: self._items.put_nowait(
                ("event", (kind, fields)))
        self._reader = asyncio.create_task(self._read(), name="source-read-ahead")

    def __getattr__(self, name: str):
        return getattr(self._source, name)

    @property
    def held_back(self) -> tuple[HeldBack, ...]:
        """The source's held_back as of the last batch changes() handed on."""
        return self._held_back

    async def _read(self) -> None:
        try:
            async for batch in self._source.changes():
                # on the loop, in the turn the source hands the batch on: as of this batch
                self._items.put_nowait(("batch", (batch, tuple(self._source.held_back))))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- handed to the consumer, who reports it
            self._items.put_nowait(("error", exc))
            return
        self._items.put_nowait(("end", _END))

    async def changes(self) -> AsyncIterator[list[ObjectChange]]:
        while True:
            kind, item = await self._items.get()
            if kind == "event":
                self._tell(*item)
            elif kind == "batch":
                batch, self._held_back = item
                yield batch
            elif kind == "error":
                raise item
            else:
                return

    def _tell(self, kind: str, fields: dict) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, fields)
            except Exception:
                log.exception("event=observer_failed kind=%s", kind)

    async def close(self) -> None:
        """Stop reading: the source's own clean-up runs (its watch, threads) before this
        returns."""
        self._reader.cancel()
        try:
            await self._reader
        except asyncio.CancelledError:
            pass
