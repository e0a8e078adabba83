"""Directory source: ordinary Kubernetes YAML/JSON files in one directory, re-read on change.
Yields the complete initial listing first, then only what changed; bad input never deletes."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import watchfiles
import yaml
from yaml.events import CollectionEndEvent, CollectionStartEvent

from agent.model.objects import object_key, parse_object
from agent.model.types import EndpointSlice, InvalidObject, ObjectKey, Service
from agent.sources.events import ObjectChange

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
DEFAULT_RESYNC_SECONDS = 30.0
WAIT_FOR_DIRECTORY = 0.5          # seconds between looks for a directory not there yet
# Kubernetes objects nest about ten deep. libyaml's composer recurses in C and kills the
# process on deep input (~40k levels on an 8 MiB stack, fewer on a thread's), so deeper
# files are refused before the composer sees them; 1000 is also Python's recursion limit.
MAX_NESTING = 1000

Object = Service | EndpointSlice
Signature = tuple[int, int, int]   # (mtime_ns, size, inode): a changed file changes one


@dataclass(slots=True)
class _FileRecord:
    signature: Signature
    objects: dict[ObjectKey, Object]   # the valid objects this file contributes
    readable: bool = True              # False: its last read failed, objects are older


class _Refused(Exception):
    """A file not parsed at all (too large): its previous objects stay."""


class ManifestSource:
    """Watches one directory (not recursive; symlinks followed, so a ConfigMap volume's
    ..data swap is seen). Counters: invalid_objects, parse_errors, refused_files."""

    def __init__(self, directory: Path, *, resync_seconds: float = DEFAULT_RESYNC_SECONDS,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, watch_step_ms: int = 10,
                 watch_debounce_ms: int = 400) -> None:
        self.directory = Path(directory)
        self.resync_seconds = resync_seconds
        self.max_file_bytes = max_file_bytes
        # a change reaches us one quiet step after it happens: 10 ms, not watchfiles' 50
        self.watch_step_ms = watch_step_ms
        self.watch_debounce_ms = watch_debounce_ms
        self.invalid_objects = 0
        self.parse_errors = 0
        self.refused_files = 0
        self._files: dict[str, _FileRecord] = {}
        self._listed: dict[ObjectKey, Object] = {}   # what the consumer has been given
        self._key_files: dict[ObjectKey, set[str]] = {}   # which files define a key
        self._touched: set[str] = set()              # names the watcher reported

    async def changes(self) -> AsyncIterator[list[ObjectChange]]:
        # Not there yet (a ConfigMap volume not mounted, a directory being provisioned):
        # wait for it. The agent programs nothing before the first listing, so what the
        # kernel holds from an earlier run keeps serving meanwhile.
        waited = 0.0
        while not self.directory.is_dir():
            if waited == 0.0:
                log.warning(_kv(event="source_unavailable", directory=self.directory,
                                action="waiting"))
            await asyncio.sleep(WAIT_FOR_DIRECTORY)
            waited += WAIT_FOR_DIRECTORY
        if waited:
            log.info(_kv(event="source_available", directory=self.directory,
                         waited_seconds=round(waited, 1)))
        wake, stop = asyncio.Event(), asyncio.Event()
        watcher = asyncio.create_task(self._watch(wake, stop))
        # awatch arms inotify before its first await: one turn of the loop, and no edit can
        # fall between the listing below and the watch.
        await asyncio.sleep(0)
        try:
            yield await asyncio.to_thread(self.rescan)
            while True:
                # on time-out: the periodic resync, the safety net for what inotify misses
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.resync_seconds)
                wake.clear()
                touched, self._touched = self._touched, set()
                try:
                    batch = await asyncio.to_thread(self.rescan, touched)
                except Exception as e:
                    # Directory unreadable (or our bug): keep serving what was listed.
                    log.error(_kv(event="rescan_failed", directory=self.directory, error=e),
                              exc_info=not isinstance(e, OSError))
                    continue
                if batch:
                    yield batch
        finally:
            stop.set()   # awatch's thread checks it every step; cancelling alone waits 5 s
            _, pending = await asyncio.wait({watcher}, timeout=2)
            for task in pending:
                task.cancel()

    async def _watch(self, wake: asyncio.Event, stop: asyncio.Event) -> None:
        try:
            async for batch in watchfiles.awatch(
                    self.directory, watch_filter=None, recursive=False, stop_event=stop,
                    step=self.watch_step_ms, debounce=self.watch_debounce_ms):
                self._touched.update(Path(path).name for _, path in batch)
                wake.set()
        except Exception as e:  # noqa: BLE001 -- the periodic resync still runs
            log.warning(_kv(event="watch_failed", directory=self.directory, error=e,
                            fallback=f"rescan every {self.resync_seconds}s"))

    # --- synchronous part, run in a thread ---------------------------------------------

    @property
    def complete(self) -> bool:
        """False while a file cannot be read: the listing may lack objects that exist (a
        restarted agent must then not delete what it adopted from the kernel)."""
        return all(record.readable for record in self._files.values())

    def rescan(self, touched: set[str] | frozenset[str] = frozenset()) -> list[ObjectChange]:
        """Re-reads new files, files whose signature changed and files the watcher named
        (a same-size rewrite within one timestamp tick keeps the signature); returns the diff."""
        entries = self._list_directory()
        affected: set[ObjectKey] = set()      # keys whose winning definition may change
        for name in self._files.keys() - entries.keys():
            gone = self._files.pop(name)
            self._index(name, gone.objects, None)
            affected.update(gone.objects)
            log.info(_kv(event="file_removed", file=name, objects=len(gone.objects)))
        for name, signature in sorted(entries.items()):
            record = self._files.get(name)
            if signature is None:
                continue   # unreadable now: keep what it gave before
            if record is None or record.signature != signature or name in touched:
                fresh = self._read(name, signature, record)
                self._index(name, record.objects if record else {}, fresh.objects)
                if record is not None:
                    affected.update(record.objects)
                affected.update(fresh.objects)
                self._files[name] = fresh
        return self._diff(affected)

    def _index(self, name: str, old: dict, new: dict | None) -> None:
        """Which files define each key, so a key's winner is found without a scan."""
        for key in old.keys() - (new or {}).keys():
            files = self._key_files.get(key)
            if files is not None:
                files.discard(name)
                if not files:
                    del self._key_files[key]
        for key in new or ():
            self._key_files.setdefault(key, set()).add(name)

    def _list_directory(self) -> dict[str, Signature | None]:
        entries: dict[str, Signature | None] = {}
        with os.scandir(self.directory) as scan:
            for entry in scan:
                # Dot files are editors' locks and backups (.#web.yaml), and a ConfigMap
                # volume's ..data and ..<timestamp> entries.
                if entry.name.startswith(".") or not entry.name.endswith(SUFFIXES):
                    continue
                try:
                    st = os.stat(entry.path)   # follows symlinks: a ConfigMap key is one
                except FileNotFoundError:
                    continue                   # dangling: the key is being removed
                except OSError as e:
                    log.warning(_kv(event="stat_failed", file=entry.name, error=e))
                    entries[entry.name] = None
                    continue
                if stat.S_ISREG(st.st_mode):
                    entries[entry.name] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return entries

    def _read(self, name: str, signature: Signature, previous: _FileRecord | None) -> _FileRecord:
        kept = previous.objects if previous else {}
        try:
            signature, documents = _load_documents(self.directory / name, self.max_file_bytes)
        except FileNotFoundError:
            return _FileRecord(signature, kept)   # deleted since listed: the next scan drops it
        except _Refused as e:
            self.refused_files += 1
            log.warning(_kv(event="file_refused", file=name, error=e, kept_objects=len(kept)))
            return _FileRecord(signature, kept, readable=False)
        except Exception as e:  # noqa: BLE001 -- half-written, not YAML, unreadable, ...
            self.parse_errors += 1
            log.warning(_kv(event="parse_error", file=name, error=_one_line(e),
                            kept_objects=len(kept)))
            return _FileRecord(signature, kept, readable=False)
        objects: dict[ObjectKey, Object] = {}
        for where, raw in _raw_objects(documents):
            try:
                obj = parse_object(raw)
            except Exception as e:  # noqa: BLE001 -- InvalidObject, or our bug: same handling
                self._invalid(name, where, raw, e, kept, objects)
                continue
            if obj is None:
                log.debug(_kv(event="object_ignored", file=name, object=where,
                              kind=_field(raw, "kind"), apiVersion=_field(raw, "apiVersion")))
                continue
            objects[obj.key] = obj   # later documents override earlier ones, as kubectl
        return _FileRecord(signature, objects)

    def _invalid(self, name: str, where: str, raw: Any, error: Exception,
                 kept: dict[ObjectKey, Object], objects: dict[ObjectKey, Object]) -> None:
        self.invalid_objects += 1
        key = object_key(raw)
        # An operator's typo must not delete a working service: keep the last valid version.
        previous = (kept.get(key) or self._listed.get(key)) if key else None
        if previous is not None:
            objects[key] = previous
        level = logging.WARNING if isinstance(error, InvalidObject) else logging.ERROR
        action = "kept_previous" if previous else "skipped"
        log.log(level, _kv(event="invalid_object", file=name, object=key or where,
                           error=_one_line(error), action=action),
                exc_info=not isinstance(error, InvalidObject))

    def _diff(self, affected: set[ObjectKey]) -> list[ObjectChange]:
        """Changes for the affected keys only: a one-file edit costs that file, not the
        directory. The last file in name order wins, so deleting it falls back to the
        earlier one."""
        changes = []
        for key in affected:
            files = self._key_files.get(key)
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


def _load_documents(path: Path, max_bytes: int) -> tuple[Signature, list[Any]]:
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())   # the signature of what is read, not of an earlier stat
        if st.st_size > max_bytes:
            raise _Refused(f"{st.st_size} bytes, over the limit of {max_bytes}")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _Refused(f"more than {max_bytes} bytes")
    signature = (st.st_mtime_ns, st.st_size, st.st_ino)
    if path.suffix == ".json":
        return signature, [json.loads(data)]   # ~50x faster than YAML for the same objects
    text = data.decode("utf-8-sig")
    _check_nesting(text)
    return signature, list(yaml.load_all(text, Loader=yaml.CSafeLoader))


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


def _field(raw: Any, name: str) -> str:
    value = raw.get(name) if isinstance(raw, dict) else None
    return value if isinstance(value, str) else ""


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _kv(**fields: Any) -> str:
    """key=value pairs, one event per line; values with spaces or quotes are quoted."""
    parts = []
    for key, value in fields.items():
        text = str(value)
        if not text or any(c in text for c in ' "=\n\t'):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)
