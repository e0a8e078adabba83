"""The directory source: a complete first listing, then only changes; bad input (invalid
objects, broken YAML, huge or deeply nested files) never deletes what was served."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import struct
import textwrap
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.model.types import ObjectKey, Service
from agent.sources import manifests
from agent.sources.events import ObjectChange
from agent.sources.manifests import ManifestSource

WAIT = 5.0   # seconds; bounds every wait so a bug fails the test instead of hanging it


def svc(name: str, port: int = 80, namespace: str = "default", ip: str = "10.96.0.10") -> str:
    return textwrap.dedent(f"""\
        apiVersion: v1
        kind: Service
        metadata: {{name: {name}, namespace: {namespace}}}
        spec:
          clusterIP: {ip}
          ports: [{{port: {port}}}]
        """)


def eps(name: str, service: str, address: str = "10.1.0.1") -> str:
    return textwrap.dedent(f"""\
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata:
          name: {name}
          labels: {{kubernetes.io/service-name: {service}}}
        addressType: IPv4
        ports: [{{name: "", port: 8080}}]
        endpoints: [{{addresses: ["{address}"]}}]
        """)


def svc_json(name: str, port: int = 80) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                       "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": port}]}})


def key(name: str, kind: str = "Service", namespace: str = "default") -> ObjectKey:
    return ObjectKey(kind, namespace, name)


_clock = iter(range(1_000_000_000, 10**18, 1_000_000_000))


def write(directory: Path, name: str, text: str) -> None:
    """Write, then give the file a fresh mtime: two writes within one timestamp tick could
    otherwise leave the signature unchanged, which only the watcher's hint would catch."""
    path = directory / name
    path.write_text(text)
    stamp = next(_clock)
    os.utime(path, ns=(stamp, stamp))


def ports(changes: list[ObjectChange]) -> dict[str, int | None]:
    """{"Service ns/name": first port, or None when deleted}; slices give 0."""
    out = {}
    for change in changes:
        obj = change.obj
        out[str(change.key)] = None if obj is None else \
            obj.ports[0].port if isinstance(obj, Service) and obj.ports else 0
    return out


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 4 * WAIT))


async def next_batch(changes) -> list[ObjectChange]:
    return await asyncio.wait_for(anext(changes), WAIT)


# --- the first listing ------------------------------------------------------------------

def test_initial_listing_is_complete(tmp_path):
    write(tmp_path, "a.yaml", svc("web") + "---\n" + eps("web-1", "web") + "---\n")
    write(tmp_path, "b.yml", svc("api", 8080))
    write(tmp_path, "c.json", svc_json("db", 5432))
    write(tmp_path, "d.yaml", "apiVersion: v1\nkind: List\nitems:\n" + "".join(
        "- " + textwrap.indent(svc(name, port), "  ").lstrip() for name, port in
        [("one", 1), ("two", 2)]))
    write(tmp_path, "deploy.yaml", "apiVersion: apps/v1\nkind: Deployment\n"
                                   "metadata: {name: web}\n")
    write(tmp_path, "README.md", svc("not-yaml"))
    write(tmp_path, ".#a.yaml", svc("editor-lock"))
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "x.yaml", svc("not-recursive"))

    async def first():
        changes = ManifestSource(tmp_path).changes()
        try:
            return await next_batch(changes)
        finally:
            await changes.aclose()

    assert ports(run(first())) == {
        "Service default/web": 80, "EndpointSlice default/web-1": 0, "Service default/api": 8080,
        "Service default/db": 5432, "Service default/one": 1, "Service default/two": 2}


def test_initial_listing_of_an_empty_directory_is_empty(tmp_path):
    async def first():
        changes = ManifestSource(tmp_path).changes()
        try:
            return await next_batch(changes)
        finally:
            await changes.aclose()

    assert run(first()) == []


def test_a_missing_directory_is_waited_for(tmp_path):
    """Nothing is listed (so nothing programmed) until the directory appears."""
    directory = tmp_path / "later"

    async def first():
        changes = ManifestSource(directory).changes()
        waiting = asyncio.ensure_future(next_batch(changes))
        await asyncio.sleep(1.2)
        assert not waiting.done()
        directory.mkdir()
        (directory / "svc.yaml").write_text(svc("web"))
        try:
            return await asyncio.wait_for(waiting, 5)
        finally:
            await changes.aclose()

    batch = run(first())
    assert [c.key.name for c in batch] == ["web"]


# --- changes seen by the watcher (resync far away, so only inotify can notice) ----------

@dataclass
class WatchCase:
    name: str
    before: dict[str, str]
    edit: object                           # callable(directory)
    want: dict[str, int | None]


WATCH_CASES = [
    WatchCase("edit a file: the changed object only",
              {"a.yaml": svc("web") + "---\n" + svc("api", ip="10.96.0.11")},
              lambda d: write(d, "a.yaml", svc("web", 81) + "---\n" + svc("api", ip="10.96.0.11")),
              {"Service default/web": 81}),
    WatchCase("add a file",
              {"a.yaml": svc("web")},
              lambda d: write(d, "b.yaml", svc("api", 8080)),
              {"Service default/api": 8080}),
    WatchCase("delete a file: deletions",
              {"a.yaml": svc("web") + "---\n" + eps("web-1", "web"), "b.yaml": svc("api")},
              lambda d: (d / "a.yaml").unlink(),
              {"Service default/web": None, "EndpointSlice default/web-1": None}),
    WatchCase("rename a file: nothing changes for the consumer, then a real edit",
              {"a.yaml": svc("web")},
              lambda d: ((d / "a.yaml").rename(d / "b.yaml"), write(d, "c.yaml", svc("x", 9))),
              {"Service default/x": 9}),
    WatchCase("ConfigMap volume: ..data symlink swapped",
              {},   # set up by configmap_volume below
              lambda d: configmap_swap(d, "..2", svc("web", 81)),
              {"Service default/web": 81}),
]


def configmap_volume(directory: Path, text: str) -> None:
    """The kubelet's layout: web.yaml -> ..data/web.yaml, ..data -> ..1 (a timestamped dir)."""
    (directory / "..1").mkdir()
    (directory / "..1" / "web.yaml").write_text(text)
    (directory / "..data").symlink_to("..1")
    (directory / "web.yaml").symlink_to("..data/web.yaml")


def configmap_swap(directory: Path, version: str, text: str) -> None:
    """The kubelet's atomic update: a new dir, then rename a fresh symlink over ..data."""
    (directory / version).mkdir()
    (directory / version / "web.yaml").write_text(text)
    (directory / "..data_tmp").symlink_to(version)
    os.replace(directory / "..data_tmp", directory / "..data")


@pytest.mark.parametrize("case", WATCH_CASES, ids=lambda c: c.name)
def test_watched_changes(tmp_path, case):
    for name, text in case.before.items():
        write(tmp_path, name, text)
    if not case.before:
        configmap_volume(tmp_path, svc("web"))

    async def scenario():
        changes = ManifestSource(tmp_path, resync_seconds=3600).changes()
        try:
            await next_batch(changes)
            case.edit(tmp_path)
            return await next_batch(changes)
        finally:
            await changes.aclose()

    assert ports(run(scenario())) == case.want


def test_periodic_resync_catches_what_the_watcher_cannot_see(tmp_path):
    # A file reached through a symlink into a subdirectory: inotify on the manifest
    # directory (not recursive) does not see edits of the target.
    watched = tmp_path / "watched"
    elsewhere = watched / "elsewhere"
    elsewhere.mkdir(parents=True)
    write(elsewhere, "web.yaml", svc("web"))
    (watched / "web.yaml").symlink_to(elsewhere / "web.yaml")

    async def scenario():
        changes = ManifestSource(watched, resync_seconds=0.2).changes()
        try:
            await next_batch(changes)
            write(elsewhere, "web.yaml", svc("web", 81))
            return await next_batch(changes)
        finally:
            await changes.aclose()

    assert ports(run(scenario())) == {"Service default/web": 81}


# --- the rules for bad input, through rescan() ------------------------------------------

@dataclass
class Step:
    files: dict[str, str | None]            # name -> new text, or None to delete
    want: dict[str, int | None]             # what the rescan reports
    counters: dict[str, int] = field(default_factory=dict)   # totals after this step


BROKEN_YAML = "apiVersion: v1\nkind: Service\nmetadata: {name: web\n  spec: ["
BAD_PORT = svc("web", 70000)


@dataclass
class RuleCase:
    name: str
    steps: list[Step]


RULE_CASES = [
    RuleCase("invalid object keeps the previous version", [
        Step({"a.yaml": svc("web") + "---\n" + svc("api", ip="10.96.0.11")},
             {"Service default/web": 80, "Service default/api": 80}),
        Step({"a.yaml": BAD_PORT + "---\n" + svc("api", 81, ip="10.96.0.11")},
             {"Service default/api": 81}, {"invalid_objects": 1}),
        Step({"a.yaml": svc("web", 82) + "---\n" + svc("api", 81, ip="10.96.0.11")},
             {"Service default/web": 82}, {"invalid_objects": 1}),
    ]),
    RuleCase("invalid object never valid before is skipped", [
        Step({"a.yaml": BAD_PORT + "---\n" + svc("api")}, {"Service default/api": 80},
             {"invalid_objects": 1}),
    ]),
    RuleCase("invalid object moved to another file keeps the last valid version", [
        Step({"a.yaml": svc("web")}, {"Service default/web": 80}),
        Step({"a.yaml": None, "b.yaml": BAD_PORT}, {}, {"invalid_objects": 1}),
    ]),
    RuleCase("broken YAML keeps the file's previous objects", [
        Step({"a.yaml": svc("web"), "b.yaml": svc("api")},
             {"Service default/web": 80, "Service default/api": 80}),
        Step({"a.yaml": BROKEN_YAML, "b.yaml": svc("api", 81)}, {"Service default/api": 81},
             {"parse_errors": 1}),
        Step({"a.yaml": svc("web", 82)}, {"Service default/web": 82}, {"parse_errors": 1}),
    ]),
    RuleCase("broken YAML at start contributes nothing", [
        Step({"a.yaml": BROKEN_YAML, "b.yaml": svc("api")}, {"Service default/api": 80},
             {"parse_errors": 1}),
    ]),
    RuleCase("broken JSON keeps the file's previous objects", [
        Step({"a.json": svc_json("db")}, {"Service default/db": 80}),
        Step({"a.json": svc_json("db", 81)[:-5]}, {}, {"parse_errors": 1}),
    ]),
    RuleCase("a document that is not a mapping is an invalid object", [
        Step({"a.yaml": "just a string\n---\n" + svc("web")}, {"Service default/web": 80},
             {"invalid_objects": 1}),
    ]),
    RuleCase("same object in two files: last file wins, deleting it falls back", [
        Step({"a.yaml": svc("web", 80), "b.yaml": svc("web", 81)}, {"Service default/web": 81}),
        Step({"b.yaml": None}, {"Service default/web": 80}),
        Step({"a.yaml": None}, {"Service default/web": None}),
    ]),
    RuleCase("same object twice in one file: the later document wins", [
        Step({"a.yaml": svc("web", 80) + "---\n" + svc("web", 81)}, {"Service default/web": 81}),
    ]),
    RuleCase("unchanged content reports nothing", [
        Step({"a.yaml": svc("web")}, {"Service default/web": 80}),
        Step({"a.yaml": svc("web")}, {}),
        Step({}, {}),
    ]),
    RuleCase("object moved between files: no change for the consumer", [
        Step({"a.yaml": svc("web")}, {"Service default/web": 80}),
        Step({"a.yaml": None, "b.yaml": svc("web")}, {}),
    ]),
    RuleCase("typed list and empty documents", [
        Step({"a.yaml": "---\n---\napiVersion: v1\nkind: ServiceList\nitems:\n- "
                        + textwrap.indent(svc("web"), "  ").lstrip() + "---\n"},
             {"Service default/web": 80}),
    ]),
]


def apply_files(directory: Path, files: dict[str, str | None]) -> None:
    for name, text in files.items():
        if text is None:
            (directory / name).unlink()
        else:
            write(directory, name, text)


@pytest.mark.parametrize("case", RULE_CASES, ids=lambda c: c.name)
def test_bad_input_rules(tmp_path, case):
    source = ManifestSource(tmp_path)
    for i, step in enumerate(case.steps):
        apply_files(tmp_path, step.files)
        assert ports(source.rescan()) == step.want, f"step {i}"
        counters = {"invalid_objects": 0, "parse_errors": 0, "refused_files": 0}
        counters |= step.counters
        assert {name: getattr(source, name) for name in counters} == counters, f"step {i}"


def test_invalid_object_log_line(tmp_path, caplog):
    write(tmp_path, "a.yaml", BAD_PORT)
    with caplog.at_level(logging.WARNING, logger=manifests.__name__):
        ManifestSource(tmp_path).rescan()
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith('event=invalid_object file=a.yaml object="Service default/web" '
                           'error="Service default/web: spec.ports[0].port: 70000 out of '
                           'range'), line
    assert line.endswith("action=skipped"), line


def test_parse_error_log_line_is_one_line(tmp_path, caplog):
    write(tmp_path, "a.yaml", BROKEN_YAML)
    with caplog.at_level(logging.WARNING, logger=manifests.__name__):
        ManifestSource(tmp_path).rescan()
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("event=parse_error file=a.yaml error="), line
    assert "\n" not in line


# --- files that must not be parsed ------------------------------------------------------

def test_oversized_file_refused_and_previous_objects_kept(tmp_path, caplog):
    source = ManifestSource(tmp_path, max_file_bytes=400)
    write(tmp_path, "a.yaml", svc("web"))
    assert ports(source.rescan()) == {"Service default/web": 80}
    write(tmp_path, "a.yaml", svc("web", 81) + "#" * 400)
    write(tmp_path, "b.yaml", svc("api") + "#" * 400)
    with caplog.at_level(logging.WARNING, logger=manifests.__name__):
        assert source.rescan() == []
    assert source.refused_files == 2
    assert [r.getMessage().split()[:2] for r in caplog.records] == [
        ["event=file_refused", "file=a.yaml"], ["event=file_refused", "file=b.yaml"]]


NESTED = [
    ("flow", "[" * 100_000 + "]" * 100_000),
    ("block sequences", "- " * 100_000 + "x\n"),
    ("flow hidden behind a quoted bracket", 'a: "]"\nb: ' + "[ ']'," * 60_000 + "x"),
    ("flow in a second document", svc("web") + "---\n" + "{a: " * 60_000 + "b"),
    ("flow continued across lines that look like document markers",
     "\n---x, ".join(["[" * 900] * 100)),
]


@pytest.mark.parametrize("text", [t for _, t in NESTED], ids=[n for n, _ in NESTED])
def test_deeply_nested_yaml_is_refused_without_crashing(tmp_path, text):
    # libyaml's composer recurses in C: without the guard this kills the test process.
    write(tmp_path, "a.yaml", text)
    source = ManifestSource(tmp_path)
    assert source.rescan() == []
    assert source.parse_errors == 1


def test_moderate_nesting_is_fine(tmp_path):
    write(tmp_path, "a.yaml", svc("web") + "  extra: " + "[" * 300 + "]" * 300 + "\n")
    assert ports(ManifestSource(tmp_path).rescan()) == {"Service default/web": 80}


def test_deeply_nested_json_is_a_parse_error(tmp_path):
    write(tmp_path, "a.json", "[" * 100_000 + "]" * 100_000)
    source = ManifestSource(tmp_path)
    assert source.rescan() == []
    assert source.parse_errors == 1


# --- only changed files are read --------------------------------------------------------

@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The names of the files the source parses, in order, from here on."""
    names: list[str] = []
    real = manifests._load_documents

    def counting(path, *args):
        names.append(path.name)
        return real(path, *args)

    monkeypatch.setattr(manifests, "_load_documents", counting)
    return names

def test_only_changed_or_touched_files_are_reread(tmp_path, reads):
    write(tmp_path, "a.yaml", svc("web"))
    write(tmp_path, "b.yaml", svc("api"))
    source = ManifestSource(tmp_path)
    source.rescan()
    assert sorted(reads) == ["a.yaml", "b.yaml"]
    reads.clear()
    source.rescan()
    assert reads == []
    write(tmp_path, "b.yaml", svc("api", 81))
    source.rescan()
    assert reads == ["b.yaml"]
    reads.clear()
    # Same size, same mtime (one timestamp tick), same inode: only the watcher's hint helps.
    st = (tmp_path / "a.yaml").stat()
    (tmp_path / "a.yaml").write_text(svc("web", 81))
    os.utime(tmp_path / "a.yaml", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert source.rescan() == []
    assert ports(source.rescan({"a.yaml"})) == {"Service default/web": 81}
    assert reads == ["a.yaml"]



def test_a_watcher_woken_pass_looks_only_at_the_names_reported(tmp_path, monkeypatch,
                                                               reads):
    """Issue 16: a pass the watcher woke for one file stats and reads that file only: no
    listing, and another file broken meanwhile is neither read nor reported until a pass
    names it (or the periodic pass lists the directory)."""
    write(tmp_path, "a.yaml", svc("web"))
    write(tmp_path, "b.yaml", svc("api", ip="10.96.0.11"))
    write(tmp_path, "c.yaml", svc("db", ip="10.96.0.12"))
    source = ManifestSource(tmp_path)
    source.rescan()
    reads.clear()
    write(tmp_path, "a.yaml", svc("web", 81))
    write(tmp_path, "b.yaml", "kind: Service\nmetadata: [unclosed\n")
    real_scandir = os.scandir

    def no_listing(*args):
        raise AssertionError("a watcher-woken pass listed the directory")

    monkeypatch.setattr(manifests.os, "scandir", no_listing)
    assert ports(source.rescan_names({"a.yaml"})) == {"Service default/web": 81}
    assert reads == ["a.yaml"]
    assert source.parse_errors == 0 and source.held_back == () and source.complete
    # deleted, renamed, a name that is no manifest: the names alone tell
    (tmp_path / "c.yaml").rename(tmp_path / "d.yaml")
    assert source.rescan_names({"c.yaml", "d.yaml", ".d.yaml.swp", "notes.txt"}) == []
    (tmp_path / "d.yaml").unlink()
    assert ports(source.rescan_names({"d.yaml"})) == {"Service default/db": None}
    # the broken file holds back only itself once a pass looks at it
    monkeypatch.setattr(manifests.os, "scandir", real_scandir)
    reads.clear()
    assert source.rescan() == [] and reads == ["b.yaml"]
    assert source.parse_errors == 1 and not source.complete
    assert [held.origin for held in source.held_back] == ["b.yaml"]



def test_a_file_gone_in_a_watcher_woken_pass_releases_what_was_allocated_to_it(tmp_path):
    write(tmp_path, "a.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
                              "spec: {type: NodePort, ports: [{port: 80}]}\n")
    write(tmp_path, "b.yaml", svc("api", ip="10.96.0.11"))
    source = ManifestSource(tmp_path)
    source.rescan()
    assert ("default", "web") in source.control_plane.allocations
    (tmp_path / "a.yaml").unlink()
    assert ports(source.rescan_names({"a.yaml"})) == {"Service default/web": None}
    assert ("default", "web") not in source.control_plane.allocations


def test_a_watcher_woken_pass_restats_symlinked_manifests(tmp_path):
    """A manifest that is a symlink changes when its target does, under another name:
    a watcher-woken pass stats it too (a ConfigMap volume's keys, a link to a file)."""
    write(tmp_path, "real.yaml", svc("web"))
    (tmp_path / "web.yaml").symlink_to("real.yaml")
    write(tmp_path, "other.yaml", svc("api", ip="10.96.0.11"))
    source = ManifestSource(tmp_path)
    source.rescan()
    write(tmp_path, "real.yaml", svc("web", 81))
    # both names define web: the last in name order (web.yaml, the link) wins
    assert ports(source.rescan_names({"real.yaml"})) == {"Service default/web": 81}


class _Counting:
    """os.scandir, counted: how many passes listed the directory."""

    def __init__(self):
        self.calls, self.real = 0, os.scandir

    def __call__(self, *args):
        self.calls += 1
        return self.real(*args)


def test_the_watcher_wakes_a_pass_over_its_names_and_a_directory_event_a_whole_one(
        tmp_path, monkeypatch):
    write(tmp_path, "a.yaml", svc("web"))
    write(tmp_path, "b.yaml", svc("api", ip="10.96.0.11"))
    listings = _Counting()
    monkeypatch.setattr(manifests.os, "scandir", listings)

    async def scenario():
        changes = ManifestSource(tmp_path, resync_seconds=3600).changes()
        try:
            await next_batch(changes)
            assert listings.calls == 1
            write(tmp_path, "a.yaml", svc("web", 81))
            assert ports(await next_batch(changes)) == {"Service default/web": 81}
            assert listings.calls == 1                  # the one name, no listing
            (tmp_path / "sub").mkdir()                  # a directory event: a whole pass
            write(tmp_path, "b.yaml", svc("api", 82, ip="10.96.0.11"))
            assert ports(await next_batch(changes)) == {"Service default/api": 82}
            assert listings.calls == 2
        finally:
            await changes.aclose()

    run(scenario())


def test_an_overflowed_or_directory_event_asks_for_a_whole_pass():
    from agent.sources import dirwatch

    def event(mask, name=b"", wd=1):
        padded = name + b"\0" * (16 - len(name) % 16) if name else b""
        return struct.pack("iIII", wd, mask, 0, len(padded)) + padded

    plain = dirwatch.parse_events(event(dirwatch.IN_MOVED_TO, b"web.yaml")
                                  + event(dirwatch.IN_DELETE, b"api.json"))
    assert (plain.names, plain.whole, plain.ended) == ({"web.yaml", "api.json"}, False, False)
    overflow = dirwatch.parse_events(event(dirwatch.IN_MODIFY, b"web.yaml")
                                     + event(dirwatch.IN_Q_OVERFLOW, wd=-1))
    assert overflow.whole and not overflow.ended
    directory = dirwatch.parse_events(event(dirwatch.IN_CREATE | dirwatch.IN_ISDIR, b"x.yaml"))
    assert directory.whole and directory.names == set()
    gone = dirwatch.parse_events(event(dirwatch.IN_DELETE_SELF) + event(dirwatch.IN_IGNORED))
    assert gone.whole and gone.ended
    moved = dirwatch.parse_events(event(dirwatch.IN_MOVE_SELF))    # it follows the move
    assert moved.whole and moved.ended
    # an ended watch's events (its IN_IGNORED once removed) are left out; overflow is not
    old = dirwatch.parse_events(event(dirwatch.IN_MODIFY, b"x.yaml", wd=1)
                                + event(dirwatch.IN_IGNORED, wd=1), wd=2)
    assert (old.names, old.whole, old.ended) == (set(), False, False)
    assert dirwatch.parse_events(event(dirwatch.IN_Q_OVERFLOW, wd=-1), wd=2).whole


def test_a_watch_closed_off_the_loop_closes_its_descriptor(tmp_path):
    from agent.sources import dirwatch
    watch = dirwatch.DirectoryWatch(tmp_path, 0.001, 0.01)
    fd = watch._fd

    async def once():
        write(tmp_path, "a.yaml", svc("web"))
        return await asyncio.wait_for(watch.changed(), WAIT)

    assert "a.yaml" in run(once()).names
    watch.close()                                  # no loop running
    with pytest.raises(OSError):
        os.fstat(fd)



def test_the_watch_reads_a_burst_of_events_with_one_reader_call_per_wait(tmp_path):
    """asyncio's readers are level-triggered: one left registered through the debounce's
    sleeps is called on every turn of the loop while a writer keeps events pending (46k
    calls in 0.46 s). The reader is there only while changed() waits for a first event."""
    from agent.sources import dirwatch
    calls = 0

    def writer():
        for i in range(100):
            (tmp_path / "b.yaml").write_text(str(i))
            threading.Event().wait(0.004)

    async def scenario():
        loop = asyncio.get_running_loop()
        real = loop.add_reader

        def counted_reader(fd, callback, *args):
            def counted():
                nonlocal calls
                calls += 1
                callback(*args)
            return real(fd, counted)

        loop.add_reader = counted_reader
        watch = dirwatch.DirectoryWatch(tmp_path, 0.010, 0.400)
        thread = threading.Thread(target=writer)
        thread.start()
        returned = 0
        try:
            while thread.is_alive():
                events = await asyncio.wait_for(watch.changed(), WAIT)
                assert events.names == {"b.yaml"}
                returned += 1
        finally:
            thread.join()
            watch.close()
        return returned

    returned = run(scenario())
    assert 1 <= calls <= returned


def test_the_watch_follows_the_path_when_the_directory_is_swapped_or_recreated(
        tmp_path, caplog):
    """A deploy swapping the directory by rename (mv m m.old; mv m.new m), or deleting and
    creating it again: the watch ends (a moved directory's watch would follow m.old), a
    whole pass reads what is there, and the path is watched again once it is a directory;
    said once each way. The resync is far away: only the watch can see the edits."""
    directory = tmp_path / "m"
    directory.mkdir()
    write(directory, "a.yaml", svc("web"))

    async def scenario():
        changes = ManifestSource(directory, resync_seconds=3600).changes()
        await next_batch(changes)
        seen = {}

        async def consume():         # passes run as they come, not only when asked
            async for batch in changes:
                seen.update({str(c.key): c.obj for c in batch})

        async def until(name):
            while f"Service default/{name}" not in seen:
                await asyncio.sleep(0.01)

        async def logged(text):
            while text not in caplog.text:
                await asyncio.sleep(0.01)

        consumer = asyncio.create_task(consume())
        try:
            new = tmp_path / "m.new"
            new.mkdir()
            write(new, "a.yaml", svc("web"))
            directory.rename(tmp_path / "m.old")
            new.rename(directory)
            await asyncio.sleep(0.2)                  # the whole passes are over
            write(tmp_path / "m.old", "old.yaml", svc("old", ip="10.96.0.12"))
            write(directory, "b.yaml", svc("api", ip="10.96.0.11"))
            await asyncio.wait_for(until("api"), WAIT)
            for entry in directory.iterdir():
                entry.unlink()
            directory.rmdir()
            await asyncio.wait_for(logged("event=rescan_failed"), WAIT)   # a pass finds none
            await asyncio.sleep(0.1)                  # and a look or two
            directory.mkdir()
            write(directory, "c.yaml", svc("x", 9, ip="10.96.0.13"))
            await asyncio.wait_for(until("x"), WAIT)
            await asyncio.sleep(0.6)                  # watched again by now
            write(directory, "d.yaml", svc("y", 7, ip="10.96.0.14"))
            await asyncio.wait_for(until("y"), WAIT)
            assert ports([ObjectChange(k, o) for k, o in seen.items()]) == {
                "Service default/web": None, "Service default/api": None,
                "Service default/x": 9, "Service default/y": 7}
        finally:
            consumer.cancel()
            await asyncio.wait({consumer}, timeout=WAIT)

    with caplog.at_level(logging.INFO, logger=manifests.__name__):
        run(scenario())
    said = [r.getMessage().split()[0] for r in caplog.records if "event=watch_" in
            r.getMessage()]
    assert said == ["event=watch_ended", "event=watch_rearmed"] * 2


def test_a_file_rewritten_with_the_same_bytes_is_not_parsed_again(tmp_path, monkeypatch):
    """Issue 16: every file of a directory regenerated (or a ConfigMap volume's keys under
    a new ..data) costs a read of each, not a parse and an admission of each; a file that
    holds something back (here: broken) is parsed and reported on every read as before."""
    parsed = []
    real = manifests.parse_object

    def counting(raw):
        parsed.append(raw["metadata"]["name"])
        return real(raw)

    monkeypatch.setattr(manifests, "parse_object", counting)
    write(tmp_path, "a.yaml", svc("web"))
    write(tmp_path, "b.yaml", svc("api", ip="10.96.0.11"))
    write(tmp_path, "c.yaml", "kind: Service\nmetadata: [unclosed\n")
    source = ManifestSource(tmp_path)
    source.rescan()
    assert sorted(parsed) == ["api", "web"] and source.parse_errors == 1
    parsed.clear()
    for name in ("a.yaml", "c.yaml"):          # replaced by rename: a new inode, same bytes
        write(tmp_path, f".{name}.tmp", (tmp_path / name).read_text())
        os.replace(tmp_path / f".{name}.tmp", tmp_path / name)
    write(tmp_path, "b.yaml", svc("api", 81, ip="10.96.0.11"))
    assert ports(source.rescan()) == {"Service default/api": 81}
    assert parsed == ["api"] and source.parse_errors == 2
    assert ports(source.rescan_names({"a.yaml"})) == {} and parsed == ["api"]


def node_port_svc(name: str, kind: str = "NodePort") -> str:
    return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n"
            f"spec: {{type: {kind}, ports: [{{port: 80}}], selector: {{app: {name}}}}}\n")


def test_a_service_refused_for_want_of_a_node_port_is_admitted_once_another_frees_one(
        tmp_path):
    """A Service refused because the node-port range was full is admitted in the very pass
    another Service's change (NodePort -> ClusterIP) frees a port, as a retried create
    would be by kube-apiserver; no touch of its file needed."""
    from agent.sources.apiserver.control_plane import ControlPlane
    for name in "abc":
        write(tmp_path, f"{name}.yaml", node_port_svc(name))
    source = ManifestSource(tmp_path, control_plane=ControlPlane(node_port_range="30000-30001"))
    assert set(ports(source.rescan())) == {"Service default/a", "Service default/b"}
    assert [p[1] for p in source.control_plane.problems] == ["c"]
    write(tmp_path, "a.yaml", node_port_svc("a", "ClusterIP"))
    changes = {change.key.name: change.obj for change in source.rescan_names({"a.yaml"})}
    assert set(changes) == {"a", "c"} and changes["c"].ports[0].node_port in (30000, 30001)
    assert source.control_plane.problems == ()


def test_a_file_holding_a_refused_service_is_parsed_on_every_read(tmp_path, monkeypatch):
    """Its admission may differ from one read to the next (room freed): a touch, a
    same-bytes rewrite or a ConfigMap's ..data swap retries it, the digest skip aside."""
    from agent.sources.apiserver.control_plane import ControlPlane
    for name in "abc":
        write(tmp_path, f"{name}.yaml", node_port_svc(name))
    source = ManifestSource(tmp_path, control_plane=ControlPlane(node_port_range="30000-30001"))
    admitted = []
    real = source.control_plane.admit

    def counting(file, documents):
        admitted.append(file)
        return real(file, documents)

    monkeypatch.setattr(source.control_plane, "admit", counting)
    source.rescan()
    admitted.clear()
    for name in ("a.yaml", "c.yaml"):          # replaced by rename: a new inode, same bytes
        write(tmp_path, f".{name}.tmp", (tmp_path / name).read_text())
        os.replace(tmp_path / f".{name}.tmp", tmp_path / name)
    source.rescan_names({"a.yaml", "c.yaml"})
    assert admitted == ["c.yaml"]              # a's same bytes stand; c's are admitted again
    assert [p[1] for p in source.control_plane.problems] == ["c"]


def test_listing_is_incomplete_while_a_file_cannot_be_parsed(tmp_path):
    """A restarted agent keeps what it adopted while the listing may lack objects."""
    write(tmp_path, "a.yaml", svc("a"))
    write(tmp_path, "b.yaml", "kind: Service\nmetadata: [unclosed\n")
    source = ManifestSource(tmp_path)
    first = source.rescan()
    assert [c.key for c in first] == [key("a")]
    assert source.complete is False
    write(tmp_path, "b.yaml", svc("b", ip="10.96.0.11"))
    source.rescan({"b.yaml"})
    assert source.complete is True


def test_complete_is_answered_while_a_pass_fills_the_file_records(tmp_path):
    """The API's and the health server's threads ask `complete` while a pass (in its own
    thread) adds file records: the answer is the last pass's, read without iterating the
    records (a dict changing size under an iteration raised RuntimeError in GetStatus)."""
    write(tmp_path, "a.yaml", svc("a"))
    write(tmp_path, "b.yaml", "kind: Service\nmetadata: [unclosed\n")
    source = ManifestSource(tmp_path)
    source.rescan()

    class Filling(dict):
        """The records as another thread sees them mid-pass."""
        def values(self):
            raise RuntimeError("dictionary changed size during iteration")

    source._files = Filling(source._files)
    assert source.complete is False
def test_held_back_names_each_file_and_object_waiting_and_why(tmp_path):
    """Issue 14.1: a file broken after a good read holds back its last good objects only;
    a file never read is `unknown` (its content cannot be named); an invalid object kept
    at its previous version and a deletion waiting for a second read are named too."""
    write(tmp_path, "a.yaml", svc("a") + "---\n" + eps("a-1", "a"))
    write(tmp_path, "b.yaml", "kind: Service\nmetadata: [unclosed\n")
    write(tmp_path, "c.yaml", svc("c", ip="10.96.0.12"))
    source = ManifestSource(tmp_path, shrink_confirm_seconds=0.0)
    source.rescan()
    (unknown,) = source.held_back
    assert (unknown.origin, unknown.objects, unknown.unknown) == ("b.yaml", (), True)
    assert "flow sequence" in unknown.reason or "expected" in unknown.reason

    write(tmp_path, "a.yaml", svc("a") + "---\n" + eps("a-1", "a") + "spec: [")
    write(tmp_path, "c.yaml", svc("c", port=70000, ip="10.96.0.12"))
    assert source.rescan() == []
    broken, still_unknown, invalid = source.held_back
    assert (broken.origin, broken.objects, broken.unknown) == (
        "a.yaml", (key("a-1", "EndpointSlice"), key("a")), False)
    assert still_unknown.origin == "b.yaml" and still_unknown.unknown
    assert (invalid.origin, invalid.objects) == ("c.yaml", (key("c"),))
    assert "70000" in invalid.reason and "previous version kept" in invalid.reason

    write(tmp_path, "a.yaml", svc("a"))          # rewritten in place, one object less
    write(tmp_path, "b.yaml", "")
    write(tmp_path, "c.yaml", svc("c", ip="10.96.0.12"))
    assert source.rescan() == [] and source.complete
    (withheld,) = source.held_back
    assert (withheld.origin, withheld.objects) == ("a.yaml", (key("a-1", "EndpointSlice"),))
    assert "second read" in withheld.reason
    assert ports(source.rescan({"a.yaml"})) == {"EndpointSlice default/a-1": None}
    assert source.held_back == ()


def test_held_back_reaches_the_agent_with_its_batch(tmp_path):
    """An unknown file read at last (even holding nothing) is news to the agent: a batch,
    empty when no object changed, with held_back as of that batch."""
    write(tmp_path, "a.yaml", svc("a"))
    write(tmp_path, "b.yaml", "kind: Service\nmetadata: [unclosed\n")

    async def scenario():
        source = ManifestSource(tmp_path, resync_seconds=3600)
        changes = source.changes()
        try:
            first = await next_batch(changes)
            held_first = source.held_back
            write(tmp_path, "b.yaml", "# nothing here yet\n")
            after = await next_batch(changes)
            return first, held_first, after, source.held_back
        finally:
            await changes.aclose()

    first, held_first, after, held_after = run(scenario())
    assert [c.key for c in first] == [key("a")]
    assert [h.origin for h in held_first if h.unknown] == ["b.yaml"]
    assert after == [] and held_after == ()


# --- documents that are not Kubernetes objects (issue 14.2) --------------------------------

def test_a_document_that_is_not_an_object_is_named_once_per_file_version(tmp_path, caplog):
    """No apiVersion/kind, or a kind: typo of one read: a warning naming the file and the
    document, the malformed_documents counter, an event; again only for a new version."""
    write(tmp_path, "a.yaml", svc("a") + "---\nlisten: 8080\ndebug: true\n")
    write(tmp_path, "typo.yaml", svc("b", ip="10.96.0.11").replace("kind: Service",
                                                                     "kind: Servcie"))
    write(tmp_path, "old.yaml", eps("c-1", "c").replace("discovery.k8s.io/v1",
                                                        "discovery.k8s.io/v1beta1"))
    events = []

    async def scenario():
        source = ManifestSource(tmp_path, resync_seconds=3600, shrink_confirm_seconds=0.1)
        source.on_event = lambda kind, fields: events.append((kind, fields["message"]))
        changes = source.changes()
        try:
            first = await next_batch(changes)
            counted = source.malformed_documents
            source.rescan({"a.yaml"})           # the same version read again: no repeat
            again = source.malformed_documents
            write(tmp_path, "a.yaml", svc("a", port=81) + "---\nlisten: 8080\n")
            await next_batch(changes)
            return first, counted, again, source.malformed_documents
        finally:
            await changes.aclose()

    with caplog.at_level(logging.WARNING, logger="agent.sources.manifests"):
        first, counted, again, later = run(scenario())
    assert [c.key for c in first] == [key("a")]
    assert (counted, again, later) == (3, 3, 4)
    warnings = [r.getMessage() for r in caplog.records if "document_ignored" in r.getMessage()]
    assert len(warnings) == 4
    assert any("file=a.yaml" in w and "document=document[1]" in w and
               "no apiVersion and kind" in w for w in warnings)
    assert any("file=typo.yaml" in w and "document=document[0]" in w and
               "kind: Service?" in w for w in warnings)
    assert any("file=old.yaml" in w and "kind: EndpointSlice?" in w for w in warnings)
    named = [message for kind, message in events if kind == "source_input"]
    assert len(named) == 4 and any(m.startswith("a.yaml document[1]:") for m in named)


def test_objects_of_kinds_not_read_stay_quiet(tmp_path, caplog):
    """A Deployment beside its Service, a ConfigMap, a Knative Service: at most a debug line."""
    deployment = ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n"
                  "spec: {replicas: 2}\n")
    knative = "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: k}\n"
    configmap = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {a: b}\n"
    endpoints = "apiVersion: v1\nkind: Endpoints\nmetadata: {name: web}\n"
    write(tmp_path, "web.yaml", "---\n".join([svc("web"), deployment, knative, configmap,
                                              endpoints]))
    source = ManifestSource(tmp_path)
    with caplog.at_level(logging.INFO, logger="agent.sources.manifests"):
        assert [c.key for c in source.rescan()] == [key("web")]
    assert source.malformed_documents == 0 and caplog.text == ""


# --- YAML aliases (issue 13 A2) -----------------------------------------------------------

def alias_heavy_list(items: int) -> str:
    """~5 KB: a `kind: List` whose items alias one EndpointSlice of 1000 endpoints x 100
    addresses, all aliases too. Read unchecked, each item cost ~0.6 s."""
    addresses = ", ".join(f"10.1.0.{i + 1}" for i in range(100))
    return (f"a: &a [{addresses}]\n"
            "e: &e {addresses: *a, conditions: {ready: true}}\n"
            "s: &s\n"
            "  apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n"
            "  metadata: {name: x, labels: {kubernetes.io/service-name: web}}\n"
            "  addressType: IPv4\n  ports: [{name: '', port: 80}]\n"
            f"  endpoints: [{', '.join(['*e'] * 1000)}]\n"
            f"apiVersion: v1\nkind: List\nitems: [{', '.join(['*s'] * items)}]\n")


def test_excessive_aliasing_is_refused_and_the_file_keeps_its_objects(tmp_path, caplog):
    source = ManifestSource(tmp_path)
    write(tmp_path, "a.yaml", svc("web"))
    assert ports(source.rescan()) == {"Service default/web": 80}
    write(tmp_path, "a.yaml", alias_heavy_list(3))
    with caplog.at_level(logging.WARNING, logger=manifests.__name__):
        assert source.rescan() == []
    assert (source.refused_files, source.parse_errors, source.complete) == (1, 0, False)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith('event=file_refused file=a.yaml error="excessive aliasing'), line
    assert line.endswith("kept_objects=1"), line


def test_an_anchor_that_contains_itself_is_refused(tmp_path):
    write(tmp_path, "a.yaml", "apiVersion: v1\nkind: Service\n"
                              "metadata: &m {name: web, labels: {loop: *m}}\n")
    source = ManifestSource(tmp_path)
    assert source.rescan() == []
    assert source.refused_files == 1


def test_ordinary_aliases_are_read(tmp_path):
    """Anchors for what manifests share (labels, ports), as go-yaml allows them."""
    shared = "x-ports: &ports [{name: http, port: 80}, {name: https, port: 443}]\n"
    services = "".join(
        f"- {{apiVersion: v1, kind: Service, metadata: {{name: web{i}}}, "
        f"spec: {{clusterIP: 10.96.0.{i + 1}, ports: *ports}}}}\n" for i in range(50))
    write(tmp_path, "a.yaml", shared + "apiVersion: v1\nkind: List\nitems:\n" + services)
    source = ManifestSource(tmp_path)
    assert len(source.rescan()) == 50 and source.refused_files == 0


# --- what the directory holds (issue 13 A3) -------------------------------------------------

def test_a_symlink_out_of_the_directory_is_refused(tmp_path, caplog):
    outside = tmp_path / "outside"
    outside.mkdir()
    write(outside, "web.yaml", svc("web"))
    watched = tmp_path / "watched"
    watched.mkdir()
    (watched / "web.yaml").symlink_to(outside / "web.yaml")
    (watched / "up.yaml").symlink_to("../outside/web.yaml")
    source = ManifestSource(watched)
    with caplog.at_level(logging.WARNING, logger=manifests.__name__):
        assert source.rescan() == []
    assert source.refused_files == 2 and not source.complete
    assert all("outside the directory" in r.getMessage() for r in caplog.records)


def test_a_fifo_swapped_in_after_the_listing_does_not_block_the_source(tmp_path):
    write(tmp_path, "a.yaml", svc("web"))
    source = ManifestSource(tmp_path)
    st = (tmp_path / "a.yaml").stat()
    listed = (st.st_mtime_ns, st.st_size, st.st_ino)
    (tmp_path / "a.yaml").unlink()
    os.mkfifo(tmp_path / "a.yaml")
    reader = concurrent.futures.ThreadPoolExecutor(1)
    read = reader.submit(source._read, "a.yaml", listed, None)
    try:
        record = read.result(WAIT)
    finally:
        if not read.done():   # unblock the reader before failing: open the other end
            os.close(os.open(tmp_path / "a.yaml", os.O_WRONLY | os.O_NONBLOCK))
        reader.shutdown()
    assert not record.readable and source.refused_files == 1


def test_a_fifo_at_listing_is_refused_and_keeps_what_the_file_gave(tmp_path):
    write(tmp_path, "a.yaml", svc("web"))
    source = ManifestSource(tmp_path)
    assert ports(source.rescan()) == {"Service default/web": 80}
    (tmp_path / "a.yaml").unlink()
    os.mkfifo(tmp_path / "a.yaml")
    assert source.rescan() == [] and source.refused_files == 1 and not source.complete


def test_a_file_that_cannot_be_stat_ed_makes_the_listing_incomplete(tmp_path, caplog):
    """ELOOP (here), EACCES: what the file holds is unknown, so a restarted agent must keep
    what it adopted; its objects stay, and it is logged once, not on every resync."""
    write(tmp_path, "a.yaml", svc("web"))
    source = ManifestSource(tmp_path)
    assert ports(source.rescan()) == {"Service default/web": 80}
    (tmp_path / "a.yaml").unlink()
    (tmp_path / "a.yaml").symlink_to("a.yaml")   # a loop
    with caplog.at_level(logging.WARNING, logger=manifests.__name__):
        assert source.rescan() == [] and source.rescan() == []
    assert not source.complete and source.parse_errors == 1
    assert [r.getMessage().split()[:2] for r in caplog.records] == [
        ["event=file_unreadable", "file=a.yaml"]]
    (tmp_path / "a.yaml").unlink()
    write(tmp_path, "a.yaml", svc("web", 81))
    assert ports(source.rescan()) == {"Service default/web": 81} and source.complete


def test_yaml_over_the_default_limit_is_refused_saying_what_to_do(tmp_path, caplog):
    padding = "#" * (3 * 1024 * 1024) + "\n"
    write(tmp_path, "a.yaml", svc("web") + padding)
    write(tmp_path, "b.json", svc_json("db") + " " * (3 * 1024 * 1024))
    source = ManifestSource(tmp_path)
    with caplog.at_level(logging.WARNING, logger=manifests.__name__):
        assert ports(source.rescan()) == {"Service default/db": 80}
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("event=file_refused file=a.yaml") and "split it" in line \
        and "write it as .json" in line, line


# --- a file rewritten in place (issue 13 A3) ------------------------------------------------

def rewrite_in_place(directory: Path, name: str, text: str) -> None:
    """As `kubectl get ... > file` does: same inode, truncated, then written."""
    ino = (directory / name).stat().st_ino
    write(directory, name, text)
    assert (directory / name).stat().st_ino == ino


def test_deletions_from_a_file_rewritten_in_place_wait_for_a_second_read(tmp_path):
    source = ManifestSource(tmp_path, shrink_confirm_seconds=3600)
    write(tmp_path, "a.yaml", svc("web") + "---\n" + svc("api", ip="10.96.0.11"))
    source.rescan()
    rewrite_in_place(tmp_path, "a.yaml", "")                        # caught truncated
    assert source.rescan() == [] and source.rescan({"a.yaml"}) == []
    rewrite_in_place(tmp_path, "a.yaml", svc("web", 81))            # edits apply at once
    assert ports(source.rescan()) == {"Service default/web": 81}
    rewrite_in_place(tmp_path, "a.yaml", svc("web", 81) + "---\n" + svc("api", ip="10.96.0.11"))
    assert source.rescan() == []                                    # written whole: nothing lost
    source.shrink_confirm_seconds = 0
    rewrite_in_place(tmp_path, "a.yaml", svc("web", 81))
    assert source.rescan() == []                                    # the first read
    assert ports(source.rescan()) == {"Service default/api": None}  # the second agrees


def test_a_file_replaced_by_rename_deletes_at_once(tmp_path):
    source = ManifestSource(tmp_path, shrink_confirm_seconds=3600)
    write(tmp_path, "a.yaml", svc("web") + "---\n" + svc("api", ip="10.96.0.11"))
    source.rescan()
    write(tmp_path, ".a.yaml.tmp", svc("web"))
    os.replace(tmp_path / ".a.yaml.tmp", tmp_path / "a.yaml")
    assert ports(source.rescan()) == {"Service default/api": None}


def test_a_withheld_deletion_arrives_without_another_change(tmp_path):
    write(tmp_path, "a.yaml", svc("web") + "---\n" + svc("api", ip="10.96.0.11"))

    async def scenario():
        source = ManifestSource(tmp_path, resync_seconds=3600, shrink_confirm_seconds=0.2)
        changes = source.changes()
        try:
            await next_batch(changes)
            rewrite_in_place(tmp_path, "a.yaml", svc("web"))
            return await next_batch(changes)
        finally:
            await changes.aclose()

    assert ports(run(scenario())) == {"Service default/api": None}


# --- names (issue 13 A9) --------------------------------------------------------------------

SLICE_NAMED = textwrap.dedent("""\
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata:
      name: "{name}"
      namespace: "{namespace}"
      labels: {{kubernetes.io/service-name: "{service}"}}
    addressType: IPv4
    endpoints: [{{addresses: [10.1.0.1]}}]
    """)
NODE_NAMED = 'apiVersion: v1\nkind: Node\nmetadata: {{name: "{name}"}}\n'
SERVICE_NAMED = ('apiVersion: v1\nkind: Service\nmetadata: {{name: "{name}", namespace: '
                 '"{namespace}"}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{port: 80}}]}}\n')


@dataclass
class NameCase:
    name: str
    text: str
    valid: bool


def named(template: str, name: str = "web", namespace: str = "default",
          service: str = "web") -> str:
    return template.format(name=name, namespace=namespace, service=service)


NAME_CASES = [
    NameCase("service: DNS-1035 label", named(SERVICE_NAMED, "web-1"), True),
    NameCase("service: a slash", named(SERVICE_NAMED, "a/b"), False),
    NameCase("service: upper case", named(SERVICE_NAMED, "Web"), False),
    NameCase("service: a dot (a subdomain, not a label)", named(SERVICE_NAMED, "web.x"), False),
    NameCase("service: starts with a digit", named(SERVICE_NAMED, "1web"), False),
    NameCase("service: 63 characters", named(SERVICE_NAMED, "w" * 63), True),
    NameCase("service: 64 characters", named(SERVICE_NAMED, "w" * 64), False),
    NameCase("service: control characters", named(SERVICE_NAMED, r"web\r\e[2J"), False),
    NameCase("namespace: a slash", named(SERVICE_NAMED, namespace="a/b"), False),
    NameCase("namespace: starts with a digit", named(SERVICE_NAMED, namespace="1ns"), True),
    NameCase("namespace: underscore", named(SERVICE_NAMED, namespace="kube_system"), False),
    NameCase("slice: a subdomain", named(SLICE_NAMED, "web-abc.v1"), True),
    NameCase("slice: starts with a digit", named(SLICE_NAMED, "1-web"), True),
    NameCase("slice: a slash", named(SLICE_NAMED, "web/1"), False),
    NameCase("slice: 254 characters", named(SLICE_NAMED, "a." * 126 + "bc"), False),
    NameCase("slice: service label with a slash", named(SLICE_NAMED, service="a/b"), False),
    NameCase("slice: service label upper case (a valid label value)",
             named(SLICE_NAMED, service="Web_1.x"), True),
    NameCase("node: a subdomain", named(NODE_NAMED, "node-1.example.com"), True),
    NameCase("node: upper case", named(NODE_NAMED, "Node1"), False),
]


@pytest.mark.parametrize("case", NAME_CASES, ids=lambda c: c.name)
def test_names_follow_the_api_server_rules(tmp_path, case):
    write(tmp_path, "a.yaml", case.text)
    source = ManifestSource(tmp_path)
    changes = source.rescan()
    assert (len(changes), source.invalid_objects) == ((1, 0) if case.valid else (0, 1))


def test_log_lines_escape_what_files_hold(tmp_path, caplog):
    write(tmp_path, "a.yaml", named(SERVICE_NAMED, r"web\r\e[2J\u202e"))
    write(tmp_path, "b\x1b[31m.yaml", BROKEN_YAML)
    with caplog.at_level(logging.WARNING, logger=manifests.__name__):
        ManifestSource(tmp_path).rescan()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    for line in lines:
        assert line.isprintable(), repr(line)
    assert 'object="Service default/web\\r\\x1b[2J\\u202e"' in lines[0], lines[0]
    assert 'file="b\\x1b[31m.yaml"' in lines[1], lines[1]


# --- the per-file cost (issue 16) -------------------------------------------------------

def test_only_symlinks_are_resolved_and_they_stay_inside(tmp_path, monkeypatch):
    """Ordinary files are opened by name relative to the directory, never followed: no
    realpath per file. Symlinks are still resolved and kept inside the directory."""
    resolved = []
    real = os.path.realpath
    monkeypatch.setattr(manifests.os.path, "realpath",
                        lambda path, **kw: resolved.append(Path(path).name) or real(path, **kw))
    watched, outside = tmp_path / "watched", tmp_path / "outside"
    watched.mkdir()
    outside.mkdir()
    for i in range(5):
        write(watched, f"s{i}.yaml", svc(f"s{i}", ip=f"10.96.0.{10 + i}"))
    write(watched, "..v1-api.yaml", svc("api", ip="10.96.0.20"))
    (watched / "api.yaml").symlink_to("..v1-api.yaml")
    write(outside, "web.yaml", svc("web", ip="10.96.0.30"))
    (watched / "web.yaml").symlink_to(outside / "web.yaml")
    source = ManifestSource(watched)
    assert {c.key.name for c in source.rescan()} == {"s0", "s1", "s2", "s3", "s4", "api"}
    assert not {"s0.yaml", "s1.yaml", "s2.yaml", "s3.yaml", "s4.yaml"} & set(resolved)
    assert {"api.yaml", "web.yaml"} <= set(resolved) and source.refused_files == 1


def test_a_file_swapped_for_a_symlink_out_after_the_listing_is_refused(tmp_path):
    watched, outside = tmp_path / "watched", tmp_path / "outside"
    watched.mkdir()
    outside.mkdir()
    write(watched, "a.yaml", svc("web"))
    write(outside, "a.yaml", svc("web", 81))
    source = ManifestSource(watched)
    st = (watched / "a.yaml").stat()
    (watched / "a.yaml").unlink()
    (watched / "a.yaml").symlink_to(outside / "a.yaml")
    record = source._read("a.yaml", (st.st_mtime_ns, st.st_size, st.st_ino), None)
    assert not record.readable and "outside the directory" in record.problem


def test_a_file_is_read_to_its_end_but_never_past_the_limit(tmp_path):
    """Reads are sized by fstat; a file grown since is still read whole, up to the limit
    and one byte more (which says: too large)."""
    path = tmp_path / "a.json"
    path.write_bytes(b"x" * 300_000)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert len(manifests._read_bounded(fd, 10, 1_000_000)) == 300_000   # stat said 10
        os.lseek(fd, 0, os.SEEK_SET)
        assert len(manifests._read_bounded(fd, 10, 100_000)) == 100_001
        os.lseek(fd, 0, os.SEEK_SET)
        assert manifests._read_bounded(fd, 300_000, 1_000_000) == b"x" * 300_000
    finally:
        os.close(fd)
