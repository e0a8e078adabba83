"""Sync events fanned out to WatchEvents clients and metrics, never blocking the publisher.

Each subscriber has a bounded queue; when it is full the event is dropped for that one
subscriber and counted, and its next delivered event says how many it missed."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

QUEUE_SIZE = 256          # events a client may fall behind before it starts missing some
MAX_SUBSCRIBERS = 64


@dataclass(frozen=True, slots=True)
class Event:
    kind: str                       # sync | sync_failed | conflict | source_failed
    time_unix: float
    fields: dict = field(default_factory=dict)
    dropped_before: int = 0         # events this subscriber missed just before this one


class TooManySubscribers(RuntimeError):
    pass


class Subscription:
    def __init__(self, hub: EventHub, size: int) -> None:
        self._hub = hub
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=size)
        self.missed = 0              # since the last event delivered

    def offer(self, event: Event) -> bool:
        try:
            self.queue.put_nowait(event)
            return True
        except asyncio.QueueFull:
            self.missed += 1
            return False

    async def next(self) -> Event:
        event = await self.queue.get()
        missed, self.missed = self.missed, 0
        # what was missed happened before whatever is now the oldest queued event; the
        # count is told with the next event out, which is the nearest one can say
        return Event(event.kind, event.time_unix, event.fields, missed) if missed else event

    def close(self) -> None:
        self._hub._subscribers.discard(self)


class EventHub:
    """publish() is called on the agent's loop (Agent.on_event); listeners are plain
    callbacks (metrics), subscriptions are queues (WatchEvents streams)."""

    def __init__(self, queue_size: int = QUEUE_SIZE,
                 max_subscribers: int = MAX_SUBSCRIBERS) -> None:
        self.queue_size = queue_size
        self.max_subscribers = max_subscribers
        self._subscribers: set[Subscription] = set()
        self._listeners: list[Callable[[Event], None]] = []
        self.published = 0
        self.dropped = 0             # over all subscribers: slow clients' missed events
        self.errors: dict[str, int] = {}   # failure events by kind

    def publish(self, kind: str, fields: dict) -> None:
        event = Event(kind, time.time(), dict(fields))
        self.published += 1
        if kind != "sync":
            self.errors[kind] = self.errors.get(kind, 0) + 1
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event=event_listener_failed kind=%s", kind)
        for subscription in list(self._subscribers):
            if not subscription.offer(event):
                self.dropped += 1

    def listen(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    def subscribe(self) -> Subscription:
        if len(self._subscribers) >= self.max_subscribers:
            raise TooManySubscribers(f"{self.max_subscribers} event watchers already")
        subscription = Subscription(self, self.queue_size)
        self._subscribers.add(subscription)
        return subscription

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
