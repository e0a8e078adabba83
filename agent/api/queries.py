"""The API's questions answered from an AppliedView, pure: filters validated at the border,
key-based pages (stable while the view changes underneath) over the view sorted once per
applied state, counters rolled up per port.

No gRPC here: server.py turns these rows into messages, unit tests call them directly."""
from __future__ import annotations

import base64
import binascii
import bisect
import functools
import ipaddress
import json
import re
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from agent.datapath.inventory import Counters, StatsTable
from agent.planner import BackendAddr
from agent.status import AppliedServicePort, AppliedView, PortMemo

DEFAULT_PAGE = 500
MAX_PAGE = 5000
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class InvalidRequest(ValueError):
    """A request field that cannot be right; the message names it."""


@dataclass(frozen=True, slots=True)
class Filter:
    namespace: str = ""
    name: str = ""
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None

    @classmethod
    def parse(cls, namespace: str = "", name: str = "", address: str = "") -> Filter:
        for field, value in (("namespace", namespace), ("name", name)):
            if value and (len(value) > 63 or not _LABEL.fullmatch(value)):
                raise InvalidRequest(f"filter.{field} {value[:80]!r}: not a Kubernetes name "
                                     f"(a DNS-1123 label: lowercase letters, digits and '-', "
                                     f"at most 63)")
        parsed = None
        if address:
            try:
                parsed = ipaddress.ip_address(address.strip("[]"))
            except ValueError:
                raise InvalidRequest(f"filter.address {address[:80]!r}: not an IP address"
                                     ) from None
        return cls(namespace, name, parsed)

    def service(self, sp: AppliedServicePort) -> bool:
        return (not self.namespace or sp.name.namespace == self.namespace) and \
            (not self.name or sp.name.name == self.name)

    def service_port(self, sp: AppliedServicePort) -> bool:
        """The service port, matched on a frontend's address when one is asked for."""
        return self.service(sp) and (self.address is None or any(
            f.address == self.address for f, _ in sp.frontends))

    def backend(self, sp: AppliedServicePort, backend: BackendAddr) -> bool:
        return self.service(sp) and (self.address is None or backend.address == self.address
                                     or any(f.address == self.address
                                            for f, _ in sp.frontends))


def service_type(sp: AppliedServicePort) -> str:
    kinds = {kind for _, kind in sp.frontends}
    if "LoadBalancer" in kinds:
        return "LoadBalancer"
    return "NodePort" if "NodePort" in kinds else "ClusterIP"


def service_key(sp: AppliedServicePort) -> tuple:
    n = sp.name       # _value_: Enum's value property runs in Python, per port per sort
    return (n.namespace, n.name, n.port_name, n.protocol._value_, sp.family)


def backend_key(sp: AppliedServicePort, backend: BackendAddr) -> tuple:
    return (*service_key(sp), *_backend_part(backend))


def _backend_part(backend: BackendAddr) -> tuple:
    # zero-padded: sorts numerically, and survives JSON in a page token as it is
    return backend.address.version, f"{int(backend.address):039d}", backend.port


def _backend_order(backend: BackendAddr) -> tuple:
    """The order of _backend_part, without formatting a string per backend."""
    return backend.address.version, int(backend.address), backend.port


# ---- pages -----------------------------------------------------------------------------

SERVICE_KEY = (str, str, str, str, int)           # service_key's types, in order
BACKEND_KEY = (*SERVICE_KEY, int, str, int)       # backend_key's
MAX_TOKEN = 1024        # characters; ours are under 300, and json.loads must never recurse


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidRequest(f"page_size {requested}: must be 0 (the default, "
                             f"{DEFAULT_PAGE}) or positive")
    return min(requested or DEFAULT_PAGE, MAX_PAGE)


def _token(key: tuple) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode()


def _after(token: str, shape: tuple[type, ...]) -> tuple | None:
    """The key a page token names, checked against the key shape of the list asked for
    (a token from another list, or made up, is refused rather than compared)."""
    if not token:
        return None
    key = None
    if len(token) <= MAX_TOKEN:
        try:
            key = json.loads(base64.urlsafe_b64decode(token.encode()))
        except (ValueError, binascii.Error, RecursionError):
            key = None
    if not isinstance(key, list) or len(key) != len(shape) or \
            any(type(v) is not t for v, t in zip(key, shape, strict=True)):
        raise InvalidRequest("page_token: not one this list handed out (the next_page_token "
                             "of the same RPC); start again without a token")
    return tuple(key)


class SortedView:
    """One applied state's service ports in key order, sorted once, and each port's
    backends sorted on first use: a page is then a bisect and a slice, not a sort of the
    whole view. Each sync makes a new AppliedView, so a SortedView never goes stale."""

    def __init__(self, view: AppliedView, memo: PortMemo | None = None) -> None:
        # not the view itself: SortedViewCache must not keep an old applied state alive
        self._ids = view.ids
        self.memo = memo or PortMemo()
        self.ports = sorted(view.service_ports_reusing(self.memo), key=service_key)
        self.port_keys = [service_key(sp) for sp in self.ports]
        self._backends: list[tuple | None] = [None] * len(self.ports)

    def backends_of(self, index: int) -> tuple[tuple[BackendAddr, str], ...]:
        found = self._backends[index]
        if found is None:       # two API threads may both sort it: same result, no harm
            found = tuple(sorted(self.ports[index].backends,
                                 key=lambda pair: _backend_order(pair[0])))
            self._backends[index] = found
        return found

    @functools.cached_property
    def svc_ids(self) -> dict[tuple, list[int]]:
        return _svc_ids(self._ids)

    def port_range(self, flt: Filter) -> tuple[int, int]:
        """Indexes of the ports a namespace (and name) filter can match: keys start with
        them, so the range is found by bisection."""
        prefix = (flt.namespace, flt.name) if flt.name and flt.namespace else \
            (flt.namespace,) if flt.namespace else ()
        if not prefix:
            return 0, len(self.ports)

        def head(key: tuple) -> tuple:
            return key[:len(prefix)]

        return (bisect.bisect_left(self.port_keys, prefix, key=head),
                bisect.bisect_right(self.port_keys, prefix, key=head))


class SortedViewCache:
    """The SortedView of the view last asked about, rebuilt when a sync has replaced it
    (the view's identity is the applied state's generation). Weakly held: an old applied
    state is never kept alive for the API's sake."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._view: weakref.ref | None = None
        self._sorted: SortedView | None = None

    def of(self, view: AppliedView, memo: PortMemo | None = None) -> SortedView:
        """memo: the one service ports are merged with (AgentStatus.memo): kept across
        views, a sync's new view merges (and the API encodes) only what it changed."""
        with self._lock:
            found = self._sorted
            if found is None or self._view is None or self._view() is not view:
                self._sorted = None         # the old one goes before the new is built
                found = SortedView(view, memo)
                self._sorted, self._view = found, weakref.ref(view, self._forget)
            return found

    def _forget(self, ref: weakref.ref) -> None:
        # runs wherever the view was let go, maybe under our lock: so no lock here
        if self._view is ref:
            self._sorted = None


# ---- rows ------------------------------------------------------------------------------

def select_services(pages: SortedView, flt: Filter, size: int, token: str
                    ) -> tuple[list[AppliedServicePort], str]:
    """The page after the token's key and the next token ("" at the end). A key, not an
    offset: rows added or removed meanwhile shift nothing."""
    after = _after(token, SERVICE_KEY)
    low, high = pages.port_range(flt)
    if after is not None:
        low = max(low, bisect.bisect_right(pages.port_keys, after))
    rows: list[AppliedServicePort] = []
    for index in range(low, high):
        sp = pages.ports[index]
        if flt.service_port(sp):
            if len(rows) == size:
                return rows, _token(service_key(rows[-1]))
            rows.append(sp)
    return rows, ""


def select_backends(pages: SortedView, flt: Filter, size: int, token: str
                    ) -> tuple[list[tuple[AppliedServicePort, BackendAddr, str]], str]:
    """As select_services, one row per (service port, backend)."""
    after = _after(token, BACKEND_KEY)
    low, high = pages.port_range(flt)
    resume_in = -1                 # the port whose backends the token's key falls among
    if after is not None:
        port_key, backend_part = after[:len(SERVICE_KEY)], after[len(SERVICE_KEY):]
        low = max(low, bisect.bisect_left(pages.port_keys, port_key))
        if low < len(pages.port_keys) and pages.port_keys[low] == port_key:
            resume_in = low
    rows: list[tuple[AppliedServicePort, BackendAddr, str]] = []
    for index in range(low, high):
        sp = pages.ports[index]
        if not flt.service(sp) or flt.address is not None and not any(
                flt.backend(sp, b) for b, _ in sp.backends):
            continue           # (a search for one address sorts only the ports it is in)
        backends = pages.backends_of(index)
        first = 0 if index != resume_in else bisect.bisect_right(
            backends, backend_part, key=lambda pair: _backend_part(pair[0]))
        for at in range(first, len(backends)):
            backend, state = backends[at]
            if flt.backend(sp, backend):
                if len(rows) == size:
                    last_sp, last_backend, _ = rows[-1]
                    return rows, _token(backend_key(last_sp, last_backend))
                rows.append((sp, backend, state))
    return rows, ""


def svc_ids(view: AppliedView) -> dict[tuple, list[int]]:
    """(ServicePortName, family) -> every svc_id serving it: one per scope (internal,
    external, ...), each with its own counters."""
    return _svc_ids(view.ids)


def _svc_ids(ids: dict) -> dict[tuple, list[int]]:
    out: dict[tuple, list[int]] = {}
    for key, svc_id in ids.items():
        out.setdefault(tuple(key[:2]), []).append(svc_id)
    return out


@dataclass(frozen=True, slots=True)
class PortStats:
    port: AppliedServicePort
    counters: Counters
    backends: tuple[tuple[BackendAddr, str, Counters], ...]


def port_stats(view: AppliedView, stats: StatsTable, ports: Sequence[AppliedServicePort],
               ids: dict[tuple, list[int]] | None = None) -> list[PortStats]:
    """ids: svc_ids(view) when the caller has it already (SortedView.svc_ids)."""
    ids = svc_ids(view) if ids is None else ids
    out = []
    for sp in ports:
        own = ids.get((sp.name, sp.family), [])
        total = Counters()
        for svc_id in own:
            total.add(stats.get((svc_id, None), Counters()))
        backends = []
        for backend, state in sp.backends:
            counters = Counters()
            for svc_id in own:
                counters.add(stats.get((svc_id, backend), Counters()))
            backends.append((backend, state, counters))
        out.append(PortStats(sp, total, tuple(backends)))
    return out
