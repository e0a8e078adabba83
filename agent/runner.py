"""The sync runner: when to sync. A token bucket as kube-proxy's BoundedFrequencyRunner (a
lone change at once, a storm held to one sync per min_sync_period after a short burst, at
least one per sync_period), and retries with backoff after a failed sync."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

RETRY_FIRST = 0.5          # seconds before retrying a failed sync; doubles up to RETRY_MAX
RETRY_MAX = 10.0
SYNC_BURST = 2             # syncs allowed back to back before min_sync_period applies

# one sync, told whether to re-read the kernel first; True when it succeeded
Sync = Callable[[bool], Awaitable[bool]]


class SyncRunner:
    def __init__(self, sync: Sync, min_sync_period: float, sync_period: float,
                 dirty: asyncio.Event, stop: asyncio.Event) -> None:
        self._sync = sync
        self._min_sync_period = min_sync_period
        self._sync_period = sync_period
        self._dirty = dirty            # set when there is something to sync
        self._stop = stop

    async def run(self, listed: asyncio.Event) -> None:
        """Sync until stopped; the first sync waits for `listed`."""
        # Never program a half-listed world: wait for the complete first listing.
        if await self.wait(listed, None):
            return
        tokens, refilled = float(SYNC_BURST), time.monotonic()
        retry = RETRY_FIRST
        reread = False
        period = max(self._min_sync_period, 1e-6)
        while not self._stop.is_set():
            now = time.monotonic()
            tokens = min(SYNC_BURST, tokens + (now - refilled) / period)
            refilled = now
            if tokens < 1:
                if await self.wait(self._stop, (1 - tokens) * self._min_sync_period):
                    return
                tokens, refilled = 1.0, time.monotonic()
            tokens -= 1
            self._dirty.clear()
            if await self._sync(reread):
                retry, timeout = RETRY_FIRST, self._sync_period
            else:
                timeout, retry = retry, min(retry * 2, RETRY_MAX)
            if await self.wait(self._dirty, timeout):
                return
            # A timeout (no event): the periodic sync reads the kernel first, so drift
            # (an entry deleted from outside, a crashed write) is repaired.
            reread = not self._dirty.is_set()

    async def wait(self, event: asyncio.Event, timeout: float | None) -> bool:
        """Wait for event (or timeout); True when the runner is stopping."""
        stop = asyncio.create_task(self._stop.wait())
        other = asyncio.create_task(event.wait())
        await asyncio.wait({stop, other}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        other.cancel()
        return self._stop.is_set()
