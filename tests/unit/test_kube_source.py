"""The Kubernetes source against a small API server speaking the real protocol (tests/kubeapi):
the first batch is the whole world, then only changes, through pages, bookmarks, dropped
streams, 410 Gone, slow answers, auth failures and the server going away."""
from __future__ import annotations

import asyncio
import copy
import logging
import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.model.types import ObjectKey
from agent.sources import kube
from agent.sources.kube import KubeSource, Timing, api_client_for
from lab import manifests
from tests.kubeapi import FakeKubeApi, node

NODE = "node-a"
FAST = Timing(backoff_first=0.02, backoff_max=0.2, page_size=2)
PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
SLICE_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"}]
SERVICES = "/api/v1/services"
SLICES = "/apis/discovery.k8s.io/v1/endpointslices"
NODES = "/api/v1/nodes"
WAIT = 30.0      # a bound on waiting for something that must happen; never asserted on


def svc(name: str, ip: str, **labels: str) -> dict:
    obj = copy.deepcopy(manifests.service(name, ip, PORTS))   # tests edit it in place
    if labels:
        obj["metadata"]["labels"] = dict(labels)
    return obj


def eps(name: str, *addresses: str, service: str | None = None) -> dict:
    return manifests.endpoint_slice(service or name, list(addresses), SLICE_PORTS,
                                    name=f"{name}-slice")


def key(kind: str, name: str) -> ObjectKey:
    return ObjectKey(kind, "" if kind == "Node" else "lab", name)


class Watcher:
    """Drives source.changes() from a test: next() is the next batch as {key: obj|None}."""

    def __init__(self, source: KubeSource) -> None:
        self.source = source
        self.iterator = source.changes().__aiter__()

    async def next(self) -> dict[ObjectKey, object]:
        batch = await asyncio.wait_for(self.iterator.__anext__(), WAIT)
        return {change.key: change.obj for change in batch}

    async def close(self) -> None:
        await self.iterator.aclose()


@pytest.fixture
def api():
    with FakeKubeApi() as server:
        yield server


def source_for(api: FakeKubeApi, tmp_path: Path, token: str | None = None,
               timing: Timing = FAST) -> KubeSource:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", token=token)
    return KubeSource(api_client_for(str(kubeconfig)), NODE, timing)


def run(test: Callable, api: FakeKubeApi, tmp_path: Path, **kw):
    """Run `async test(watcher)` against a fresh source; always stop the source."""
    async def main():
        watcher = Watcher(source_for(api, tmp_path, **kw))
        try:
            return await test(watcher)
        finally:
            await watcher.close()
    return asyncio.run(main())


async def in_thread(function, *args):
    return await asyncio.to_thread(function, *args)


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll condition; a bug fails here with a message instead of at pytest's timeout."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def watching(api: FakeKubeApi) -> Callable:
    """Wait until all three resources are being watched."""
    return lambda: in_thread(api.wait_for_watches, 3)


# --- the first batch ---------------------------------------------------------------

def test_first_batch_is_the_whole_world_listed_in_pages(api, tmp_path):
    """Five services in pages of two (continue tokens), slices, and only this node."""
    api.put(*(svc(f"web{i}", f"10.96.0.{10 + i}") for i in range(5)))
    api.put(eps("web0", "10.244.1.2"), eps("web1", "10.244.1.3"))
    api.put(node(NODE, ["172.30.0.11"], zone="z1"), node("node-b", ["172.30.0.12"]))

    async def test(w: Watcher):
        assert not w.source.complete
        first = await w.next()
        assert w.source.complete
        return first

    first = run(test, api, tmp_path)
    assert set(first) == {key("Service", f"web{i}") for i in range(5)} | {
        key("EndpointSlice", "web0-slice"), key("EndpointSlice", "web1-slice"),
        key("Node", NODE)}
    assert first[key("Node", NODE)].zone == "z1"
    assert str(first[key("Service", "web3")].cluster_ips[0]) == "10.96.0.13"
    lists = [r for r in api.requests if r.path == SERVICES and not r.watch]
    assert len(lists) == 3 and all(r.params["limit"] == "2" for r in lists)
    assert "continue" not in lists[0].params and all("continue" in r.params for r in lists[1:])


def test_the_server_filters_what_kube_proxy_filters(api, tmp_path):
    """Services and EndpointSlices without the service-proxy-name and headless labels
    (cmd/kube-proxy/app/server.go), the Node by name."""
    api.put(svc("web", "10.96.0.10"),
            svc("other", "10.96.0.11", **{"service.kubernetes.io/service-proxy-name": "x"}))
    other_slice = eps("other", "10.244.1.9")
    other_slice["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = "x"
    api.put(eps("web", "10.244.1.2"), other_slice, node("node-b"))

    async def test(w: Watcher):
        return await w.next()

    first = run(test, api, tmp_path)
    assert set(first) == {key("Service", "web"), key("EndpointSlice", "web-slice")}
    selector = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
    for request in api.requests:
        if request.path in (SERVICES, SLICES):
            assert request.params["labelSelector"] == selector
        else:
            assert request.params["fieldSelector"] == f"metadata.name={NODE}"


def test_no_batch_until_every_resource_is_listed_and_the_loop_stays_free(api, tmp_path):
    """A slow EndpointSlice list holds the first batch back (no half-listed world), and the
    asyncio loop keeps running meanwhile (the client blocks in threads only)."""
    api.put(svc("web", "10.96.0.10"), eps("web", "10.244.1.2"))
    gate = api.gate(SLICES)

    async def test(w: Watcher):
        first = asyncio.ensure_future(w.next())
        await in_thread(api.wait_for_request, lambda r: r.path == SLICES)
        await in_thread(api.wait_for_watches, 2)        # services and nodes are listed
        ticks = 0
        for _ in range(20):                             # the loop runs other work
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 20 and not first.done() and not w.source.complete
        gate.set()
        return await first

    first = run(test, api, tmp_path)
    assert set(first) == {key("Service", "web"), key("EndpointSlice", "web-slice")}


def test_a_list_cut_off_mid_body_is_retried(api, tmp_path):
    api.put(svc("web", "10.96.0.10"))
    api.drop_lists = 2

    async def test(w: Watcher):
        return await w.next()

    assert set(run(test, api, tmp_path)) == {key("Service", "web")}
    assert api.drop_lists == 0
    assert len([r for r in api.requests if not r.watch]) == 5     # 3 lists + 2 retried


def test_an_expired_continue_token_restarts_the_list(api, tmp_path):
    api.put(*(svc(f"web{i}", f"10.96.0.{10 + i}") for i in range(5)))
    gate = api.gate(SERVICES, when=lambda r: "continue" in r.params)

    async def test(w: Watcher):
        first = asyncio.ensure_future(w.next())
        # the first page is out; hold the second, forget the snapshot, add one more
        await in_thread(api.wait_for_request, lambda r: "continue" in r.params)
        api.compact()
        api.put(svc("web9", "10.96.0.99"))
        gate.set()
        return await first

    first = run(test, api, tmp_path)
    services = {k.name for k in first if k.kind == "Service"}
    assert services == {"web0", "web1", "web2", "web3", "web4", "web9"}


# --- watching ----------------------------------------------------------------------

def test_watch_events_become_changes_and_no_op_updates_none(api, tmp_path):
    api.put(svc("web", "10.96.0.10"), eps("web", "10.244.1.2"), node(NODE, ["172.30.0.11"]))

    async def test(w: Watcher):
        await w.next()
        await watching(api)()
        api.put(eps("web", "10.244.1.2", "10.244.1.3"))
        added = await w.next()
        # an annotation and a status-only Node update change nothing we use: no batch
        annotated = svc("web", "10.96.0.10")
        annotated["metadata"]["annotations"] = {"touched": "yes"}
        api.put(annotated, node(NODE, ["172.30.0.11"]))
        api.put(svc("api", "10.96.0.20"))
        created = await w.next()
        api.delete("Service", "web", "lab")
        deleted = await w.next()
        api.put(node("node-b"))                        # another node: not ours
        api.put(node(NODE, ["172.30.0.11"], zone="z2"))
        zone = await w.next()
        return added, created, deleted, zone

    added, created, deleted, zone = run(test, api, tmp_path)
    assert [len(added[key("EndpointSlice", "web-slice")].endpoints)] == [2]
    assert set(created) == {key("Service", "api")}
    assert deleted == {key("Service", "web"): None}
    assert set(zone) == {key("Node", NODE)} and zone[key("Node", NODE)].zone == "z2"


def test_a_relabelled_object_leaving_the_selection_is_deleted(api, tmp_path):
    api.put(svc("web", "10.96.0.10"))

    async def test(w: Watcher):
        await w.next()
        await watching(api)()
        api.put(svc("web", "10.96.0.10", **{"service.kubernetes.io/service-proxy-name": "x"}))
        return await w.next()

    assert run(test, api, tmp_path) == {key("Service", "web"): None}


def test_a_dropped_stream_resumes_from_the_last_version_without_a_list(api, tmp_path):
    """No relist and no full-world batch: only what changed while the stream was down."""
    api.put(svc("web", "10.96.0.10"), svc("api", "10.96.0.20"), eps("web", "10.244.1.2"))

    async def test(w: Watcher):
        await w.next()
        await watching(api)()
        api.put(svc("db", "10.96.0.30"))
        await w.next()
        seen = api.resource_version
        before = len(api.requests)
        api.drop_connections()
        api.put(eps("web", "10.244.1.7"))
        batch = await w.next()
        return batch, seen, api.requests_since(before)

    batch, seen, requests = run(test, api, tmp_path)
    assert set(batch) == {key("EndpointSlice", "web-slice")}
    assert all(r.watch for r in requests), "a dropped stream must not cause a list"
    services = [r for r in requests if r.path == SERVICES]
    assert services and services[0].params["resourceVersion"] == str(seen)
    assert all(r.params["allowWatchBookmarks"] == "true" for r in requests)


def test_a_bookmark_moves_the_resume_point(api, tmp_path):
    """The Node watch sees no event of its own; a bookmark carries it forward, so after a
    drop it resumes from the bookmark's version, not the list's."""
    api.put(node(NODE))

    async def test(w: Watcher):
        await w.next()
        listed = api.resource_version
        await watching(api)()
        api.put(svc("web", "10.96.0.10"))            # moves the server's version
        await w.next()
        api.bookmark()
        marked = api.resource_version
        await in_thread(api.wait_for_sent, "Node", "BOOKMARK")
        before = len(api.requests)
        api.drop_connections()
        await in_thread(api.wait_for_request, lambda r: r.path == NODES and r.watch, before)
        return listed, marked, [r for r in api.requests_since(before) if r.path == NODES]

    listed, marked, resumed = run(test, api, tmp_path)
    assert marked > listed
    assert resumed and resumed[0].params["resourceVersion"] == str(marked)


def test_410_in_the_stream_relists_and_hands_on_only_the_difference(api, tmp_path):
    api.put(svc("web", "10.96.0.10"), svc("api", "10.96.0.20"), svc("db", "10.96.0.30"))

    async def test(w: Watcher):
        await w.next()
        await watching(api)()
        gate = api.gate(SERVICES, when=lambda r: not r.watch)    # hold the relist
        before = len(api.requests)
        api.expire_watches()
        await in_thread(api.wait_for_request, lambda r: r.path == SERVICES and not r.watch,
                        before)
        # changes the watch never saw: only the list can find them
        api.delete("Service", "db", "lab")
        api.put(svc("api", "10.96.0.21"))
        gate.set()
        return await w.next(), w.source.relists

    batch, relists = run(test, api, tmp_path)
    assert set(batch) == {key("Service", "db"), key("Service", "api")}
    assert batch[key("Service", "db")] is None
    assert str(batch[key("Service", "api")].cluster_ips[0]) == "10.96.0.21"
    assert relists >= 3            # every resource was told 410 and listed again


def test_an_http_410_for_a_too_old_version_relists(api, tmp_path):
    api.put(svc("web", "10.96.0.10"))
    api.too_old_as_http = True

    async def test(w: Watcher):
        await w.next()
        await watching(api)()
        api.stop()                            # away while history is compacted
        api.delete("Service", "web", "lab")
        api.put(svc("api", "10.96.0.20"))
        api.compact()
        api.start()
        return await w.next()

    batch = run(test, api, tmp_path)
    assert batch[key("Service", "web")] is None and key("Service", "api") in batch
    watches = [r for r in api.requests if r.watch and r.path == SERVICES]
    assert len(watches) >= 2


def test_another_error_in_the_stream_resumes_without_a_list(api, tmp_path):
    api.put(svc("web", "10.96.0.10"))

    async def test(w: Watcher):
        await w.next()
        await watching(api)()
        before = len(api.requests)
        api.fail_watches(500, "InternalError")
        api.put(svc("api", "10.96.0.20"))
        batch = await w.next()
        return batch, api.requests_since(before)

    batch, requests = run(test, api, tmp_path)
    assert set(batch) == {key("Service", "api")}
    assert all(r.watch for r in requests)


# --- the server away, slow, or refusing ---------------------------------------------

def test_server_away_at_start_then_back(api, tmp_path):
    api.put(svc("web", "10.96.0.10"))
    api.stop()

    async def test(w: Watcher):
        first = asyncio.ensure_future(w.next())
        await until(lambda: w.source.api_errors >= 3)     # it keeps trying, with backoff
        assert not first.done() and not w.source.complete
        api.start()
        return await first

    assert set(run(test, api, tmp_path)) == {key("Service", "web")}


def test_server_away_mid_run_keeps_the_last_state_then_resumes(api, tmp_path, caplog):
    """While away nothing is handed on (no deletes); back with its history, only what
    changed meanwhile arrives, and without a list."""
    api.put(svc("web", "10.96.0.10"), eps("web", "10.244.1.2"))

    async def test(w: Watcher):
        await w.next()
        await watching(api)()
        before = len(api.requests)
        api.stop()
        pending = asyncio.ensure_future(w.next())
        await until(lambda: w.source.api_errors >= 3)
        assert not pending.done()
        api.put(eps("web", "10.244.1.2", "10.244.1.3"))
        api.start()
        return await pending, api.requests_since(before)

    with caplog.at_level(logging.WARNING, logger="agent.sources.kube"):
        batch, requests = run(test, api, tmp_path)
    assert set(batch) == {key("EndpointSlice", "web-slice")}
    assert all(r.watch for r in requests)
    assert "event=kube_api_unreachable" in caplog.text


@pytest.mark.parametrize("problem", ["401", "403"])
def test_auth_failure_is_reported_and_retried(api, tmp_path, caplog, problem):
    api.put(svc("web", "10.96.0.10"))
    api.write_kubeconfig(tmp_path / "kubeconfig")          # with the right token, for now
    if problem == "401":
        api.token = "rotated"                  # the client's token is now wrong
    else:
        api.forbidden = True                   # the token is fine; RBAC is missing

    async def test(w: Watcher):
        first = asyncio.ensure_future(w.next())
        await until(lambda: w.source.api_errors >= 3)
        assert not first.done() and not w.source.complete
        api.token, api.forbidden = "bpfp-test-token", False   # fixed by the operator
        return await first

    with caplog.at_level(logging.ERROR, logger="agent.sources.kube"):
        first = run(test, api, tmp_path, token="bpfp-test-token")
    assert set(first) == {key("Service", "web")}
    assert f"event=kube_api_error resource=Service status={problem}" in caplog.text


# --- bad objects -------------------------------------------------------------------

def test_an_invalid_object_is_skipped_counted_and_logged(api, tmp_path, caplog):
    bad = svc("bad", "10.96.0.66")
    bad["spec"]["ports"][0]["port"] = 70000
    api.put(svc("web", "10.96.0.10"), bad)

    async def test(w: Watcher):
        first = await w.next()
        await watching(api)()
        broken = svc("web", "10.96.0.10")
        broken["spec"]["ports"][0]["protocol"] = "ICMP"
        api.put(broken)                           # a bad update keeps the previous version
        api.put(svc("api", "10.96.0.20"))
        later = await w.next()
        return first, later, w.source.invalid_objects

    with caplog.at_level(logging.WARNING, logger="agent.sources.kube"):
        first, later, invalid = run(test, api, tmp_path)
    assert set(first) == {key("Service", "web")}
    assert set(later) == {key("Service", "api")}
    assert invalid == 2
    assert "event=invalid_object resource=Service object=bad" in caplog.text
    assert "action=kept_previous" in caplog.text


def test_a_refused_watch_object_holds_back_only_itself(api, tmp_path):
    """Issue 14.1: an update the parser refuses keeps that object's last valid version,
    named in held_back with why, and another object's deletion still arrives at once; a
    valid version (or its deletion) ends the hold."""
    api.put(svc("web", "10.96.0.10"), svc("api", "10.96.0.20"))

    async def test(w: Watcher):
        await w.next()
        await watching(api)()
        assert w.source.held_back == ()
        broken = svc("web", "10.96.0.10")
        broken["spec"]["ports"][0]["port"] = 70000
        api.put(broken)
        await until(lambda: w.source.invalid_objects == 1)
        held = w.source.held_back
        api.delete("Service", "api", "lab")
        deleted = await w.next()
        api.put(svc("web", "10.96.0.11"))          # valid again, and changed
        fixed = await w.next()
        return held, deleted, fixed, w.source.held_back

    held, deleted, fixed, after = run(test, api, tmp_path)
    (entry,) = held
    assert entry.objects == (key("Service", "web"),) and not entry.unknown
    assert entry.origin == "Service watch" and "70000" in entry.reason
    assert deleted == {key("Service", "api"): None}
    assert set(fixed) == {key("Service", "web")} and after == ()


def test_each_list_page_is_parsed_as_it_arrives(api, tmp_path):
    """Pages become typed objects one at a time (no raw page is kept for the end of the
    list): the first page's bad objects are counted while the second page is held."""
    bad = []
    for i in range(2):
        obj = svc(f"a-bad{i}", f"10.96.0.{60 + i}")
        obj["spec"]["ports"][0]["port"] = 70000
        bad.append(obj)
    api.put(*bad, svc("web0", "10.96.0.10"), svc("web1", "10.96.0.11"))
    gate = api.gate(SERVICES, when=lambda r: "continue" in r.params and not r.watch)

    async def test(w: Watcher):
        first = asyncio.ensure_future(w.next())
        await in_thread(api.wait_for_request, lambda r: "continue" in r.params)
        await until(lambda: w.source.invalid_objects == 2)      # page one, already parsed
        assert not first.done()
        gate.set()
        return await first

    first = run(test, api, tmp_path)
    assert {k.name for k in first if k.kind == "Service"} == {"web0", "web1"}


def test_a_watch_line_that_is_not_an_object_is_skipped_and_the_stream_kept(
        api, tmp_path, caplog):
    """`[]` and `42` are JSON but no event: logged, counted, skipped; the same stream goes
    on (no list, no new watch), and what follows arrives."""
    api.put(svc("web", "10.96.0.10"))

    async def test(w: Watcher):
        await w.next()
        await watching(api)()
        before = len(api.requests)
        api.send_raw("Service", b"[]", b"42", b'"event"')
        api.put(svc("api", "10.96.0.20"))
        batch = await w.next()
        return batch, w.source, api.requests_since(before)

    with caplog.at_level(logging.WARNING, logger="agent.sources.kube"):
        batch, source, requests = run(test, api, tmp_path)
    assert set(batch) == {key("Service", "api")}
    assert source.malformed_events == 3 and source.relists == 0
    assert requests == []              # neither a list nor a new watch: the stream went on
    assert caplog.text.count("event=kube_watch_event_malformed resource=Service") == 3
    assert "action=skipped" in caplog.text


def test_a_watch_line_past_the_limit_is_not_read_and_the_list_moves_past_it(
        api, tmp_path, caplog):
    """A line longer than max_event_bytes is never held whole: the stream is dropped
    (counted, logged), the list reads the object instead, and the watch goes on after."""
    api.put(svc("web", "10.96.0.10"))
    timing = Timing(backoff_first=0.02, backoff_max=0.2, page_size=2,
                    max_event_bytes=64 * 1024)

    async def test(w: Watcher):
        await w.next()
        await watching(api)()
        big = svc("big", "10.96.0.30")
        big["metadata"]["annotations"] = {"bulk": "x" * 200_000}
        before = len(api.requests)
        api.put(big)
        listed = await w.next()
        lists = [r for r in api.requests_since(before) if not r.watch]
        await watching(api)()
        api.put(svc("api", "10.96.0.20"))
        later = await w.next()
        return listed, lists, later, w.source

    with caplog.at_level(logging.WARNING, logger="agent.sources.kube"):
        listed, lists, later, source = run(test, api, tmp_path, timing=timing)
    assert set(listed) == {key("Service", "big")}
    assert [r.path for r in lists] == [SERVICES]
    assert set(later) == {key("Service", "api")}
    assert source.malformed_events == 1 and source.relists == 1
    assert "event=kube_watch_event_too_long resource=Service" in caplog.text
    assert "action=relist" in caplog.text


def test_lines_are_split_across_chunks_and_bounded():
    class Stream:
        def __init__(self, *chunks: bytes) -> None:
            self.chunks = chunks

        def stream(self, _size):
            return iter(self.chunks)

    lines = list(kube._lines(Stream(b'{"a"', b': 1}\n{"b": 2}\n\n{"c"', b": 3}"), 16))
    assert lines == [b'{"a": 1}', b'{"b": 2}', b'{"c": 3}']
    with pytest.raises(kube.EventTooLong):
        list(kube._lines(Stream(b"x" * 10, b"x" * 10, b"\n"), 16))     # no newline in 16
    with pytest.raises(kube.EventTooLong):
        list(kube._lines(Stream(b"y\n" + b"x" * 17 + b"\n"), 16))      # one chunk, two lines
    with pytest.raises(kube.EventTooLong):
        list(kube._lines(Stream(b"x" * 12, b"x" * 12), 16))              # never ended


def test_closing_the_source_stops_its_threads(api, tmp_path):
    before = set(threading.enumerate())

    async def test(w: Watcher):
        await w.next()
        await watching(api)()
        return [t for t in set(threading.enumerate()) - before if t.name.startswith("kube-")]

    threads = run(test, api, tmp_path)
    assert len(threads) == 3
    assert [t.name for t in threads if t.is_alive()] == []


# --- pieces ------------------------------------------------------------------------

def test_backoff_doubles_with_jitter_up_to_its_cap():
    random.seed(7)
    backoff = kube._Backoff(0.8, 30.0)
    ceilings = [0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]
    delays = [backoff.next() for _ in ceilings]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)          # jittered: not the same twice
    backoff.reset()
    assert backoff.next() <= 0.8


def test_list_items_are_typed_in_place_and_keyed_only_when_refused(api, tmp_path,
                                                                     monkeypatch):
    """Per listed object (issue 16): no copy to add kind/apiVersion and no separate key
    reading; a refused object is still named by its key."""
    keyed = []
    monkeypatch.setattr(kube, "object_key",
                        lambda raw, real=kube.object_key: keyed.append(raw) or real(raw))
    bad = svc("bad", "10.96.0.60")
    bad["spec"]["ports"][0]["port"] = 70000
    api.put(*(svc(f"web{i}", f"10.96.0.{10 + i}") for i in range(5)), bad)
    api.put(node(NODE, ["172.30.0.11"]))
    first = run(lambda w: w.next(), api, tmp_path)
    assert {k.name for k in first if k.kind == "Service"} == {f"web{i}" for i in range(5)}
    assert [raw["metadata"]["name"] for raw in keyed] == ["bad"]

    resource = kube.Resource("Service", "v1", None, kube.parse_service)
    reflector = kube._Reflector(None, resource, None, threading.Event())
    item = {"metadata": {"name": "a"}}
    assert reflector._typed(item) is item and item["kind"] == "Service"


# --- the list and watch requests, without the generated API classes ---------------------

class _Recorded(Exception):
    """Raised by the recording transport: the request is all the test wants."""


def _requests(call, **params) -> tuple:
    """(method, url, headers) that one list/watch call sends."""
    client = kube.k8s.ApiClient(kube.k8s.Configuration(host="http://127.0.0.1:1"))
    seen = []

    def request(method, url, headers=None, body=None, post_params=None,
                _request_timeout=None):
        seen.append((method, url, dict(headers or {}), body, _request_timeout))
        raise _Recorded

    client.rest_client.request = request
    with pytest.raises(_Recorded):
        call(client)(_preload_content=False, _request_timeout=(1.0, 2.0), **params)
    return seen[0]


@pytest.mark.parametrize("params", [
    {"label_selector": kube.NOT_FOR_US, "limit": 500},
    {"label_selector": kube.NOT_FOR_US, "limit": 2, "_continue": "abc=/&x"},
    {"field_selector": "metadata.name=node-a", "watch": True, "resource_version": "17",
     "allow_watch_bookmarks": True, "timeout_seconds": 301},
])
def test_list_and_watch_requests_are_the_generated_clients(params):
    """The source GETs each resource as the client's generated list_* methods would (same
    URL, query, headers and timeout), without importing them (tens of MiB resident)."""
    generated = {
        SERVICES: lambda c: kube.k8s.CoreV1Api(c).list_service_for_all_namespaces,
        SLICES: lambda c: kube.k8s.DiscoveryV1Api(c).list_endpoint_slice_for_all_namespaces,
        NODES: lambda c: kube.k8s.CoreV1Api(c).list_node}
    for path, make in generated.items():
        ours = _requests(lambda c, path=path: kube._ListCall(c, path), **params)
        assert ours == _requests(make, **params)
        assert ours[1].split("?")[0].endswith(path)


def test_the_source_never_loads_the_generated_api_classes():
    """The kube source's requests go through the ApiClient alone: CoreV1Api and
    DiscoveryV1Api (and the models they import) stay out of the agent's memory."""
    import subprocess
    import sys
    code = ("import sys\nfrom agent.sources import kube\n"
            "from kubernetes import client as k8s\n"
            "kube.resources(k8s.ApiClient(k8s.Configuration(host='http://127.0.0.1:1')), 'n')\n"
            "print(sorted(m for m in sys.modules if m.endswith(('core_v1_api', "
            "'discovery_v1_api'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "[]"


def test_a_refused_list_raises_the_clients_api_exception(api, tmp_path):
    """A status other than 2xx is the client's ApiException with that status, as the
    generated methods raise it (the reflector's 410 and 401/403 handling read it)."""
    client = api_client_for(str(api.write_kubeconfig(tmp_path / "kubeconfig")))
    with pytest.raises(kube.ApiException) as raised:
        kube._ListCall(client, "/api/v1/nosuchresource")(_preload_content=False)
    assert raised.value.status == 404
