"""The Kubernetes API source: Services, EndpointSlices and this node's Node, list+watch.

The first batch is the complete listing of all three; later batches only changes. One
thread per resource runs the blocking official client (the asyncio loop never waits on the
network) as client-go's reflector does: list in pages, watch from the list's
resourceVersion with bookmarks, resume the watch from the last version seen when a stream
ends or breaks (no relist, so no full-world event), list again only on 410 Gone and then
hand on only the difference, back off exponentially with jitter while the API is away. What
was handed on stays: the agent keeps serving the last good state until the API returns."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from agent.model.objects import object_key, parse_endpoint_slice, parse_node, parse_service
from agent.model.types import (
    HEADLESS_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    EndpointSlice,
    InvalidObject,
    Node,
    ObjectKey,
    Service,
)
from agent.sources.events import HeldBack, ObjectChange

log = logging.getLogger(__name__)

Object = Service | EndpointSlice | Node

# kube-proxy's informers (cmd/kube-proxy/app/server.go) ask the server for Services and
# EndpointSlices without these labels: objects for another proxy and headless services'
# slices never reach the node at all.
NOT_FOR_US = f"!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"
PAGE_SIZE = 500                    # client-go's pager default
BACKOFF_FIRST = 0.8                # client-go's reflector: 800 ms doubling up to 30 s
BACKOFF_MAX = 30.0
WATCH_SECONDS = (300, 600)         # server-side watch timeout, random in this range
CONNECT_SECONDS = 10.0
LIST_READ_SECONDS = 60.0
# A watch stream that stays silent this much longer than its own timeout is dead (a
# half-open connection): give up on it and resume from the last version seen.
WATCH_READ_SLACK = 30.0
SHORT_WATCH_SECONDS = 1.0          # an empty watch that ends sooner counts as a failure
# One watch event is one JSON line holding one object; etcd stores objects up to 1.5 MiB
# (--max-request-bytes), and their JSON is at most a few times that. A longer line is
# not read into memory: the watch is listed again (the list has no line to outgrow).
MAX_EVENT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Resource:
    kind: str
    api_version: str
    list_call: Callable[..., Any]      # the client's list_*_for_all_namespaces / list_node
    parse: Callable[[dict], Object]
    label_selector: str = ""
    field_selector: str = ""


def resources(api_client: k8s.ApiClient, node_name: str) -> tuple[Resource, ...]:
    if hasattr(api_client, "param_serialize"):
        services, slices, nodes = (_ListCall(api_client, path) for path in (
            "/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices", "/api/v1/nodes"))
    else:                             # a client before 37: its generated list calls
        core, discovery = k8s.CoreV1Api(api_client), k8s.DiscoveryV1Api(api_client)
        services, slices, nodes = (core.list_service_for_all_namespaces,
                                   discovery.list_endpoint_slice_for_all_namespaces,
                                   core.list_node)
    return (
        Resource("Service", "v1", services, parse_service, label_selector=NOT_FOR_US),
        Resource("EndpointSlice", "discovery.k8s.io/v1", slices, parse_endpoint_slice,
                 label_selector=NOT_FOR_US),
        # only this node's Node: its zone and addresses; a fleet of heartbeats is not ours
        Resource("Node", "v1", nodes, parse_node, field_selector=f"metadata.name={node_name}"),
    )


class _ListCall:
    """A list or watch GET of one resource path, answered as the client's generated
    list_* method answers it with _preload_content=False (the raw urllib3 response;
    ApiException for a status other than 2xx), through the same ApiClient (its
    configuration, authentication and connection pool). The generated API classes are
    not imported: CoreV1Api and DiscoveryV1Api, with the models and validators they load,
    add ~22 MiB to the agent's resident memory, for three GETs."""

    # the generated methods' query parameter names, in their order
    _QUERY = (("allow_watch_bookmarks", "allowWatchBookmarks"), ("_continue", "continue"),
              ("field_selector", "fieldSelector"), ("label_selector", "labelSelector"),
              ("limit", "limit"), ("resource_version", "resourceVersion"),
              ("timeout_seconds", "timeoutSeconds"), ("watch", "watch"))

    def __init__(self, api_client: k8s.ApiClient, path: str) -> None:
        self.api_client, self.path = api_client, path

    def __call__(self, *, _preload_content: bool = False, _request_timeout: Any = None,
                 **params: Any) -> urllib3.BaseHTTPResponse:
        if _preload_content:
            raise ValueError("only raw responses (_preload_content=False) are read here")
        unknown = params.keys() - {name for name, _ in self._QUERY}
        if unknown:
            raise TypeError(f"unexpected parameters {sorted(unknown)}")
        query = [(wire, params[name]) for name, wire in self._QUERY
                 if params.get(name) is not None]
        request = self.api_client.param_serialize(
            method="GET", resource_path=self.path, query_params=query,
            header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
        response = self.api_client.call_api(*request, _request_timeout=_request_timeout)
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response.response


class Gone(Exception):
    """410 Gone: the version we would resume from is compacted away; list again."""


class WatchError(Exception):
    """An ERROR event other than 410 in a watch stream."""


class EventTooLong(Exception):
    """A watch line past Timing.max_event_bytes: the stream is dropped, the list read."""


@dataclass(frozen=True, slots=True)
class Timing:
    backoff_first: float = BACKOFF_FIRST
    backoff_max: float = BACKOFF_MAX
    watch_seconds: tuple[int, int] = WATCH_SECONDS
    page_size: int = PAGE_SIZE
    max_event_bytes: int = MAX_EVENT_BYTES


class KubeSource:
    """Counters: invalid_objects, relists, watch_restarts, api_errors, malformed_events
    (watch lines that are not an event object, or too long to read). held_back: objects
    whose new version the parser refused, kept at their last valid one; only they wait."""

    def __init__(self, api_client: k8s.ApiClient, node_name: str,
                 timing: Timing = Timing()) -> None:
        self.api_client = api_client
        self.node_name = node_name
        self.timing = timing
        self.invalid_objects = 0
        self.relists = 0
        self.watch_restarts = 0
        self.api_errors = 0
        self.malformed_events = 0
        self._complete = False
        self._reflectors: list[_Reflector] = []

    @property
    def host(self) -> str:
        return self.api_client.configuration.host

    @property
    def complete(self) -> bool:
        """True once every initial list arrived. A relist never makes it False: nothing is
        handed on until the relist is whole, and then only its difference."""
        return self._complete

    @property
    def held_back(self) -> tuple[HeldBack, ...]:
        """Objects kept at their last valid version, one entry each; never `unknown`: a
        list is whole, and what the parser refuses outright is not served (kube-proxy
        skips an object it cannot use, and holds nothing else back for it)."""
        return tuple(HeldBack(f"{r.resource.kind} watch", why, (key,))
                     for r in self._reflectors
                     for key, why in sorted(r.held.items(), key=lambda item: str(item[0])))

    async def changes(self) -> AsyncIterator[list[ObjectChange]]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple[str, list[ObjectChange]]] = asyncio.Queue()

        stop = threading.Event()

        def post(kind: str, changes: list[ObjectChange]) -> None:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, (kind, changes))
            except RuntimeError:      # the loop is closed: nobody listens any more
                stop.set()

        reflectors = [_Reflector(self, resource, post, stop)
                      for resource in resources(self.api_client, self.node_name)]
        self._reflectors = reflectors
        threads = [threading.Thread(target=r.run, name=f"kube-{r.resource.kind}", daemon=True)
                   for r in reflectors]
        for thread in threads:
            thread.start()
        try:
            # Never hand on a half-listed world: wait for every resource's first list.
            pending: dict[ObjectKey, ObjectChange] = {}
            listed: set[str] = set()
            while len(listed) < len(reflectors):
                kind, changes = await inbox.get()
                listed.add(kind)
                pending.update((c.key, c) for c in changes)
            self._complete = True
            log.info("event=kube_listed host=%s objects=%d", self.host,
                     sum(c.obj is not None for c in pending.values()))
            yield [c for c in pending.values() if c.obj is not None]
            while True:
                pending = {}
                _, changes = await inbox.get()
                pending.update((c.key, c) for c in changes)
                while not inbox.empty():       # coalesce what queued meanwhile
                    _, changes = inbox.get_nowait()
                    pending.update((c.key, c) for c in changes)
                if pending:
                    yield list(pending.values())
        finally:
            stop.set()
            for reflector in reflectors:
                reflector.interrupt()
            await asyncio.to_thread(_join, threads, 2.0)


def _join(threads: list[threading.Thread], timeout: float) -> None:
    for thread in threads:
        thread.join(timeout)


class _Reflector:
    """One resource's list+watch loop, in its own thread. Keeps what it handed on (by key)
    and the resourceVersion to resume from; posts lists of changes, the first one being
    the complete listing (possibly empty)."""

    def __init__(self, source: KubeSource, resource: Resource,
                 post: Callable[[str, list[ObjectChange]], None], stop: threading.Event) -> None:
        self.source = source
        self.resource = resource
        self.post = post
        self.stop = stop
        self.given: dict[ObjectKey, Object] = {}
        # objects whose latest version was refused: key -> why. Replaced, never changed
        # in place: the loop's thread reads it (KubeSource.held_back)
        self.held: dict[ObjectKey, str] = {}
        self.resource_version = ""
        self.listed = False
        self._response: urllib3.BaseHTTPResponse | None = None
        self._lock = threading.Lock()

    def run(self) -> None:
        backoff = _Backoff(self.source.timing.backoff_first, self.source.timing.backoff_max)
        must_list = True
        while not self.stop.is_set():
            try:
                if must_list:
                    self._list()
                    must_list = False
                    backoff.reset()
                if self._watch():
                    backoff.reset()      # it carried events or ended on time: resume at once
                    continue
                delay = backoff.next()   # broke with nothing delivered
            except EventTooLong as error:
                self.source.malformed_events += 1
                self.source.relists += 1
                log.warning("event=kube_watch_event_too_long resource=%s error=%r "
                            "resume_from=%s action=relist", self.resource.kind, str(error),
                            self.resource_version)
                must_list = True      # the list moves past it; resuming would meet it again
                continue
            except Gone:
                # client-go relists at once: the version is gone, the server is fine
                self.source.relists += 1
                log.info("event=kube_relist resource=%s reason=gone resource_version=%s",
                         self.resource.kind, self.resource_version)
                must_list = True
                continue
            except ApiException as error:
                self.source.api_errors += 1
                delay = backoff.next()
                level = logging.ERROR if error.status in (401, 403) else logging.WARNING
                log.log(level, "event=kube_api_error resource=%s status=%s reason=%r "
                        "retry_in=%.1fs", self.resource.kind, error.status,
                        _one_line(error.reason or ""), delay)
            except (urllib3.exceptions.HTTPError, OSError, ValueError, WatchError) as error:
                # unreachable, refused, cut off mid-stream, a truncated or garbled body
                self.source.api_errors += 1
                delay = backoff.next()
                log.warning("event=kube_api_unreachable resource=%s error=%r retry_in=%.1fs",
                            self.resource.kind, _one_line(str(error)), delay)
            except Exception:  # noqa: BLE001 -- our bug: never let the thread die; start over
                self.source.api_errors += 1
                delay = backoff.next()
                must_list = True
                log.exception("event=kube_reflector_failed resource=%s retry_in=%.1fs",
                              self.resource.kind, delay)
            self.stop.wait(delay)

    def interrupt(self) -> None:
        """Unblock a read in progress (the loop is stopping)."""
        with self._lock:
            response = self._response
        if response is not None:
            with contextlib.suppress(Exception):
                response.shutdown()

    # -- list ------------------------------------------------------------------------

    def _list(self) -> None:
        """A consistent list in pages, each made typed objects as it arrives (the raw
        page is dropped before the next is asked for); hands on its difference to what
        was given."""
        fresh: dict[ObjectKey, Object] = {}
        token = ""
        while True:
            try:
                page = self._get(limit=self.source.timing.page_size, _continue=token or None)
            except ApiException as error:
                if error.status == 410 and token:
                    # the continue token expired between pages: the snapshot is gone
                    log.info("event=kube_list_restart resource=%s reason=continue_expired",
                             self.resource.kind)
                    fresh, token = {}, ""
                    continue
                raise
            for raw in page.get("items") or []:
                key, obj = self._parse(raw)
                if obj is not None:
                    fresh[key] = obj
            metadata = page.get("metadata") or {}
            del page
            token = metadata.get("continue") or ""
            if not token:
                break
        changes = [ObjectChange(key, None) for key in self.given.keys() - fresh.keys()]
        changes += [ObjectChange(key, obj) for key, obj in fresh.items()
                    if self.given.get(key) != obj]
        self.given = fresh
        self.held = {key: why for key, why in self.held.items() if key in fresh}
        self.resource_version = str(metadata.get("resourceVersion") or "")
        first = not self.listed
        self.listed = True
        log.log(logging.DEBUG if first else logging.INFO,
                "event=kube_list resource=%s objects=%d changes=%d resource_version=%s",
                self.resource.kind, len(fresh), len(changes), self.resource_version)
        if changes or first:
            self.post(self.resource.kind, changes)

    def _get(self, **params) -> dict:
        response = self.resource.list_call(
            label_selector=self.resource.label_selector or None,
            field_selector=self.resource.field_selector or None,
            _preload_content=False, _request_timeout=(CONNECT_SECONDS, LIST_READ_SECONDS),
            **{k: v for k, v in params.items() if v is not None})
        try:
            return json.loads(response.data)
        finally:
            _discard(response)

    # -- watch -----------------------------------------------------------------------

    def _watch(self) -> bool:
        """One watch request from self.resource_version. True when it carried at least one
        event or ended as the server meant to (its timeout): resume without waiting."""
        seconds = random.randint(*self.source.timing.watch_seconds)
        try:
            response = self.resource.list_call(
                label_selector=self.resource.label_selector or None,
                field_selector=self.resource.field_selector or None,
                watch=True, resource_version=self.resource_version, allow_watch_bookmarks=True,
                timeout_seconds=seconds, _preload_content=False,
                _request_timeout=(CONNECT_SECONDS, seconds + WATCH_READ_SLACK))
        except ApiException as error:
            if error.status == 410:          # some servers answer a too old version so
                raise Gone(_one_line(error.reason or "")) from error
            raise
        with self._lock:
            self._response = response
        started, delivered = time.monotonic(), False
        try:
            if self.stop.is_set():
                return True
            for line in _lines(response, self.source.timing.max_event_bytes):
                event = json.loads(line)
                if not isinstance(event, dict):
                    # not an event at all: skip it, keep the stream (no relist for a line)
                    self.source.malformed_events += 1
                    log.warning("event=kube_watch_event_malformed resource=%s line=%r "
                                "action=skipped resume_from=%s", self.resource.kind,
                                _one_line(line[:200].decode(errors="replace")),
                                self.resource_version)
                    continue
                self._event(event)
                delivered = True
            if delivered or time.monotonic() - started >= SHORT_WATCH_SECONDS:
                return True
            # client-go's "very short watch": a stream that ends at once, empty, again and
            # again would otherwise be a busy loop against a struggling server
            log.info("event=kube_watch_short resource=%s resume_from=%s",
                     self.resource.kind, self.resource_version)
            return False
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as error:
            if self.stop.is_set():
                return True
            self.source.watch_restarts += 1
            log.info("event=kube_watch_broken resource=%s error=%r resume_from=%s",
                     self.resource.kind, _one_line(str(error)), self.resource_version)
            return delivered
        finally:
            with self._lock:
                self._response = None
            _discard(response)

    def _event(self, event: dict) -> None:
        kind, raw = event.get("type"), event.get("object")
        if not isinstance(raw, dict):
            raise ValueError(f"watch event without an object: {str(event)[:200]}")
        if kind == "ERROR":
            if raw.get("code") == 410:
                raise Gone(raw.get("message", ""))
            raise WatchError(f"{raw.get('code')} {raw.get('reason')}: {raw.get('message')}")
        version = (raw.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            key, obj = self._parse(raw)
            if key is not None and obj is not None and self.given.get(key) != obj:
                self.given[key] = obj
                self.post(self.resource.kind, [ObjectChange(key, obj)])
        elif kind == "DELETED":
            key = object_key(self._typed(raw))
            self._hold(key, "")
            if key is not None and self.given.pop(key, None) is not None:
                self.post(self.resource.kind, [ObjectChange(key, None)])
        elif kind != "BOOKMARK":
            raise ValueError(f"watch event of unknown type {kind!r}")
        if version:
            self.resource_version = str(version)

    # -- border ----------------------------------------------------------------------

    def _typed(self, raw: dict) -> dict:
        """List items come without kind and apiVersion (the list has them). Set in place:
        raw is this source's own decoded JSON, read by nobody else (no copy per item)."""
        if "kind" not in raw or "apiVersion" not in raw:
            raw["kind"], raw["apiVersion"] = self.resource.kind, self.resource.api_version
        return raw

    def _parse(self, raw: Any) -> tuple[ObjectKey | None, Object | None]:
        """(key, object); an invalid object is logged and counted, and its last valid
        version (if any) stays: a bad edit must not delete a working service."""
        raw = self._typed(raw) if isinstance(raw, dict) else raw
        try:
            obj = self.resource.parse(raw)
        except Exception as error:  # noqa: BLE001 -- InvalidObject, or our bug: same handling
            key = object_key(raw)   # as far as it can be read: only a refused object needs it
            self.source.invalid_objects += 1
            previous = self.given.get(key) if key else None
            self._hold(key, f"invalid, previous version kept: {_one_line(str(error))}"
                       if previous is not None else "")
            log.log(logging.WARNING if isinstance(error, InvalidObject) else logging.ERROR,
                    "event=invalid_object resource=%s object=%s error=%r action=%s",
                    self.resource.kind, key.name if key else "?", _one_line(str(error)),
                    "kept_previous" if previous else "skipped",
                    exc_info=not isinstance(error, InvalidObject))
            return key, previous
        if self.held:
            self._hold(obj.key, "")
        return obj.key, obj

    def _hold(self, key: ObjectKey | None, why: str) -> None:
        """Record (why) or clear ("") that key is kept at its previous version."""
        if key is not None and (why or key in self.held):
            held = {k: v for k, v in self.held.items() if k != key}
            if why:
                held[key] = why
            self.held = held


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Close the connection too: one left mid-stream must never be reused."""
    with contextlib.suppress(Exception):
        response.close()
    with contextlib.suppress(Exception):
        response.release_conn()


def _lines(response: urllib3.BaseHTTPResponse, limit: int) -> Iterator[bytes]:
    """The JSON lines of a watch stream, as they arrive; EventTooLong past `limit` bytes
    (never more than that, plus one chunk, is held)."""
    buffer = bytearray()
    for chunk in response.stream(64 * 1024):
        start = len(buffer)
        buffer += chunk
        end = buffer.find(b"\n", start)
        begin = 0
        while end != -1:                       # only the new bytes are searched
            line = bytes(buffer[begin:end])
            if len(line) > limit:
                raise EventTooLong(f"a watch line of {len(line)} bytes (limit {limit})")
            if line.strip():
                yield line
            begin = end + 1
            end = buffer.find(b"\n", begin)
        del buffer[:begin]
        if len(buffer) > limit:
            raise EventTooLong(f"a watch line over {limit} bytes")
    if buffer.strip():
        if len(buffer) > limit:
            raise EventTooLong(f"a watch line of {len(buffer)} bytes (limit {limit})")
        yield bytes(buffer)


class _Backoff:
    """Capped exponential backoff with jitter (each delay drawn from [d/2, d])."""

    def __init__(self, first: float, cap: float) -> None:
        self.first, self.cap = first, cap
        self.current = first

    def reset(self) -> None:
        self.current = self.first

    def next(self) -> float:
        delay = self.current * random.uniform(0.5, 1.0)
        self.current = min(self.current * 2, self.cap)
        return delay


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


def api_client_for(kubeconfig: str | None) -> k8s.ApiClient:
    """From a kubeconfig file, or in-cluster (service account token, KUBERNETES_SERVICE_*)
    when none is given. Raises kubernetes.config.ConfigException with the reason."""
    from kubernetes import config as k8s_config

    configuration = k8s.Configuration()
    if kubeconfig:
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration,
                                    persist_config=False)
    else:
        k8s_config.load_incluster_config(client_configuration=configuration)
    return k8s.ApiClient(configuration)
