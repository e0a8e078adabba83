"""Directory source: ordinary Kubernetes YAML/JSON files in one directory, re-read on change.
Yields the complete initial listing first, then only what changed; bad input never deletes,
and holds back only its own objects (held_back), never another file's changes."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
import yaml_rs
from yaml.events import CollectionEndEvent, CollectionStartEvent
from yaml.nodes import MappingNode, Node, SequenceNode

from agent.logfmt import kv
from agent.model.objects import HANDLED_KINDS, check_names, object_key, parse_object
from agent.model.types import EndpointSlice, InvalidObject, ObjectKey, Service
from agent.sources.apiserver.control_plane import ControlPlane
from agent.sources.dirwatch import DirectoryWatch
from agent.sources.events import HeldBack, ObjectChange

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
# PyYAML's C loader reads about 1 MB/s of `kind: List` (a 2 MiB file: 2-5 s on a busy node);
# json.loads is ~50x faster, and what remains (the objects) costs the same split or not.
DEFAULT_MAX_FILE_BYTES = 2 * 1024 * 1024
DEFAULT_MAX_JSON_BYTES = 32 * 1024 * 1024
DEFAULT_RESYNC_SECONDS = 30.0
# One file read, or the listing, taking longer than this is a stall: /healthz and status say so.
DEFAULT_STALL_SECONDS = 60.0
# A file rewritten in place (same inode) that lost objects may be half-written (`kubectl get
# ... > file` truncates first): its deletions wait for a read this much later that agrees.
DEFAULT_SHRINK_CONFIRM_SECONDS = 2.0
WAIT_FOR_DIRECTORY = 0.5          # seconds between looks for a directory not there yet
REARM_FIRST_SECONDS = 0.01        # the watched directory gone: first look again
# Kubernetes objects nest about ten deep. libyaml's composer recurses in C and kills the
# process on deep input (~40k levels on an 8 MiB stack, fewer on a thread's), so deeper
# files are refused before the composer sees them; 1000 is also Python's recursion limit.
MAX_NESTING = 1000

Object = Service | EndpointSlice
Signature = tuple[int, int, int]   # (mtime_ns, size, inode): a changed file changes one


@dataclass(slots=True)
class _FileRecord:
    signature: Signature | None        # None: not readable at the last listing
    objects: dict[ObjectKey, Object]   # the valid objects this file contributes
    readable: bool = True              # False: its last read failed, objects are older
    problem: str = ""                  # why it is unreadable, as last logged
    # keys its last read dropped, still served until a later read agrees (_withhold)
    withheld: frozenset[ObjectKey] = frozenset()
    withheld_since: float = 0.0
    known: bool = True                 # False: never read in this run, content unknown
    # objects its last read found invalid, kept at their previous version: key -> why
    # (None while there is none: no empty dict per file)
    kept: dict[ObjectKey, str] | None = None
    # the version whose documents that are not objects were reported (once per version)
    reported: Signature | None = None
    # a digest of the bytes last parsed: a file rewritten with the same bytes (every file
    # of a directory regenerated, a ConfigMap volume's keys under a new ..data) is not
    # parsed and admitted again
    digest: bytes | None = None


def _notable(record: _FileRecord) -> bool:
    """Whether the file holds something back (held_back names it)."""
    return not record.readable or bool(record.withheld) or bool(record.kept)


class _Refused(Exception):
    """A file not parsed at all (too large, not a regular file, a symlink out of the
    directory, excessive aliasing): its previous objects stay."""


class ManifestSource:
    """Watches one directory (not recursive; symlinks followed while their target stays
    inside it, so a ConfigMap volume's ..data swap is seen). Counters: invalid_objects,
    parse_errors, refused_files, malformed_documents (documents that are not Kubernetes
    objects). `stalled` says why the source is stuck, if it is; `held_back` what waits
    for a file to read again. on_event, when set, is told of bad input (on the loop)."""

    def __init__(self, directory: Path, *, resync_seconds: float = DEFAULT_RESYNC_SECONDS,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 max_json_bytes: int = DEFAULT_MAX_JSON_BYTES, watch_step_ms: int = 10,
                 watch_debounce_ms: int = 400, stall_seconds: float = DEFAULT_STALL_SECONDS,
                 shrink_confirm_seconds: float = DEFAULT_SHRINK_CONFIRM_SECONDS,
                 control_plane: ControlPlane | None = None) -> None:
        self.directory = Path(directory)
        # what a cluster's API server and controllers would have done to the files' objects
        self.control_plane = control_plane or ControlPlane()
        self.resync_seconds = resync_seconds
        self.max_file_bytes = max_file_bytes     # YAML, and any file not .json
        self.max_json_bytes = max_json_bytes
        self.stall_seconds = stall_seconds
        self.shrink_confirm_seconds = shrink_confirm_seconds
        # a change reaches us one quiet step after it happens (10 ms), at most debounce
        self.watch_step_ms = watch_step_ms
        self.watch_debounce_ms = watch_debounce_ms
        self.invalid_objects = 0
        self.parse_errors = 0
        self.refused_files = 0
        self.malformed_documents = 0
        self.on_event: Callable[[str, dict], None] | None = None
        self._notices: list[str] = []                # bad input found by the last pass
        # as of the last pass handed on, and of the last pass (published with its batch)
        self._held_back: tuple[HeldBack, ...] = ()
        self._next_held: tuple[HeldBack, ...] = ()
        # every file readable, as of the last pass: read from other threads (status,
        # health) while a pass fills _files, which they must not iterate
        self._complete = True
        self._files: dict[str, _FileRecord] = {}
        self._listed: dict[ObjectKey, Object] = {}   # what the consumer has been given
        # which files define a key: its one file's name (nearly every key), else a set
        self._key_files: dict[ObjectKey, str | set[str]] = {}
        self._touched: set[str] = set()              # names the watcher reported
        self._whole = False        # the watcher saw what only a whole pass can tell
        # manifests that are symlinks (a ConfigMap volume's keys): what they point at can
        # change with no event on their own name, so every watcher-woken pass stats them
        self._links: set[str] = set()
        self._withholding: set[str] = set()          # files with withheld deletions
        # files unreadable, withholding or keeping objects: what held_back and complete
        # are made of (a pass costs its names, not the directory)
        self._notable: set[str] = set()
        self._last_full = 0.0                        # when the last whole pass began
        # files read again because another file's change altered what they admit: their
        # bytes are the same, their admission is not
        self._force: set[str] | frozenset[str] = frozenset()
        # files holding a Service the control plane refused, as the pass began: always
        # parsed, so a touch (or a ConfigMap's ..data swap) retries the Service
        self._refusing: set[str] = set()
        self._gone: set[str] = set()       # files gone since the control plane settled
        # Progress, read by the health server's thread: the file being read (or "" for the
        # listing) and since when, while a pass runs; when the last pass ended, once watching.
        self._busy: tuple[str, float] | None = None
        self._last_pass: float | None = None

    async def changes(self) -> AsyncIterator[list[ObjectChange]]:
        # Not there yet (a ConfigMap volume not mounted, a directory being provisioned):
        # wait for it. The agent programs nothing before the first listing, so what the
        # kernel holds from an earlier run keeps serving meanwhile.
        waited = 0.0
        while not self.directory.is_dir():
            if waited == 0.0:
                log.warning(kv(event="source_unavailable", directory=self.directory,
                               action="waiting"))
            await asyncio.sleep(WAIT_FOR_DIRECTORY)
            waited += WAIT_FOR_DIRECTORY
        if waited:
            log.info(kv(event="source_available", directory=self.directory,
                        waited_seconds=round(waited, 1)))
        wake, stop = asyncio.Event(), asyncio.Event()
        watcher = asyncio.create_task(self._watch(wake, stop))
        # _watch arms inotify before its first await: one turn of the loop, and no edit can
        # fall between the listing below and the watch.
        await asyncio.sleep(0)
        self._last_pass = time.monotonic()
        try:
            batch = await asyncio.to_thread(self.rescan)
            self._publish()
            yield batch
            while True:
                # on time-out: the periodic resync, the safety net for what inotify misses,
                # or sooner a second read of a file that lost objects (_withhold)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self._next_read_in())
                woken = wake.is_set()
                wake.clear()
                touched, self._touched = self._touched, set()
                whole, self._whole = self._whole, False
                # A pass the watcher woke reads the names it reported (a one-file change
                # costs that file, not the directory); the periodic pass, an overflow or a
                # directory event lists everything.
                names_only = woken and not whole and \
                    time.monotonic() - self._last_full < self.resync_seconds
                unknown_before = self._unknown()
                try:
                    batch = await asyncio.to_thread(
                        self.rescan_names if names_only else self.rescan, touched)
                except Exception as e:
                    # Directory unreadable (or our bug): keep serving what was listed.
                    log.error(kv(event="rescan_failed", directory=self.directory, error=e),
                              exc_info=not isinstance(e, OSError))
                    continue
                self._publish()
                # an unknown file read at last, or gone, ends what is kept for it: news to
                # the agent even when no object changed
                if batch or self._unknown() != unknown_before:
                    yield batch
        finally:
            self._last_pass = None
            stop.set()
            watcher.cancel()
            await asyncio.wait({watcher}, timeout=2)

    def _unknown(self) -> bool:
        return any(held.unknown for held in self._held_back)

    def _publish(self) -> None:
        """On the loop, with the pass's batch (in the same turn as the agent records it):
        held_back as of that pass, and the bad input it found, told to on_event."""
        self._held_back = self._next_held
        notices, self._notices = self._notices, []
        for message in notices if self.on_event is not None else ():
            try:
                self.on_event("source_input", {"message": message})
            except Exception:
                log.exception(kv(event="observer_failed", kind="source_input"))

    async def _watch(self, wake: asyncio.Event, stop: asyncio.Event) -> None:
        watch = None
        try:
            # armed before changes() lists the directory: no edit falls between
            watch = DirectoryWatch(self.directory, self.watch_step_ms / 1000,
                                   self.watch_debounce_ms / 1000)
            while not stop.is_set():
                events = await watch.changed()
                self._touched |= events.names
                self._whole |= events.whole
                wake.set()
                if events.ended:
                    await self._rearm(watch, wake, stop)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 -- the periodic resync still runs
            log.warning(kv(event="watch_failed", directory=self.directory, error=e,
                           fallback=f"rescan every {self.resync_seconds}s"))
        finally:
            if watch is not None:
                watch.close()

    async def _rearm(self, watch: DirectoryWatch, wake: asyncio.Event,
                     stop: asyncio.Event) -> None:
        """The directory was moved, deleted or unmounted (a deploy swapping it by rename):
        watch whatever directory the path names again, as soon as there is one (looked
        for on a short backoff, up to WAIT_FOR_DIRECTORY apart), then a whole pass reads
        it. Said once when the watch ends and once when it is back."""
        log.warning(kv(event="watch_ended", directory=self.directory,
                       reason="the directory was moved, deleted or unmounted",
                       action="watching the path again once it is a directory"))
        delay, since = REARM_FIRST_SECONDS, time.monotonic()
        while not watch.rearm():
            if stop.is_set():
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, WAIT_FOR_DIRECTORY)
        self._whole = True     # what came before the new watch: only a listing tells
        wake.set()
        log.info(kv(event="watch_rearmed", directory=self.directory,
                    after_seconds=round(time.monotonic() - since, 3)))

    def _next_read_in(self) -> float:
        """Seconds until the periodic resync (a resync period after the last whole pass),
        or until a withheld shrink is due a read."""
        now = time.monotonic()
        periodic = max(0.0, self._last_full + self.resync_seconds - now)
        due = [self._files[name].withheld_since + self.shrink_confirm_seconds
               for name in self._withholding]
        if not due:
            return periodic
        return min(periodic, max(0.0, min(due) - now))

    @property
    def stalled(self) -> str:
        """Why the source is stuck, or "": one file (or the listing) taking longer than
        stall_seconds, or, while watching, no pass ended for a resync period and that long.
        Read from the health server's thread: parsing runs in a thread of its own."""
        now, busy, last_pass = time.monotonic(), self._busy, self._last_pass
        if busy is not None and now - busy[1] > self.stall_seconds:
            what = f"reading {busy[0]}" if busy[0] else f"listing {self.directory}"
            return f"manifest source stalled: {what} for {now - busy[1]:.0f}s"
        if busy is None and last_pass is not None and \
                now - last_pass > self.resync_seconds + self.stall_seconds:
            return (f"manifest source stalled: no pass over {self.directory} for "
                    f"{now - last_pass:.0f}s")
        return ""

    # --- synchronous part, run in a thread ---------------------------------------------

    @property
    def complete(self) -> bool:
        """False while a file cannot be read (held_back says which, and what it keeps),
        as of the last pass: another thread may ask while a pass fills the file records."""
        return self._complete

    @property
    def held_back(self) -> tuple[HeldBack, ...]:
        """What waits, as of the last batch handed on: each unreadable file with its last
        good objects (unknown when it was never read), objects kept at their previous
        version because the new one is invalid, and deletions waiting for a second read.
        Called rescan() directly (tests): as of that pass."""
        return self._held_back if self._last_pass is not None else self._next_held

    def _holds(self) -> tuple[HeldBack, ...]:
        held = []
        # most passes hold nothing back: only the few files that do are sorted
        for name, record in sorted((name, self._files[name]) for name in self._notable):
            if not record.readable:
                held.append(HeldBack(name, record.problem, tuple(sorted(
                    record.objects, key=str)), unknown=not record.known))
                continue
            if record.withheld:
                held.append(HeldBack(name, "objects gone from a file rewritten in place: "
                                     "deleted when a second read agrees",
                                     tuple(sorted(record.withheld, key=str))))
            held.extend(HeldBack(name, why, (key,)) for key, why in sorted(
                (record.kept or {}).items(), key=lambda item: str(item[0])))
        return tuple(held)

    def rescan(self, touched: set[str] | frozenset[str] = frozenset()) -> list[ObjectChange]:
        """A whole pass: lists the directory and re-reads new files, files whose
        signature changed, files the watcher named (a same-size rewrite within one
        timestamp tick keeps the signature) and files whose withheld deletions are due a
        second read; returns the diff."""
        self._last_full = time.monotonic()
        return self._pass(self._rescan, touched)

    def rescan_names(self, names: set[str] | frozenset[str]) -> list[ObjectChange]:
        """A pass the watcher woke: only the names it reported (created, written, moved
        or gone), the manifests that are symlinks (their targets change under other
        names) and files whose withheld deletions are due are looked at; no listing, so a
        one-file change costs that file, not the directory. The rules are rescan()'s."""
        return self._pass(self._rescan_names, names)

    def _pass(self, scan: Callable[[set[str] | frozenset[str]], list[ObjectChange]],
              names: set[str] | frozenset[str]) -> list[ObjectChange]:
        self._busy = ("", time.monotonic())
        self._refusing = self.control_plane.refusing()

        def again(stale: set[str]) -> list[ObjectChange]:
            self._force = stale
            try:
                return scan(stale)
            finally:
                self._force = frozenset()

        try:
            return self.control_plane.settled(scan(names), lambda: self._files, again,
                                              self._take_gone)
        finally:
            self._notable = {name for name in self._notable if name in self._files and
                             _notable(self._files[name])}
            self._next_held = self._holds()
            self._complete = all(self._files[name].readable for name in self._notable)
            self._busy = None
            if self._last_pass is not None:
                self._last_pass = time.monotonic()

    def _take_gone(self) -> set[str]:
        gone, self._gone = self._gone, set()
        return gone

    def _rescan(self, touched: set[str] | frozenset[str]) -> list[ObjectChange]:
        # One descriptor of the directory for the pass: every stat and open is relative
        # to it (no walk of the directory's path per file, and one directory throughout).
        directory_fd = os.open(self.directory, _DIRECTORY_FLAGS)
        try:
            return self._rescan_in(directory_fd, touched)
        finally:
            os.close(directory_fd)

    def _rescan_names(self, names: set[str] | frozenset[str]) -> list[ObjectChange]:
        directory_fd = os.open(self.directory, _DIRECTORY_FLAGS)
        try:
            now = time.monotonic()
            looked = {name for name in names
                      if not name.startswith(".") and name.endswith(SUFFIXES)}
            looked |= self._links
            looked.update(name for name in self._withholding if
                          now - self._files[name].withheld_since >= self.shrink_confirm_seconds)
            entries, problems = self._stat_names(directory_fd, looked)
            gone = {name for name in looked if name in self._files} - entries.keys() - \
                problems.keys()
            return self._apply(directory_fd, entries, problems, gone, names)
        finally:
            os.close(directory_fd)

    def _rescan_in(self, directory_fd: int,
                   touched: set[str] | frozenset[str]) -> list[ObjectChange]:
        entries, problems = self._list_directory(directory_fd)
        gone = self._files.keys() - entries.keys() - problems.keys()
        return self._apply(directory_fd, entries, problems, gone, touched)

    def _apply(self, directory_fd: int, entries: dict[str, Signature],
               problems: dict[str, tuple[str, str]], gone_names: set[str],
               touched: set[str] | frozenset[str]) -> list[ObjectChange]:
        """Files gone, unreadable, and listed (read again when new, changed, touched or
        due a second read): the diff of the keys they define."""
        affected: set[ObjectKey] = set()      # keys whose winning definition may change
        for name in gone_names:
            gone = self._files.pop(name)
            self._gone.add(name)
            self._withholding.discard(name)
            self._notable.discard(name)
            self._index(name, gone.objects, None)
            affected.update(gone.objects)
            log.info(kv(event="file_removed", file=name, objects=len(gone.objects)))
        for name, (counter, problem) in sorted(problems.items()):
            self._unreadable(name, counter, problem)   # keep what it gave before
        for name, signature in sorted(entries.items()):
            record = self._files.get(name)
            now = time.monotonic()
            confirm = record is not None and record.withheld and \
                now - record.withheld_since >= self.shrink_confirm_seconds
            if record is None or record.signature != signature or name in touched or confirm:
                self._busy = (name, now)
                fresh = self._withhold(name, record,
                                       self._read(name, signature, record, directory_fd))
                self._busy = ("", time.monotonic())
                self._index(name, record.objects if record else {}, fresh.objects)
                if record is not None:
                    affected.update(record.objects)
                affected.update(fresh.objects)
                self._files[name] = fresh
                if fresh.withheld:
                    self._withholding.add(name)
                else:
                    self._withholding.discard(name)
                if _notable(fresh):
                    self._notable.add(name)
        return self._diff(affected)

    def _unreadable(self, name: str, counter: str, problem: str) -> None:
        """A file the listing cannot read: its objects stay and the listing is incomplete
        (a restarted agent then keeps what it adopted). Logged and counted once per problem."""
        record = self._files.setdefault(name, _FileRecord(None, {}, known=False))
        if record.readable or record.problem != problem:
            setattr(self, counter, getattr(self, counter) + 1)
            log.warning(kv(event="file_unreadable", file=name, error=problem,
                           kept_objects=len(record.objects)))
            self._notices.append(f"{name}: unreadable ({problem}); its "
                                 f"{len(record.objects)} objects kept as last read")
        record.signature, record.readable, record.problem = None, False, problem
        record.withheld = frozenset()   # its objects stay anyway, until it reads again
        self._withholding.discard(name)
        self._notable.add(name)

    def _withhold(self, name: str, record: _FileRecord | None,
                  fresh: _FileRecord) -> _FileRecord:
        """Deletions from a file rewritten in place wait for a second read, at least
        shrink_confirm_seconds later, that drops the same objects: the first may have caught
        a writer between truncating and writing. A file replaced by rename (a new inode) is
        whole, as is one read for the first time; additions and edits apply at once."""
        if record is None or record.signature is None or fresh.signature is None or \
                not fresh.readable or record.signature[2] != fresh.signature[2]:
            return fresh
        dropped = frozenset(key for key in record.objects.keys() - fresh.objects.keys()
                            if all(f == name for f in self._defining(key)))
        if not dropped:
            return fresh
        now = time.monotonic()
        agrees = dropped == record.withheld
        if agrees and now - record.withheld_since >= self.shrink_confirm_seconds:
            log.info(kv(event="file_shrink_confirmed", file=name, deleted=len(dropped)))
            return fresh
        if not agrees:
            log.warning(kv(event="file_shrank", file=name, objects_held=len(dropped),
                           action=f"deleted when a read in {self.shrink_confirm_seconds:g}s "
                                  "agrees (write files by rename to avoid the wait)"))
        fresh.objects.update((key, record.objects[key]) for key in dropped)
        fresh.withheld = dropped
        fresh.withheld_since = record.withheld_since if agrees else now
        return fresh

    def _index(self, name: str, old: dict, new: dict | None) -> None:
        """Which files define each key, so a key's winner is found without a scan."""
        key_files = self._key_files
        for key in old.keys() - (new or {}).keys():
            files = key_files.get(key)
            if files is None:
                continue
            if files.__class__ is str:
                if files == name:
                    del key_files[key]
                continue
            files.discard(name)
            if len(files) == 1:
                key_files[key] = next(iter(files))
            elif not files:
                del key_files[key]
        for key in new or ():
            files = key_files.get(key)
            if files is None:
                key_files[key] = name       # a str, not a set per key (~200 bytes each)
            elif files.__class__ is str:
                if files != name:
                    key_files[key] = {files, name}
            else:
                files.add(name)

    def _defining(self, key: ObjectKey) -> tuple[str, ...] | set[str]:
        """The files that define key (none, one or several)."""
        files = self._key_files.get(key)
        if files is None:
            return ()
        return (files,) if files.__class__ is str else files

    def _list_directory(self, directory_fd: int
                        ) -> tuple[dict[str, Signature], dict[str, tuple[str, str]]]:
        """(signature by file, (counter, problem) by file that cannot be read now)."""
        entries: dict[str, Signature] = {}
        problems: dict[str, tuple[str, str]] = {}
        links = set()
        with os.scandir(directory_fd) as scan:
            for entry in scan:
                # Dot files are editors' locks and backups (.#web.yaml), and a ConfigMap
                # volume's ..data and ..<timestamp> entries.
                if entry.name.startswith(".") or not entry.name.endswith(SUFFIXES):
                    continue
                if entry.is_symlink():
                    links.add(entry.name)
                try:
                    st = entry.stat()   # fstatat, following symlinks: a ConfigMap key is one
                except FileNotFoundError:
                    continue                   # dangling: the key is being removed
                except OSError as e:           # ELOOP, EACCES: what it holds is unknown
                    problems[entry.name] = ("parse_errors", f"stat failed: {e.strerror}")
                    continue
                if stat.S_ISREG(st.st_mode):
                    entries[entry.name] = (st.st_mtime_ns, st.st_size, st.st_ino)
                elif not stat.S_ISDIR(st.st_mode):   # directories: not recursive
                    problems[entry.name] = ("refused_files", _NOT_REGULAR)
        self._links = links
        return entries, problems

    def _stat_names(self, directory_fd: int, names: set[str]
                    ) -> tuple[dict[str, Signature], dict[str, tuple[str, str]]]:
        """_list_directory() for these names only (each a manifest's name): absent ones,
        dangling symlinks and directories are in neither answer."""
        entries: dict[str, Signature] = {}
        problems: dict[str, tuple[str, str]] = {}
        for name in names:
            try:
                st = os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    self._links.add(name)
                    st = os.stat(name, dir_fd=directory_fd)   # as the listing: followed
                else:
                    self._links.discard(name)
            except FileNotFoundError:
                continue
            except OSError as e:
                problems[name] = ("parse_errors", f"stat failed: {e.strerror}")
                continue
            if stat.S_ISREG(st.st_mode):
                entries[name] = (st.st_mtime_ns, st.st_size, st.st_ino)
            elif not stat.S_ISDIR(st.st_mode):
                problems[name] = ("refused_files", _NOT_REGULAR)
        return entries, problems

    def _read(self, name: str, signature: Signature, previous: _FileRecord | None,
              directory_fd: int | None = None) -> _FileRecord:
        kept = previous.objects if previous else {}
        known = previous.known if previous else False
        path = self.directory / name
        limit = self.max_json_bytes if path.suffix == ".json" else self.max_file_bytes
        # a clean last read of the same bytes stands (nothing held back for this file,
        # no Service of it refused: its admission may differ now)
        same = previous.digest if previous is not None and previous.known and \
            not _notable(previous) and name not in self._force and \
            name not in self._refusing else None
        try:
            signature, documents, digest = _load_documents(path, limit, self.directory,
                                                           directory_fd, same)
        except FileNotFoundError:   # deleted since listed: the next scan drops it
            return _FileRecord(signature, kept, known=known)
        except _Refused as e:
            self.refused_files += 1
            log.warning(kv(event="file_refused", file=name, error=e, kept_objects=len(kept)))
            self._notices.append(f"{name}: refused ({e}); its {len(kept)} objects kept "
                                 "as last read")
            return _FileRecord(signature, kept, readable=False, problem=str(e), known=known)
        except Exception as e:  # noqa: BLE001 -- half-written, not YAML, unreadable, ...
            self.parse_errors += 1
            log.warning(kv(event="parse_error", file=name, error=_one_line(e),
                           kept_objects=len(kept)))
            self._notices.append(f"{name}: cannot be parsed ({_one_line(e)}); its "
                                 f"{len(kept)} objects kept as last read")
            return _FileRecord(signature, kept, readable=False, problem=_one_line(e),
                               known=known)
        if documents is None:        # the same bytes as the last read: the same objects
            return _FileRecord(signature, previous.objects, reported=signature, digest=digest)
        fresh = _FileRecord(signature, {}, digest=digest)
        # a version is reported once (re-reads of it: a watcher's touch, a shrink's check)
        report = previous is None or previous.reported != signature
        fresh.reported = signature
        for where, raw in self.control_plane.admit(name, _raw_objects(documents)):
            try:
                obj = parse_object(raw)
                if obj is not None:
                    check_names(obj)   # nothing else checked them: no API server here
            except Exception as e:  # noqa: BLE001 -- InvalidObject, or our bug: same handling
                self._invalid(name, where, raw, e, kept, fresh)
                continue
            if obj is None:
                self._not_ours(name, where, raw, report)
                continue
            fresh.objects[obj.key] = obj   # later documents override earlier ones, as kubectl
        return fresh

    def _not_ours(self, name: str, where: str, raw: Any, report: bool) -> None:
        """A document of a kind not read: quiet when it is some other Kubernetes object (a
        Deployment beside its Service); named once per file version when it is not an
        object at all, or looks like one we read but is not (a typo in kind:)."""
        problem = _not_an_object(raw)
        if not problem or not report:
            log.debug(kv(event="object_ignored", file=name, object=where,
                         kind=_field(raw, "kind"), apiVersion=_field(raw, "apiVersion")))
            return
        self.malformed_documents += 1
        log.warning(kv(event="document_ignored", file=name, document=where, error=problem))
        self._notices.append(f"{name} {where}: {problem}")

    def _invalid(self, name: str, where: str, raw: Any, error: Exception,
                 kept: dict[ObjectKey, Object], fresh: _FileRecord) -> None:
        self.invalid_objects += 1
        key = object_key(raw)
        # An operator's typo must not delete a working service: keep the last valid version.
        previous = (kept.get(key) or self._listed.get(key)) if key else None
        if previous is not None:
            fresh.objects[key] = previous
            if fresh.kept is None:
                fresh.kept = {}
            fresh.kept[key] = f"invalid, previous version kept: {_one_line(error)}"
        level = logging.WARNING if isinstance(error, InvalidObject) else logging.ERROR
        action = "kept_previous" if previous else "skipped"
        log.log(level, kv(event="invalid_object", file=name, object=key or where,
                          error=_one_line(error), action=action),
                exc_info=not isinstance(error, InvalidObject))

    def _diff(self, affected: set[ObjectKey]) -> list[ObjectChange]:
        """Changes for the affected keys only: a one-file edit costs that file, not the
        directory. The last file in name order wins, so deleting it falls back to the
        earlier one."""
        changes = []
        for key in affected:
            files = self._defining(key)
            winner = self._files[max(files)].objects[key] if files else None
            before = self._listed.get(key)
            if winner is None:
                if before is not None:
                    del self._listed[key]
                    changes.append(ObjectChange(key, None))
            elif before is not winner and before != winner:
                self._listed[key] = winner
                changes.append(ObjectChange(key, winner))
        return sorted(changes, key=lambda c: (c.key.kind, c.key.namespace, c.key.name))


_NOT_REGULAR = "not a regular file (a FIFO, socket or device is never read)"


def _load_documents(path: Path, max_bytes: int, directory: Path,
                    directory_fd: int | None = None, unchanged: bytes | None = None
                    ) -> tuple[Signature, list[Any] | None, bytes]:
    """(signature, documents, digest of the bytes) of the file; documents None when the
    digest is `unchanged` (the bytes are not parsed)."""
    fd = _open_inside(path, directory, directory_fd)
    try:
        st = os.fstat(fd)   # the signature of what is read, not of an earlier stat
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(_NOT_REGULAR)
        if st.st_size > max_bytes:
            raise _Refused(_too_large(path, f"{st.st_size} bytes", max_bytes))
        data = _read_bounded(fd, st.st_size, max_bytes)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise _Refused(_too_large(path, f"more than {max_bytes} bytes", max_bytes))
    signature = (st.st_mtime_ns, st.st_size, st.st_ino)
    digest = hashlib.blake2b(data, digest_size=16).digest()
    if digest == unchanged:
        return signature, None, digest
    if path.suffix == ".json":
        # ~50x faster than YAML for the same objects
        return signature, [json.loads(data)], digest
    text = data.decode("utf-8-sig")
    _check_nesting(text)
    return signature, _load_yaml(text), digest


def _too_large(path: Path, size: str, limit: int) -> str:
    advice = "split it into smaller files" + ("" if path.suffix == ".json" else
                                              " or write it as .json (read ~50x faster)")
    return f"{size}, over the limit of {limit} bytes for this kind of file: {advice}"


def _read_bounded(fd: int, expected: int, max_bytes: int) -> bytes:
    """The file's bytes to its end, but never more than max_bytes + 1 (one more says it is
    too large). Sized by fstat: a small file costs one read and no limit-sized buffer."""
    parts, size = [], 0
    ask = min(expected, max_bytes) + 1
    while size <= max_bytes:
        chunk = os.read(fd, min(ask, max_bytes + 1 - size))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
        ask = 64 * 1024          # it grew since the fstat
    return parts[0] if len(parts) == 1 else b"".join(parts)


_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# non-blocking: a FIFO swapped in after the listing would block the read forever
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_inside(path: Path, directory: Path, directory_fd: int | None = None) -> int:
    """A descriptor of the file at path, only when what it resolves to lies inside the
    directory (a ConfigMap volume's key -> ..data/key -> ..<timestamp>/key does), opened
    non-blocking and without following a last symlink swapped in after it was resolved.
    A file that is no symlink is opened by name relative to the directory's descriptor
    without following: inside by construction, so only symlinks pay for resolving."""
    own_fd = directory_fd is None
    if own_fd:
        directory_fd = os.open(directory, _DIRECTORY_FLAGS)
    try:
        return os.open(path.name, _FILE_FLAGS, dir_fd=directory_fd)
    except OSError as e:
        if e.errno != errno.ELOOP:   # ELOOP: a symlink (or a loop), resolved below
            raise
    finally:
        if own_fd:
            os.close(directory_fd)
    return _open_link_inside(path, directory)


def _open_link_inside(path: Path, directory: Path) -> int:
    """A symlink at path: followed only to a target inside the directory."""
    inside = os.path.realpath(directory)
    target = os.path.realpath(path)
    if os.path.commonpath([target, inside]) != inside:
        raise _Refused(f"a symlink to {target}, outside the directory: only links to files "
                       "inside it are followed")
    fd = os.open(target, _FILE_FLAGS)
    try:
        # A directory on the way swapped for a symlink between realpath and open: what was
        # opened is what /proc names (when there is a /proc to ask).
        with contextlib.suppress(OSError):
            opened = os.readlink(f"/proc/self/fd/{fd}")
            if os.path.commonpath([opened, inside]) != inside:
                raise _Refused(f"resolved to {opened}, outside the directory, while opened")
        return fd
    except BaseException:
        os.close(fd)
        raise


# go-yaml's bound on alias expansion (decode.go, allowedAliasRatio), which the API server and
# kubectl apply: of the nodes a document decodes to, up to 99% may come from aliases while
# it decodes to at most 400k, sliding down to 10% at 4M; beyond, "excessive aliasing".
_ALIAS_RATIO_LOW, _ALIAS_RATIO_HIGH = 400_000, 4_000_000
# A scalar expanded through an alias costs its length, not one node, wherever it is read:
# counted as one node per this many characters.
_SCALAR_CHARS_PER_NODE = 64


def _load_yaml(text: str) -> list[Any]:
    """All documents, refusing excessive aliasing before any of it is expanded."""
    if "&" not in text or "*" not in text:   # no anchor or no alias: nothing to expand
        fast = _load_plain_yaml(text)
        return fast if fast is not None else list(yaml.load_all(text, Loader=yaml.CSafeLoader))
    loader = yaml.CSafeLoader(text)
    try:
        nodes = []
        while loader.check_node():
            nodes.append(loader.get_node())
        _check_aliases(nodes)
        return [loader.construct_document(node) for node in nodes]
    finally:
        loader.dispose()


# What YAML 1.1 (PyYAML, and go-yaml v2 under kubectl and the API server) reads otherwise
# than YAML 1.2 (yaml-rs), or what only PyYAML refuses: 1.1 booleans (yes/no/on/off),
# numbers with a leading 0, 0o/0b/0x, _ or : between digits, an exponent, a + sign, a bare
# leading or trailing dot, .inf/.nan, timestamps; tags, anchors, aliases, escapes, merge
# keys, empty and complex keys, block scalars (their edge cases), directives, "=", document
# end markers. Looked for anywhere, quoted or not: a file holding one is read by PyYAML.
# Searched in "\n" + text, every branch led by a character (no lookbehind): sre then skips
# to the positions that can start one, ~3x faster than lookbehinds on manifests. No branch
# repeats what its leading class matched (" \s*:" would rescan a run of blanks from each of
# its characters: 28 s of CPU for a line of 60k spaces; " :" finds the same files).
_YAML_1_1_ONLY = re.compile(r"""
      [\s\[{,](?:(?:yes|Yes|YES|no|No|NO|on|On|ON|off|Off|OFF)(?![\w.-])
                | [-+]?0[0-9oObBxX_]   | [-+]?\.\d   | =(?:$|[\s\]},])   | [:?](?:\s|$)
                | [|>][-+1-9]{0,2}[\t\ ]*(?:\#.*)?$ )
    | \n(?:[\t\ -]*[:?](?:\s|$) | % | \.\.\.)
    | [!&*\\]   | <<   | \d(?:[_:]\d | [eE][-+]?\d | \.(?!\w) | \d\d\d-\d\d?-\d\d?)
    | \+\d   | \.(?:inf|Inf|INF|nan|NaN|NAN)
    """, re.MULTILINE | re.VERBOSE)
_BEFORE_FIRST_MARKER = re.compile(r"^[ \t]*[^\s#]", re.MULTILINE)


def _load_plain_yaml(text: str) -> list[Any] | None:
    """The documents of a file that YAML 1.1 and 1.2 read alike, parsed by yaml-rs (about
    6x faster than PyYAML's C loader on Kubernetes manifests); None for any other file, or
    any error (PyYAML then reads it, and names the error as before)."""
    if _YAML_1_1_ONLY.search("\n" + text):
        return None
    try:
        loaded = yaml_rs.loads(text, parse_datetime=False)
    except Exception:  # noqa: BLE001 -- PyYAML says what is wrong (or reads it after all)
        return None
    # yaml-rs gives one document as itself and several as a list: count the markers
    markers = [m.start() for m in _DOCUMENT_START.finditer(text)]
    first = markers[0] if markers else len(text)
    documents = len(markers) + bool(_BEFORE_FIRST_MARKER.search(text, 0, first))
    if documents <= 1:
        return [loaded] if documents else []
    return loaded if isinstance(loaded, list) and len(loaded) == documents else None


def _check_aliases(documents: list[Node]) -> None:
    """Raises _Refused when aliases would multiply the work, as go-yaml does, or when an
    anchor's value holds an alias of itself. Costs one visit per node, however many times
    aliases repeat it: an alias is the same node object as its anchor."""
    sizes: dict[int, int] = {}   # id(node) -> nodes it expands to, once known
    open_nodes: set[int] = set()   # the path from the document root to the node visited
    unique = 0
    for root in documents:
        stack: list[tuple[Node, bool]] = [(root, False)]
        while stack:
            node, children_done = stack.pop()
            if children_done:
                open_nodes.discard(id(node))
                sizes[id(node)] = _own_size(node) + sum(sizes[id(c)] for c in _children(node))
                unique += _own_size(node)
                continue
            if id(node) in sizes:
                continue
            if id(node) in open_nodes:
                raise _Refused("an anchor's value contains an alias of itself")
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    expanded = sum(sizes[id(root)] for root in documents)
    aliased = expanded - unique
    if aliased > 100 and expanded > 1000 and aliased / expanded > _allowed_alias_ratio(expanded):
        raise _Refused(f"excessive aliasing: {unique} nodes expand to {expanded} through "
                       "aliases (the API server's YAML decoder refuses the same)")


def _allowed_alias_ratio(decoded: int) -> float:
    if decoded <= _ALIAS_RATIO_LOW:
        return 0.99
    if decoded >= _ALIAS_RATIO_HIGH:
        return 0.10
    return 0.99 - 0.89 * (decoded - _ALIAS_RATIO_LOW) / (_ALIAS_RATIO_HIGH - _ALIAS_RATIO_LOW)


def _children(node: Node) -> Iterator[Node]:
    if isinstance(node, SequenceNode):
        yield from node.value
    elif isinstance(node, MappingNode):
        for key, value in node.value:
            yield key
            yield value


def _own_size(node: Node) -> int:
    if isinstance(node, (SequenceNode, MappingNode)):
        return 1
    return 1 + len(node.value) // _SCALAR_CHARS_PER_NODE


# Only a real marker ends a flow collection: "---x" is a plain scalar that may continue one.
_DOCUMENT_START = re.compile(r"^---(?=\s|$)", re.MULTILINE)


def _check_nesting(text: str) -> None:
    """Raises ValueError when text nests deeper than MAX_NESTING. A cheap bound settles
    ordinary files; only the rest pay for an event scan (libyaml's parser is iterative)."""
    # Each flow level needs a bracket within one document; each block level needs a column
    # of indentation or a compact "- " / "? " in a line's lead, so twice the lead bounds it.
    flow = max(chunk.count("[") + chunk.count("{") for chunk in _DOCUMENT_START.split(text))
    budget = (MAX_NESTING - flow) // 2 - 2   # - 2: the document's own top levels
    if budget > 0 and not re.search(rf"^[ \t?:-]{{{budget},}}", text, re.MULTILINE):
        return
    depth = 0
    for event in yaml.parse(text, Loader=yaml.CSafeLoader):
        if isinstance(event, CollectionStartEvent):
            depth += 1
            if depth > MAX_NESTING:
                raise ValueError(f"nested deeper than {MAX_NESTING} levels")
        elif isinstance(event, CollectionEndEvent):
            depth -= 1


# kubectl's `kind: List`, and the API's typed lists as `kubectl get --raw` prints them.
_LIST_KINDS = frozenset({"List", "ServiceList", "EndpointSliceList"})


def _raw_objects(documents: list[Any]) -> Iterator[tuple[str, Any]]:
    """(where, raw object) for every document, and every item of a `kind: List`."""
    for i, document in enumerate(documents):
        if document is None:
            continue   # an empty document, e.g. after a trailing ---
        if isinstance(document, dict) and _field(document, "kind") in _LIST_KINDS:
            items = document.get("items")
            if not isinstance(items, list):
                yield f"document[{i}].items", items
                continue
            for j, item in enumerate(items):
                yield f"document[{i}].items[{j}]", item
        else:
            yield f"document[{i}]", document


_KINDS_READ = {kind.lower(): (api_version, kind) for api_version, kind in HANDLED_KINDS}


def _not_an_object(raw: Any) -> str:
    """Why a mapping parse_object passed over is a mistake, or "" for another kind of
    Kubernetes object. A kind within a typo of one read (kube-proxy's inputs) in that
    one's API group, or one of them under another version, was surely meant as it (a
    Knative Service, in a group of its own, is not)."""
    api_version, kind = _field(raw, "apiVersion"), _field(raw, "kind")
    if not api_version or not kind:
        missing = " and ".join(f for f, v in (("apiVersion", api_version), ("kind", kind))
                               if not v)
        return f"not a Kubernetes object (no {missing}): ignored"
    group = api_version.rpartition("/")[0]
    for lowered, (want_version, want_kind) in _KINDS_READ.items():
        if group in ("", want_version.rpartition("/")[0]) and \
                _typo_distance(kind.lower(), lowered) <= len(lowered) // 4:
            return (f"apiVersion {api_version!r}, kind {kind!r} is not read: ignored "
                    f"(did you mean apiVersion: {want_version}, kind: {want_kind}?)")
    return ""


def _typo_distance(a: str, b: str) -> int:
    """Edits (insert, delete, replace, swap two neighbours) from a to b; small strings."""
    if abs(len(a) - len(b)) > 3:
        return 4
    rows = [list(range(len(b) + 1))]
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(rows[-1][j] + 1, row[j - 1] + 1,
                         rows[-1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


def _field(raw: Any, name: str) -> str:
    value = raw.get(name) if isinstance(raw, dict) else None
    return value if isinstance(value, str) else ""


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
