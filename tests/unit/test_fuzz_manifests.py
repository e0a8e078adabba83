"""The manifest directory source under hypothesis with broken and hostile files (issue 9,
point 6): half-written, binary, deeply nested, alias bombs, huge lists, wrong types, tags.

Whatever a file holds, a rescan never raises and never takes the process down; the bad file
is skipped and counted, the good files beside it are applied, and a file that becomes valid
again is picked up."""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model.types import EndpointSlice, Node, ObjectKey, Service
from agent.sources.manifests import ManifestSource
from tests.unit.test_fuzz_objects import SERVICES, SLICES, mutated

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])

# JSON is YAML too: the good file reads the same under either suffix
GOOD = json.dumps({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "good", "namespace": "ns"},
                   "spec": {"clusterIP": "10.96.0.99",
                            "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
GOOD_KEY = ObjectKey("Service", "ns", "good")


def alias_bomb(levels: int, width: int) -> str:
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nkind: List\napiVersion: v1\nitems: *l{levels - 1}\n"


HOSTILE = [
    "[" * 200_000,
    "{a: " * 50_000 + "b",
    "- " * 50_000 + "x\n",
    "  " * 30_000 + "a: b\n",
    alias_bomb(9, 9),
    "apiVersion: v1\nkind: List\nitems: " + "[" + ", ".join(["{}"] * 100_000) + "]\n",
    "apiVersion: v1\nkind: Service\nmetadata: &m {name: x, namespace: ns, labels: *m}\n",
    "apiVersion: v1\nkind: Service\nmetadata: !!python/object:os.system {name: x}\n",
    "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: !!binary aGVsbG8=\n",
    "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: !!set {a, b}\n",
    "apiVersion: v1\nkind: Service\nmetadata: {name: 2024-01-01}\n",
    "apiVersion: v1\nkind: Service\nmetadata: {name: x, name: y}\n",
    "? [a, b]\n: c\n",
    "\ufeff" + GOOD.replace("good", "bom"),
    "apiVersion: v1\nkind: Service\n\x00\x01\x02",
    "\xff\xfe garbage",
    "---\n" * 10_000,
    "a: " + "x" * 3_000_000 + "\n",
]


def documents() -> st.SearchStrategy[str]:
    """YAML of mutated objects, one or several per file, sometimes as a `kind: List`."""
    def dump(objects: list, as_list: bool) -> str:
        if as_list:
            objects = [{"apiVersion": "v1", "kind": "List", "items": objects}]
        try:
            return yaml.safe_dump_all(objects, sort_keys=False)
        except (yaml.YAMLError, RecursionError, TypeError, ValueError):
            return json.dumps(objects, default=str)
    # huge values are HOSTILE's business: PyYAML's pure-Python dumper takes minutes on them
    return st.builds(dump, st.lists(mutated(SERVICES + SLICES, huge_values=False), min_size=1,
                                    max_size=3),
                     st.booleans())


def broken(text: str, cut: int, insert: str, where: int) -> str:
    """A half-written file (cut short), with some bytes of noise put in."""
    cut = cut % (len(text) + 1)
    text = text[:cut]
    where = where % (len(text) + 1)
    return text[:where] + insert + text[where:]


contents = st.one_of(
    documents(),
    documents().map(lambda text: text.replace("\n", "\n" + " " * 3, 1)),   # bad indentation
    st.builds(broken, documents(), st.integers(0, 10_000), st.text(max_size=8),
              st.integers(0, 10_000)),
    # by index: hypothesis would print megabytes of brackets for a failing example
    st.integers(0, len(HOSTILE) - 1).map(lambda i: f"HOSTILE[{i}]"),
    st.text(max_size=200),
    st.binary(max_size=200),
)


def write(directory: Path, name: str, content: str | bytes) -> None:
    path = directory / name
    if isinstance(content, str) and content.startswith("HOSTILE["):
        content = HOSTILE[int(content[8:-1])]
    if isinstance(content, str):
        content = content.encode("utf-8", errors="surrogatepass")
    path.write_bytes(content)
    # a rewrite within one timestamp tick keeps the size-and-mtime signature: move mtime
    os.utime(path, ns=(os.stat(path).st_mtime_ns + 1_000_000,) * 2)


def listed(source: ManifestSource) -> dict:
    return dict(source._listed)


@SETTINGS
@given(st.lists(contents, min_size=1, max_size=3), st.sampled_from([".yaml", ".json", ".yml"]))
def test_bad_files_are_skipped_and_the_good_one_beside_them_is_applied(tmp_path_factory,
                                                                       files, suffix):
    directory = tmp_path_factory.mktemp("manifests")
    write(directory, "a-good.yaml", GOOD)
    source = ManifestSource(directory, max_file_bytes=8 * 1024 * 1024)
    changes = source.rescan()
    assert [c.key for c in changes] == [GOOD_KEY]
    unreadable = 0
    for i, content in enumerate(files):
        errors_before = source.parse_errors + source.refused_files   # a refusal counts too
        write(directory, f"b-bad{i}{suffix}", content)
        changes = source.rescan({f"b-bad{i}{suffix}"})
        for change in changes:
            assert change.obj is None or isinstance(change.obj, (Service, EndpointSlice, Node))
        # the good file is never touched by what happens in another one
        assert GOOD_KEY in listed(source) and GOOD_KEY not in {c.key for c in changes}
        unreadable += source.parse_errors + source.refused_files > errors_before
        # a file that could not be parsed makes the listing incomplete (a restarted agent
        # must then keep what it adopted rather than delete it)
        assert source.complete == (unreadable == 0)

    # every bad file made valid again: its objects arrive, nothing of the good one moves
    for i in range(len(files)):
        write(directory, f"b-bad{i}{suffix}", GOOD.replace("good", f"fixed{i}"))
    changes = source.rescan({f"b-bad{i}{suffix}" for i in range(len(files))})
    assert source.complete
    keys = set(listed(source))
    assert {ObjectKey("Service", "ns", f"fixed{i}") for i in range(len(files))} <= keys
    assert GOOD_KEY in keys


@SETTINGS
@given(documents())
def test_a_file_turned_bad_keeps_its_last_good_objects(tmp_path_factory, content):
    directory = tmp_path_factory.mktemp("manifests")
    write(directory, "web.yaml", GOOD)
    source = ManifestSource(directory)
    source.rescan()
    write(directory, "web.yaml", broken(content, len(content) // 2, "\x00{[", 3))
    changes = source.rescan({"web.yaml"})
    if source.parse_errors:
        # unparseable: nothing deleted, the listing is marked incomplete
        assert changes == [] and GOOD_KEY in listed(source) and not source.complete
    else:
        # parseable: what it holds now wins, valid objects only
        assert all(c.obj is None or isinstance(c.obj, (Service, EndpointSlice)) for c in changes)


def test_each_hostile_file_is_a_counted_parse_error_or_invalid_objects(tmp_path):
    """Every HOSTILE text on its own: refused, a parse error or invalid objects; never an
    exception, never a crash (the C loader segfaults on deep nesting if it sees it)."""
    for i, text in enumerate(HOSTILE):
        directory = tmp_path / str(i)
        directory.mkdir()
        write(directory, "a-good.yaml", GOOD)
        write(directory, "b-hostile.yaml", text)
        source = ManifestSource(directory)
        source.rescan()
        assert GOOD_KEY in listed(source), i
        bad_objects = {k for k in listed(source) if k != GOOD_KEY}
        # valid after all: a BOM; a self-referencing metadata (service label values are not
        # read); a duplicate key (libyaml keeps the last, where kubectl would refuse)
        assert bad_objects <= {ObjectKey("Service", "ns", "bom"), ObjectKey("Service", "ns", "x"),
                               ObjectKey("Service", "default", "y")}, (i, bad_objects)
        assert source.parse_errors + source.refused_files <= 1, i
