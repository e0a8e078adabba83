"""A small Kubernetes API server for tests: Services, EndpointSlices and Nodes over the real
list/watch protocol (JSON lists with resourceVersion and continue, chunked watch streams).

It is the only stand-in the tests use (no API server can run here). Besides the protocol it
misbehaves on request: 410 Gone (in the stream, or as an HTTP answer), slow answers, dropped
connections mid-stream or mid-list, 401/403, going away and coming back on the same port.
Test helpers (put, delete, compact, expire_watches, drop_connections, send_raw, ...) change
it while a client watches. Listen sockets come from a factory, so one can live in a lab's network
namespace (listen_in_netns) while the server's threads and the test stay in ours."""
from __future__ import annotations

import base64
import bisect
import copy
import ctypes
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml


@dataclass(frozen=True)
class Kind:
    kind: str
    api_version: str
    namespaced: bool


RESOURCES = {
    "/api/v1/services": Kind("Service", "v1", True),
    "/apis/discovery.k8s.io/v1/endpointslices": Kind("EndpointSlice", "discovery.k8s.io/v1", True),
    "/api/v1/nodes": Kind("Node", "v1", False),
}
KINDS = {kind.kind: kind for kind in RESOURCES.values()}


@dataclass(frozen=True)
class Event:
    rv: int
    kind: str
    old: dict | None     # the object before the change (None: created)
    new: dict | None     # after (None: deleted)


@dataclass
class Request:
    path: str
    params: dict[str, str]

    @property
    def watch(self) -> bool:
        return self.params.get("watch") in ("true", "1")


@dataclass(eq=False)
class _Watch:
    kind: str
    command: str = ""            # "", "expire" (ERROR 410 then end) or "drop" (cut the stream)
    bookmarks_sent: int = 0
    raw: list[bytes] = field(default_factory=list)     # lines to write as they are (send_raw)


@dataclass
class _Snapshot:
    """The items of a paginated list as of its first page: continued pages are consistent."""
    rv: int
    items: list[dict]
    created: float = field(default_factory=time.monotonic)


class Gone(Exception):
    pass


def status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selectors: `k`, `!k`, `k=v`, `k==v`, `k!=v`, comma-joined."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if term.startswith("!"):
            if term[1:] in labels:
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term not in labels:
            return False
    return True


def field_matches(selector: str, obj: dict) -> bool:
    metadata = obj.get("metadata", {})
    fields = {"metadata.name": metadata.get("name", ""),
              "metadata.namespace": metadata.get("namespace", "")}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        negate = "!=" in term
        key, value = term.replace("!=", "=").replace("==", "=").split("=", 1)
        if key not in fields:
            raise ValueError(f"field label not supported: {key}")
        if (fields[key] == value) == negate:
            return False
    return True


class FakeKubeApi:
    """with FakeKubeApi() as api: api.put(service); ... api.url, api.token"""

    def __init__(self, listen: Callable[[], socket.socket] | None = None,
                 token: str = "bpfp-test-token") -> None:
        self._listen = listen or (lambda: listen_tcp("127.0.0.1", 0))
        self.token = token
        self.forbidden = False               # a valid token without RBAC: 403
        self.too_old_as_http = False         # answer a too old watch with HTTP 410, not an event
        self.delay: dict[str, float] = {}    # resource path or "*" -> seconds before answering
        self.drop_lists = 0                  # the next N lists are cut off mid-body
        # requests held until a test opens their gate (see gate())
        self._gates: list[tuple[Callable[[Request], bool], threading.Event]] = []
        self.sent: list[tuple[str, str, str]] = []   # (kind, event type, resourceVersion)
        self.requests: list[Request] = []
        self._lock = threading.Condition()
        self._objects: dict[tuple[str, str, str], dict] = {}
        self._history: list[Event] = []
        self._rv = 100
        self._compacted = 0                  # a watch from an older version gets 410 Gone
        self._bookmarks = 0
        self._watches: set[_Watch] = set()
        self._connections: set[socket.socket] = set()
        self._snapshots: dict[str, _Snapshot] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

    # -- life cycle ------------------------------------------------------------------

    def __enter__(self) -> FakeKubeApi:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> None:
        """Listen (again: on the same address after stop(), as an API server coming back)."""
        sock = self._listen() if self.address is None else self._listen_again()
        server = ThreadingHTTPServer(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        server.daemon_threads = True
        server.api = self
        self._server = server
        self.address = sock.getsockname()[:2]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-kube-api", daemon=True)
        self._thread.start()

    def _listen_again(self) -> socket.socket:
        host, port = self.address
        factory = getattr(self._listen, "again", None)
        return factory(port) if factory else listen_tcp(host, port)

    def stop(self) -> None:
        """Go away: stop listening and cut every connection (open watches included)."""
        if self._server is None:
            return
        for _, gate in self._gates:
            gate.set()
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        self.drop_connections()

    def drop_connections(self) -> None:
        """Cut every connection mid-stream: no final chunk, as a crashed server or a
        broken network would."""
        with self._lock:
            for watch in self._watches:
                watch.command = "drop"
            connections = list(self._connections)
            self._lock.notify_all()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- the store -------------------------------------------------------------------

    def put(self, *objects: dict) -> int:
        """Create or replace objects (a watch sees ADDED or MODIFIED); returns the new
        resourceVersion."""
        with self._lock:
            for obj in objects:
                obj = copy.deepcopy(obj)
                kind = KINDS[obj["kind"]]
                metadata = obj.setdefault("metadata", {})
                if kind.namespaced:
                    metadata.setdefault("namespace", "default")
                key = (kind.kind, metadata.get("namespace", ""), metadata["name"])
                old = self._objects.get(key)
                self._rv += 1
                metadata["resourceVersion"] = str(self._rv)
                metadata["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
                metadata.setdefault("creationTimestamp", "2026-11-29T00:00:00Z")
                self._objects[key] = obj
                self._history.append(Event(self._rv, kind.kind, old, obj))
            self._lock.notify_all()
            return self._rv

    def delete(self, kind: str, name: str, namespace: str = "default") -> int:
        with self._lock:
            key = (kind, namespace if KINDS[kind].namespaced else "", name)
            old = self._objects.pop(key)
            self._rv += 1
            self._history.append(Event(self._rv, kind, old, None))
            self._lock.notify_all()
            return self._rv

    def get(self, kind: str, name: str, namespace: str = "default") -> dict | None:
        with self._lock:
            key = (kind, namespace if KINDS[kind].namespaced else "", name)
            found = self._objects.get(key)
            return copy.deepcopy(found) if found else None

    @property
    def resource_version(self) -> int:
        return self._rv

    def compact(self) -> None:
        """Forget the history (etcd compaction): a watch or continued list from an older
        resourceVersion now gets 410 Gone, and the client must list again."""
        with self._lock:
            self._compacted = self._rv
            self._history.clear()
            self._snapshots.clear()

    def expire_watches(self) -> None:
        """Compact, and end every open watch with an ERROR event carrying 410 Gone."""
        self.compact()
        with self._lock:
            for watch in self._watches:
                watch.command = watch.command or "expire"
            self._lock.notify_all()

    def bookmark(self) -> None:
        """Send a BOOKMARK (the current resourceVersion) on every watch that allows them."""
        with self._lock:
            self._bookmarks += 1
            self._lock.notify_all()

    def send_raw(self, kind: str, *lines: bytes) -> None:
        """Write these lines as they are, each as one line of every open watch of `kind`:
        what a broken server or a proxy in between might put in a stream."""
        with self._lock:
            for watch in self._watches:
                if watch.kind == kind:
                    watch.raw.extend(lines)
            self._lock.notify_all()

    def open_watches(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(1 for w in self._watches if kind in (None, w.kind))

    def wait_for_watches(self, count: int, timeout: float = 20.0) -> None:
        """Until `count` watches are open (the client has listed and is watching)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._watches) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self._watches)} watches open, not {count}; "
                                         f"requests: {self.requests[-10:]}")
                self._lock.wait(left)

    def gate(self, path: str, when: Callable[[Request], bool] = lambda r: True
             ) -> threading.Event:
        """Hold requests for `path` (that `when` accepts) until the returned Event is set:
        a test sees what happens while an answer is outstanding, then lets it go."""
        gate = threading.Event()
        self._gates.append((lambda r: r.path == path and when(r), gate))
        return gate

    def wait_for_sent(self, kind: str, event_type: str, timeout: float = 20.0) -> None:
        """Until the server has written such a watch event to some client."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not any(k == kind and t == event_type for k, t, _ in self.sent):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {event_type} for {kind} sent: {self.sent[-10:]}")
                self._lock.wait(left)

    def wait_for_request(self, predicate: Callable[[Request], bool], since: int = 0,
                         timeout: float = 20.0) -> Request:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [r for r in self.requests[since:] if predicate(r)]
                if found:
                    return found[-1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no such request; last: {self.requests[-10:]}")
                self._lock.wait(left)

    def fail_watches(self, code: int = 500, reason: str = "InternalError") -> None:
        """End every open watch with an ERROR event other than 410 (the client should
        resume from where it was, not list again)."""
        with self._lock:
            for watch in self._watches:
                watch.command = watch.command or f"error:{code}:{reason}"
            self._lock.notify_all()

    def requests_since(self, index: int) -> list[Request]:
        with self._lock:
            return list(self.requests[index:])

    def write_kubeconfig(self, path: Path, token: str | None = None) -> Path:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "bpfp",
            "clusters": [{"name": "bpfp", "cluster": {"server": self.url}}],
            "users": [{"name": "bpfp", "user": {"token": token or self.token}}],
            "contexts": [{"name": "bpfp", "context": {"cluster": "bpfp", "user": "bpfp"}}],
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # -- protocol (called from handler threads) --------------------------------------

    def _matching(self, obj: dict | None, params: dict[str, str]) -> bool:
        if obj is None:
            return False
        labels = obj.get("metadata", {}).get("labels") or {}
        return (selector_matches(params.get("labelSelector", ""), labels)
                and field_matches(params.get("fieldSelector", ""), obj))

    def _list(self, kind: Kind, params: dict[str, str]) -> dict:
        with self._lock:
            token = params.get("continue", "")
            if token:
                snapshot = self._snapshots.get(json.loads(base64.b64decode(token))["id"])
                if snapshot is None:
                    raise Gone("The provided continue parameter is too old to display a "
                               "consistent list result. You can start a new list without the "
                               "continue parameter.")
                start = json.loads(base64.b64decode(token))["start"]
            else:
                items = [copy.deepcopy(obj) for key, obj in sorted(self._objects.items())
                         if key[0] == kind.kind and self._matching(obj, params)]
                snapshot = _Snapshot(self._rv, items)
                start = 0
            limit = int(params.get("limit") or 0) or len(snapshot.items) or 1
            page = snapshot.items[start:start + limit]
            metadata: dict = {"resourceVersion": str(snapshot.rv)}
            if start + limit < len(snapshot.items):
                snapshot_id = token and json.loads(base64.b64decode(token))["id"] \
                    or uuid.uuid4().hex
                self._snapshots[snapshot_id] = snapshot
                metadata["continue"] = base64.b64encode(json.dumps(
                    {"id": snapshot_id, "start": start + limit}).encode()).decode()
                metadata["remainingItemCount"] = len(snapshot.items) - start - limit
        for item in page:      # list items carry no kind/apiVersion: the list has them
            item.pop("kind", None)
            item.pop("apiVersion", None)
        return {"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                "metadata": metadata, "items": page}

    def _watch_events(self, kind: Kind, params: dict[str, str], watch: _Watch,
                      write: Callable[[dict], None], deadline: float) -> None:
        """Stream events after the requested resourceVersion until told otherwise."""
        requested = params.get("resourceVersion", "")
        bookmarks = params.get("allowWatchBookmarks") in ("true", "1")
        with self._lock:
            if requested in ("", "0"):
                # "any version": synthetic ADDED events for what exists, then changes
                cursor = self._rv
                initial = [obj for key, obj in sorted(self._objects.items())
                           if key[0] == kind.kind and self._matching(obj, params)]
            else:
                cursor, initial = int(requested), []
            watch.bookmarks_sent = self._bookmarks
        for obj in initial:
            write({"type": "ADDED", "object": copy.deepcopy(obj)})
        while True:
            with self._lock:
                while True:
                    events = self._history[bisect.bisect_right(
                        self._history, cursor, key=lambda e: e.rv):]
                    events = [e for e in events if e.kind == kind.kind]
                    wants_bookmark = bookmarks and watch.bookmarks_sent < self._bookmarks
                    left = deadline - time.monotonic()
                    if events or wants_bookmark or watch.command or watch.raw or left <= 0:
                        break
                    self._lock.wait(min(left, 1.0))
                watch.bookmarks_sent = self._bookmarks
                rv = self._rv
                raw, watch.raw = watch.raw, []
            for line in raw:
                write(line)
            for event in events:
                old, new = (self._matching(event.old, params), self._matching(event.new, params))
                # a change that moves an object out of (into) the selection is a delete (add)
                kind_of = {(False, True): "ADDED", (True, True): "MODIFIED",
                           (True, False): "DELETED"}.get((old, new))
                if kind_of:
                    obj = event.new if new else dict(event.old, metadata={
                        **event.old["metadata"], "resourceVersion": str(event.rv)})
                    write({"type": kind_of, "object": copy.deepcopy(obj)})
                cursor = event.rv
            if wants_bookmark:
                write({"type": "BOOKMARK", "object": {
                    "kind": kind.kind, "apiVersion": kind.api_version,
                    "metadata": {"resourceVersion": str(rv)}}})
            if watch.command == "drop":
                raise ConnectionAbortedError("dropped by the test")
            if watch.command.startswith("error:"):
                _, code, reason = watch.command.split(":", 2)
                write({"type": "ERROR", "object": status(int(code), reason, "injected")})
                return
            if watch.command == "expire":
                write({"type": "ERROR", "object": status(
                    410, "Expired", f"too old resource version: {cursor} ({self._compacted})")})
                return
            if deadline - time.monotonic() <= 0 and not events:
                return


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "bpfp-fake-kube-api"

    def log_message(self, *args) -> None:    # quiet: tests read api.requests instead
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.api._lock:
            self.server.api._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.api._lock:
            self.server.api._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        api: FakeKubeApi = self.server.api
        url = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with api._lock:
            api.requests.append(Request(url.path, params))
            api._lock.notify_all()
        delay = api.delay.get(url.path, api.delay.get("*", 0.0))
        if delay:
            time.sleep(delay)
        for when, gate in list(api._gates):
            if when(Request(url.path, params)):
                gate.wait()
        if self.headers.get("Authorization") != f"Bearer {api.token}":
            return self._json(401, status(401, "Unauthorized", "Unauthorized"))
        kind = RESOURCES.get(url.path)
        if kind is None:
            return self._json(404, status(404, "NotFound", f"the server could not find "
                                                         f"the requested resource {url.path}"))
        if api.forbidden:
            resource = url.path.rsplit("/", 1)[-1]
            return self._json(403, status(403, "Forbidden", f'{resource} is forbidden: User '
                                          f'"system:serviceaccount:kube-system:bpfproxy" '
                                          f'cannot list resource "{resource}"'))
        try:
            if params.get("watch") in ("true", "1"):
                return self._watch(api, kind, params)
            body = api._list(kind, params)
        except Gone as gone:
            return self._json(410, status(410, "Expired", str(gone)))
        except ValueError as bad:
            return self._json(400, status(400, "BadRequest", str(bad)))
        if api.drop_lists > 0:
            api.drop_lists -= 1
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self._json(200, body)

    def _watch(self, api: FakeKubeApi, kind: Kind, params: dict[str, str]) -> None:
        requested = params.get("resourceVersion", "")
        if requested not in ("", "0") and int(requested) < api._compacted:
            too_old = status(410, "Expired", f"too old resource version: {requested} "
                                             f"({api._compacted})")
            if api.too_old_as_http:
                return self._json(410, too_old)
            self._start_stream()
            self._chunk({"type": "ERROR", "object": too_old})
            return self._end_stream()
        timeout = float(params.get("timeoutSeconds") or 1800)
        watch = _Watch(kind.kind)
        with api._lock:
            api._watches.add(watch)
            api._lock.notify_all()
        try:
            self._start_stream()
            api._watch_events(kind, params, watch, self._chunk, time.monotonic() + timeout)
            self._end_stream()
        except (ConnectionAbortedError, OSError):
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        finally:
            with api._lock:
                api._watches.discard(watch)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, event: dict | bytes) -> None:
        """One watch event as one line (bytes: a raw line from send_raw, as it is)."""
        data = (event if isinstance(event, bytes) else json.dumps(event).encode()) + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()
        if isinstance(event, bytes):
            return
        api = self.server.api
        obj = event.get("object") or {}
        with api._lock:
            api.sent.append((obj.get("kind", ""), event["type"],
                             (obj.get("metadata") or {}).get("resourceVersion", "")))
            api._lock.notify_all()

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# -- listen sockets -------------------------------------------------------------------

def listen_tcp(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    return sock


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def listen_in_netns(netns_path: Path, host: str = "127.0.0.1") -> Callable[[], socket.socket]:
    """A listen-socket factory for a socket that lives in another network namespace.

    A throwaway thread enters the namespace (setns affects only the calling thread), makes
    the socket and ends: the socket keeps its namespace, so the server's threads, which
    never leave ours, accept connections made inside the lab's node."""
    def make(port: int = 0) -> socket.socket:
        made: list = []

        def inside() -> None:
            try:
                fd = os.open(netns_path, os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns {netns_path}")
                finally:
                    os.close(fd)
                made.append(listen_tcp(host, port))
            except BaseException as error:  # noqa: BLE001 -- re-raised in the caller
                made.append(error)

        thread = threading.Thread(target=inside, name="bpfp-netns-listen")
        thread.start()
        thread.join()
        if isinstance(made[0], BaseException):
            raise made[0]
        return made[0]

    factory = make
    factory.again = make          # FakeKubeApi.start() after stop(): same namespace, port
    return factory


# -- objects ------------------------------------------------------------------------

def node(name: str, addresses: list[str] = (), zone: str = "") -> dict:
    labels = {"kubernetes.io/hostname": name}
    if zone:
        labels["topology.kubernetes.io/zone"] = zone
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
            "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]}}
