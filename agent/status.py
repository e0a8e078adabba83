"""The read model the API reads: what the kernel holds after each sync, named
(AppliedView, AppliedServicePort), and the agent's status. Written by the agent only."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

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
        kinds = {FrontendKey(f.address, f.port, f.protocol): f.kind.value
                 for _, desired in parts for f in desired.frontends}
        states = {BackendAddr(b.address, b.port): b.state.value
                  for _, desired in parts for b in desired.backends}
        # a frontend seen by traffic from outside only (scope 1) is the same address
        frontends = sorted({replace(f, scope=0) for kernel, _ in parts for f in kernel.frontends},
                           key=lambda f: (int(f.address), f.port))
        backends = list(dict.fromkeys(b for kernel, _ in parts for b in kernel.backends))
        return cls(name, family, tuple((f, kinds.get(f, "unknown")) for f in frontends),
                   tuple((b, states.get(b, "unknown")) for b in backends))


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

    @functools.cached_property
    def service_ports(self) -> tuple[AppliedServicePort, ...]:
        parts: dict[tuple[ServicePortName, int], list] = {}
        for key, svc_id in self.ids.items():
            if svc_id in self.applied and key in self.desired:
                parts.setdefault((key.name, key.family), []).append((self.applied[svc_id],
                                                                     self.desired[key]))
        named = tuple(AppliedServicePort.merge(name, family, parts[name, family])
                      for name, family in sorted(parts, key=lambda k: (str(k[0]), k[1])))
        return named + tuple(AppliedServicePort.adopted(self.applied[i], self.kept_reason)
                             for i in self.kept if i in self.applied)


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

    @property
    def services(self) -> tuple[AppliedServicePort, ...]:
        return self.view.service_ports
