"""The API's questions answered from an AppliedView, pure: filters validated at the border,
key-based pages (stable while the view changes underneath), counters rolled up per port.

No gRPC here: server.py turns these rows into messages, unit tests call them directly."""
from __future__ import annotations

import base64
import binascii
import bisect
import ipaddress
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.agent import AppliedServicePort, AppliedView
from agent.datapath.inventory import Counters, StatsTable
from agent.planner import BackendAddr

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
    n = sp.name
    return (n.namespace, n.name, n.port_name, n.protocol.value, sp.family)


def backend_key(sp: AppliedServicePort, backend: BackendAddr) -> tuple:
    # zero-padded: sorts numerically, and survives JSON in a page token as it is
    return (*service_key(sp), backend.address.version, f"{int(backend.address):039d}",
            backend.port)


# ---- pages -----------------------------------------------------------------------------

def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidRequest(f"page_size {requested}: must be 0 (the default, "
                             f"{DEFAULT_PAGE}) or positive")
    return min(requested or DEFAULT_PAGE, MAX_PAGE)


def _token(key: tuple) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode()


def _after(token: str, sample: tuple | None) -> tuple | None:
    if not token:
        return None
    try:
        key = tuple(json.loads(base64.urlsafe_b64decode(token.encode())))
    except (ValueError, binascii.Error, TypeError):
        key = None
    if key is None or (sample is not None and [type(v) for v in key] !=
                       [type(v) for v in sample]):
        raise InvalidRequest("page_token: not one this server handed out; start again "
                             "without a token")
    return key


def paged(rows: Sequence, key_of: Callable[[object], tuple], size: int,
          token: str) -> tuple[list, str]:
    """rows sorted by key_of; the page after the token's key and the next token ("" at
    the end). A key, not an offset: rows added or removed meanwhile shift nothing."""
    keys = [key_of(r) for r in rows]
    after = _after(token, keys[0] if keys else None)
    start = 0 if after is None else bisect.bisect_right(keys, after)
    page = list(rows[start:start + size])
    more = start + size < len(rows)
    return page, (_token(keys[start + size - 1]) if more else "")


# ---- rows ------------------------------------------------------------------------------

def sorted_ports(view: AppliedView) -> list[AppliedServicePort]:
    return sorted(view.service_ports, key=service_key)


def select_services(view: AppliedView, flt: Filter, size: int, token: str
                    ) -> tuple[list[AppliedServicePort], str]:
    return paged([sp for sp in sorted_ports(view) if flt.service_port(sp)], service_key,
                 size, token)


def select_backends(view: AppliedView, flt: Filter, size: int, token: str
                    ) -> tuple[list[tuple[AppliedServicePort, BackendAddr, str]], str]:
    rows = sorted(((sp, b, state) for sp in view.service_ports for b, state in sp.backends
                   if flt.backend(sp, b)), key=lambda r: backend_key(r[0], r[1]))
    return paged(rows, lambda r: backend_key(r[0], r[1]), size, token)


def svc_ids(view: AppliedView) -> dict[tuple, list[int]]:
    """(ServicePortName, family) -> every svc_id serving it: one per scope (internal,
    external, ...), each with its own counters."""
    out: dict[tuple, list[int]] = {}
    for key, svc_id in view.ids.items():
        out.setdefault(tuple(key[:2]), []).append(svc_id)
    return out


@dataclass(frozen=True, slots=True)
class PortStats:
    port: AppliedServicePort
    counters: Counters
    backends: tuple[tuple[BackendAddr, str, Counters], ...]


def port_stats(view: AppliedView, stats: StatsTable, ports: Sequence[AppliedServicePort]
               ) -> list[PortStats]:
    ids = svc_ids(view)
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
