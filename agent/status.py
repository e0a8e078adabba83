"""The read model the API reads: what the kernel holds after each sync, named
(AppliedView, AppliedServicePort), and the agent's status. Written by the agent only."""
from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import chain, repeat
from operator import attrgetter

from agent.model.types import DesiredState, Protocol, ServicePortName, ServicePortState
from agent.planner import AppliedState, BackendAddr, FrontendKey, KernelService, ServiceKey


@dataclass(frozen=True, slots=True)
class AppliedServicePort:
    """A service port as the kernel serves it (all its frontends, internal and external,
    and every backend any of them reaches), with the names the API reports."""
    name: ServicePortName
    family: int
    frontends: tuple[tuple[FrontendKey, str], ...]     # (frontend, kind)
    backends: tuple[tuple[BackendAddr, str], ...]      # (backend, ready | terminating)
    held_back: str = ""     # why the kernel keeps it though no object listed claims it

    @classmethod
    def adopted(cls, kernel: KernelService, why: str) -> AppliedServicePort:
        """A service port adopted from the kernel that no listed object names (its
        owner is unknown): what the maps hold of it, and why it stays."""
        frontends = sorted({replace(f, scope=0) for f in kernel.frontends},
                           key=lambda f: (int(f.address), f.port))
        protocol = frontends[0].protocol if frontends else Protocol.TCP
        return cls(ServicePortName("", "", "", protocol), kernel.family,
                   tuple((f, "unknown") for f in frontends),
                   tuple((b, "unknown") for b in kernel.backends), why)

    @classmethod
    def merge(cls, name: ServicePortName, family: int,
              parts: list[tuple[KernelService, ServicePortState]]) -> AppliedServicePort:
        # keyed by (address as an int, port), read and hashed in C (an ipaddress and a
        # dataclass hash in Python): one service port's frontends share its protocol
        kinds: dict[tuple[int, int], str] = {}
        states: dict[tuple[int, int], str] = {}
        frontends: dict[tuple[int, int], FrontendKey] = {}
        backends: dict[tuple[int, int], BackendAddr] = {}
        for _, desired in parts:
            kinds.update(zip(_keys(desired.frontends), map(_KIND, desired.frontends),
                             strict=True))
            states.update(zip(_keys(desired.backends), map(_STATE, desired.backends),
                              strict=True))
        for kernel, _ in parts:
            # a frontend seen by traffic from outside only (scope 1) is the same address
            for key, f in zip(_keys(kernel.frontends), kernel.frontends, strict=True):
                if key not in frontends:
                    frontends[key] = f if f.scope == 0 else replace(f, scope=0)
            if not backends:
                backends = dict(zip(_keys(kernel.backends), kernel.backends, strict=True))
            else:
                for key, b in zip(_keys(kernel.backends), kernel.backends, strict=True):
                    backends.setdefault(key, b)
        ordered = sorted(frontends)
        return cls(name, family,
                   tuple(zip(map(frontends.__getitem__, ordered),
                             map(kinds.get, ordered, repeat("unknown")), strict=True)),
                   tuple(zip(backends.values(), map(states.get, backends, repeat("unknown")),
                             strict=True)))


_KIND, _STATE = attrgetter("kind._value_"), attrgetter("state._value_")
_KEY, _INT_KEY = attrgetter("address._ip", "port"), attrgetter("address", "port")


def _keys(items) -> Iterator[tuple[int, int]]:
    """(address as an int, port) of each item (an ipaddress keeps its int as _ip; an
    address may be an int already)."""
    for first in items:
        return map(_INT_KEY if type(first.address) is int else _KEY, items)
    return iter(())


@dataclass(frozen=True)
class AppliedView:
    """What the kernel holds after a sync, named: built into API answers only on request
    (a sync's cost must follow its change, not the cluster's size)."""
    applied: AppliedState
    desired: DesiredState
    ids: dict[ServiceKey, int]
    # (service ports, frontends, backend slots), known from the plan without a scan
    counts: tuple[int, int, int] = (0, 0, 0)
    # svc_ids adopted at start that the kernel keeps for input never read, and why
    kept: tuple[int, ...] = ()
    kept_reason: str = ""
    # entries of each map only the agent writes (planner.capacity.BUDGETED_MAPS, by their
    # bpf/maps.h names; absent: 0), from the plan: status counts them without a walk.
    # None: not known (a view not made by a sync)
    usage: dict[str, int] | None = None

    @functools.cached_property
    def service_ports(self) -> tuple[AppliedServicePort, ...]:
        return self.service_ports_reusing(PortMemo())

    def service_ports_reusing(self, memo: PortMemo) -> tuple[AppliedServicePort, ...]:
        """service_ports (cached as it), each named one taken from memo (an earlier view's,
        by its name and family) when its parts are the same as then: a new view per sync
        merges only the service ports that sync changed. memo is brought up to date."""
        found = self.__dict__.get("service_ports")
        if found is None:
            # Two readers racing (API and metrics threads) both merge, each right; the first
            # result stays (where cached_property keeps it). The memo may then hold the
            # other's equal objects: only their kept encodings are made once more.
            found = self.__dict__.setdefault("service_ports", self._merge(memo))
        return found

    def _merge(self, memo: PortMemo) -> tuple[AppliedServicePort, ...]:
        parts: dict[tuple[ServicePortName, int], list] = {}
        applied, desired = self.applied, self.desired
        for key, svc_id in self.ids.items():
            kernel = applied.get(svc_id)
            if kernel is not None:
                state = desired.get(key)
                if state is not None:
                    parts.setdefault((key.name, key.family), []).append((kernel, state))
        named = []
        kept, now_kept = memo.ports, {}
        for name, family in sorted(parts, key=lambda k: (str(k[0]), k[1])):
            now = parts[name, family]
            before = kept.get((name, family))
            if before is not None and _same_parts(before.parts, now):
                before.parts = _flat(now)   # the old parts may go
                now_kept[name, family] = before
                named.append(before.port)
            else:
                sp = AppliedServicePort.merge(name, family, now)
                now_kept[name, family] = MemoEntry(_flat(now), sp)
                named.append(sp)
        memo.ports = now_kept
        return tuple(named) + tuple(AppliedServicePort.adopted(self.applied[i],
                                                               self.kept_reason)
                                    for i in self.kept if i in self.applied)


class PortMemo:
    """The named service ports of the last view built with it, by (name, family), each with
    the parts it was merged from (AppliedView.service_ports_reusing) and what a reader
    keeps of it while it is unchanged (the API: its encoded answer)."""

    def __init__(self) -> None:
        self.ports: dict[tuple[ServicePortName, int], MemoEntry] = {}


@dataclass(slots=True)
class MemoEntry:
    parts: tuple             # (KernelService, ServicePortState, ...) as merged, flat
    port: AppliedServicePort
    kept: object = None      # the reader's, dropped with the entry when the port changes


def _flat(parts: list[tuple]) -> tuple:
    """[(kernel, desired), ...] as one tuple (kept per port: a third of the memory)."""
    return tuple(chain.from_iterable(parts))


def _same_parts(before: tuple, now: list[tuple]) -> bool:
    """Whether a service port's parts (before: _flat's) are what they were: the same
    objects (an incremental sync keeps an unchanged service's), else equal (a full sync
    or a kernel re-read makes new ones of the same content)."""
    return len(before) == 2 * len(now) and all(
        (was is part or was == part)
        for was, part in zip(before, chain.from_iterable(now), strict=True))


@dataclass
class AgentStatus:
    synced: bool = False
    syncs: int = 0
    sync_errors: int = 0
    last_sync_unix: float = 0.0
    last_sync_seconds: float = 0.0
    view: AppliedView = field(default_factory=lambda: AppliedView({}, {}, {}))
    source: str = ""
    node_name: str = ""
    failure: str = ""                  # why the agent stopped on its own, if it did
    # From the source delivering a change to the kernel holding it, for the last sync
    # that carried changes (periodic syncs without one do not count).
    last_event_to_kernel_seconds: float = 0.0
    full_syncs: int = 0                # syncs that recomputed everything (the rest: changes)
    change_syncs: int = 0              # syncs that carried changes from the source
    # Services whose change does not fit the maps, "namespace/name" -> why; the kernel
    # keeps what it had of them. services_refused counts each time one was refused.
    refused: dict[str, str] = field(default_factory=dict)
    services_refused: int = 0
    # the TC path's flow table at its last sweep (datapath.conntrack.FlowTableStats);
    # None: no TC path, or not swept yet
    flows: object | None = None
    # the service ports readers had merged, kept across views (AppliedView.service_ports)
    memo: PortMemo = field(default_factory=lambda: PortMemo(), repr=False, compare=False)

    @property
    def services(self) -> tuple[AppliedServicePort, ...]:
        """The view's service ports, merged anew only where the last sync changed them."""
        return self.view.service_ports_reusing(self.memo)
