"""One directory's inotify watch (not recursive), on the event loop: which names changed,
and whether only a whole pass can tell what did (the queue overflowed, a directory came
or went, the watched directory itself was moved, deleted or unmounted). Linux only, as
the agent is; watchfiles, used before, drops the overflow event (it carries no path)."""
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
# the watch is gone: nothing more will be reported
WATCH_ENDED = IN_IGNORED | IN_UNMOUNT

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


def parse_events(data: bytes) -> Events:
    """The events in one read of an inotify descriptor (whole events only: the kernel
    never splits one across reads)."""
    out = Events()
    offset, size = 0, len(data)
    while offset + _EVENT.size <= size:
        _, mask, _, length = _EVENT.unpack_from(data, offset)
        offset += _EVENT.size
        name = data[offset:offset + length].split(b"\0", 1)[0]
        offset += length
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
    what they say."""

    def __init__(self, directory: os.PathLike | str, step: float, debounce: float) -> None:
        self.step, self.debounce = step, debounce
        libc = _lib()
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise _os_error("inotify_init1", directory)
        if libc.inotify_add_watch(fd, os.fsencode(directory), WATCH_MASK) < 0:
            error = _os_error("inotify_add_watch", directory)
            os.close(fd)
            raise error
        self._fd: int | None = fd
        self._ready: asyncio.Event | None = None

    def close(self) -> None:
        if self._fd is not None:
            if self._ready is not None:
                asyncio.get_running_loop().remove_reader(self._fd)
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
            out.add(parse_events(data))

    async def changed(self, clock: Callable[[], float] = None) -> Events:
        loop = asyncio.get_running_loop()
        clock = clock or loop.time
        if self._ready is None:
            self._ready = asyncio.Event()
            loop.add_reader(self._fd, self._ready.set)
        events = self._drain()
        while not (events.names or events.whole or events.ended):
            self._ready.clear()
            await self._ready.wait()
            events = self._drain()
        first = clock()
        while not events.ended and clock() - first < self.debounce:
            await asyncio.sleep(self.step)
            more = self._drain()
            if not (more.names or more.whole or more.ended):
                break                           # quiet for a step: the writer is done
            events.add(more)
        return events


def _os_error(call: str, directory) -> OSError:
    code = ctypes.get_errno() or errno.EIO
    return OSError(code, f"{call}: {os.strerror(code)}", str(directory))
