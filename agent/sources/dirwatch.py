"""One directory's inotify watch (not recursive), on the event loop: which names changed,
and whether only a whole pass can tell what did (the queue overflowed, a directory came
or went, the watched directory itself was moved, deleted or unmounted: then the watch has
ended and rearm() watches whatever directory the path names again). Linux only, as the
agent is; watchfiles, used before, drops the overflow event (it carries no path)."""
from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000

WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO
              | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
# events after which the names reported cannot say what changed
WHOLE_PASS = IN_Q_OVERFLOW | IN_ISDIR | IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED
# the watch no longer follows the path: gone, or (moved) following the directory elsewhere
WATCH_ENDED = IN_IGNORED | IN_UNMOUNT | IN_DELETE_SELF | IN_MOVE_SELF

_EVENT = struct.Struct("iIII")          # struct inotify_event: wd, mask, cookie, len; name
_READ_SIZE = 256 * 1024


@dataclass(slots=True)
class Events:
    """What the events read so far say."""
    names: set[str] = field(default_factory=set)    # entries created, written, moved, gone
    whole: bool = False                               # only a whole pass can tell
    ended: bool = False                               # the watch is gone

    def add(self, other: Events) -> None:
        self.names |= other.names
        self.whole |= other.whole
        self.ended |= other.ended


def parse_events(data: bytes, wd: int | None = None) -> Events:
    """The events in one read of an inotify descriptor (whole events only: the kernel
    never splits one across reads). wd, when given: events of other watches (one ended,
    re-armed since) are left out; the queue's overflow (wd -1) is not."""
    out = Events()
    offset, size = 0, len(data)
    while offset + _EVENT.size <= size:
        event_wd, mask, _, length = _EVENT.unpack_from(data, offset)
        offset += _EVENT.size
        name = data[offset:offset + length].split(b"\0", 1)[0]
        offset += length
        if wd is not None and event_wd not in (wd, -1):
            continue
        if mask & WHOLE_PASS:
            out.whole = True
        if mask & WATCH_ENDED:
            out.ended = True
        if name and not mask & IN_ISDIR:
            out.names.add(os.fsdecode(name))
    return out


_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6", use_errno=True)
    return _libc


class DirectoryWatch:
    """An inotify descriptor watching one directory. changed() waits for the first event,
    then until no more come for `step` seconds (at most `debounce` in all), and returns
    what they say. The descriptor is watched by the loop only while changed() waits for
    a first event: asyncio's readers are level-triggered, so one left registered through
    the debounce's sleeps would be called on every turn of the loop while events are
    pending (a busy loop for as long as a writer keeps writing)."""

    def __init__(self, directory: os.PathLike | str, step: float, debounce: float) -> None:
        self.directory = directory
        self.step, self.debounce = step, debounce
        fd = _lib().inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise _os_error("inotify_init1", directory)
        self._fd: int | None = fd
        self._wd: int | None = None        # None: not watching (ended, not re-armed yet)
        try:
            self._arm()
        except OSError:
            os.close(fd)
            self._fd = None
            raise

    @property
    def armed(self) -> bool:
        return self._wd is not None

    def _arm(self) -> None:
        wd = _lib().inotify_add_watch(self._fd, os.fsencode(self.directory), WATCH_MASK)
        if wd < 0:
            raise _os_error("inotify_add_watch", self.directory)
        self._wd = wd

    def rearm(self) -> bool:
        """After the watch ended: watch the directory the path names now. False while
        there is none (moved away, deleted, not a directory): try again later."""
        if self._fd is None:
            return False
        self._ended()
        try:
            self._arm()
        except OSError:
            return False
        return True

    def close(self) -> None:
        """Also off the loop (the reader is registered only while changed() waits)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _drain(self) -> Events:
        out = Events()
        while True:
            try:
                data = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                return out
            if not data:
                return out
            # not armed: only an overflow is read (0 is no watch's number)
            out.add(parse_events(data, 0 if self._wd is None else self._wd))

    async def _readable(self) -> None:
        """Until the descriptor has something to read: the reader is removed by its first
        call (one call per wait, however long the events wait to be read)."""
        loop = asyncio.get_running_loop()
        woken = loop.create_future()
        fd = self._fd

        def wake() -> None:
            loop.remove_reader(fd)
            if not woken.done():
                woken.set_result(None)

        loop.add_reader(fd, wake)
        try:
            await woken
        finally:
            loop.remove_reader(fd)

    async def changed(self, clock: Callable[[], float] = None) -> Events:
        loop = asyncio.get_running_loop()
        clock = clock or loop.time
        events = self._drain()
        while not (events.names or events.whole or events.ended):
            await self._readable()
            events = self._drain()
        if events.ended:
            self._ended()
            return events
        first = clock()
        while clock() - first < self.debounce:
            await asyncio.sleep(self.step)
            more = self._drain()
            if not (more.names or more.whole or more.ended):
                break                           # quiet for a step: the writer is done
            events.add(more)
            if more.ended:
                self._ended()
                break
        return events

    def _ended(self) -> None:
        """The watch no longer follows the path: a moved directory's watch is removed (it
        would report the directory where it went); what the old watch still queues, its
        IN_IGNORED included, is left out by its number (the kernel does not reuse it soon)."""
        if self._wd is not None and self._fd is not None:
            _lib().inotify_rm_watch(self._fd, self._wd)
        self._wd = None


def _os_error(call: str, directory) -> OSError:
    code = ctypes.get_errno() or errno.EIO
    return OSError(code, f"{call}: {os.strerror(code)}", str(directory))
