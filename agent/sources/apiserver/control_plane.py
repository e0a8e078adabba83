"""The manifest source's stand-in for a cluster's API server and controllers. admit() turns
one file's raw objects into what a cluster would have stored (defaults, allocated cluster
IPs and node ports, Endpoints mirrored to EndpointSlices); settle() ends a pass over the
directory and names the files whose objects another file's change altered (read again)."""
from __future__ import annotations

import ipaddress
import json
import logging
import pickle
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.logfmt import kv
from agent.model.types import IPNetwork
from agent.sources.apiserver import store
from agent.sources.apiserver.allocator import Holder, RangeAllocator, address_text
from agent.sources.apiserver.defaults import (
    AdmissionError,
    default_service,
    explicit_ips,
    ip_families,
    parse_ip,
    with_namespace,
)
from agent.sources.apiserver.mirroring import mirror

log = logging.getLogger(__name__)

# kubeadm's service range, and kind's IPv6 one: a dual-stack Service gets both families
DEFAULT_CLUSTER_IP_RANGES = "10.96.0.0/12,fd00:10:96::/112"
DEFAULT_NODE_PORT_RANGE = "30000-32767"
_ROUNDS = 4      # settle loops: a re-read file can displace at most what it holds


@dataclass(frozen=True, slots=True)
class Allocation:
    """What the control plane allocated to one Service (what its manifest did not give)."""
    cluster_ips: frozenset[str] = frozenset()
    node_ports: frozenset[int] = frozenset()      # nodePorts and the healthCheckNodePort


@dataclass(slots=True)
class _Admitted:
    file: str | None                 # None: remembered from an earlier run, not read yet
    selectorless: bool = True
    ips: dict[int, tuple[int, bool]] = field(default_factory=dict)   # family -> (ip, alloc.)
    ports: dict[int, tuple[int, bool]] = field(default_factory=dict)  # port -> (nodePort, al.)
    health_check: tuple[int, bool] | None = None
    # the admitted object, served again when a new version is refused: pickled (a few
    # hundred bytes, not the parsed document's dicts and strings, which every Service
    # would keep beside its typed object), and the exact values and types back
    raw_pickle: bytes | None = None

    @property
    def raw(self) -> dict | None:
        return None if self.raw_pickle is None else pickle.loads(self.raw_pickle)

    def held_ips(self) -> set[tuple[int, int]]:
        return {(family, ip) for family, (ip, _) in self.ips.items()}

    def held_ports(self) -> set[int]:
        held = {port for port, _ in self.ports.values()}
        if self.health_check:
            held.add(self.health_check[0])
        return held


def parse_cluster_ip_ranges(text: str) -> tuple[IPNetwork, ...]:
    """--service-cluster-ip-range: one CIDR, or one per family (comma separated)."""
    networks = tuple(ipaddress.ip_network(part.strip()) for part in text.split(",")
                     if part.strip())
    if not 1 <= len(networks) <= 2 or len({n.version for n in networks}) != len(networks):
        raise ValueError(f"{text!r}: give one CIDR, or one IPv4 and one IPv6 CIDR")
    for network in networks:
        if network.num_addresses < 4:
            raise ValueError(f"{network}: too small to allocate from")
    return networks


def parse_node_port_range(text: str) -> tuple[int, int]:
    """--service-node-port-range: LOW-HIGH, as kube-apiserver takes it."""
    low, dash, high = text.partition("-")
    if not dash or not low.strip().isdigit() or not high.strip().isdigit():
        raise ValueError(f"{text!r}: give a range such as 30000-32767")
    first, last = int(low), int(high)
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"{text!r}: ports 1-65535, low before high")
    return first, last


class ControlPlane:
    """Holds every Service's cluster IPs and node ports across files. Allocation is
    deterministic from namespace/name (every node's agent picks the same), an address or
    port a manifest gives explicitly is never allocated to another Service (it takes it
    back from one that was allocated it), and allocations are remembered in state_file.
    Two manifests giving one address are both served as written (a cluster would have
    refused the later; kube-proxy's own conflict rule then applies per frontend) and said.
    Read from other threads: allocations (by (namespace, name)), problems, failures."""

    def __init__(self, cluster_ip_ranges: Sequence[IPNetwork] | str = DEFAULT_CLUSTER_IP_RANGES,
                 node_port_range: tuple[int, int] | str = DEFAULT_NODE_PORT_RANGE,
                 state_file: Path | None = None) -> None:
        if isinstance(cluster_ip_ranges, str):
            cluster_ip_ranges = parse_cluster_ip_ranges(cluster_ip_ranges)
        if isinstance(node_port_range, str):
            node_port_range = parse_node_port_range(node_port_range)
        self.families = tuple(n.version for n in cluster_ip_ranges)   # primary first
        self._ranges = {n.version: n for n in cluster_ip_ranges}
        self._ips = {family: RangeAllocator.for_network(self._ranges[family])
                     if family in self._ranges else RangeAllocator(0, 0, (0, 0, 1), "none")
                     for family in (4, 6)}
        self._ports = RangeAllocator.for_ports(*node_port_range)
        self._services: dict[str, _Admitted] = {}
        self._file_services: dict[str, tuple[str, ...]] = {}   # file -> its Service keys
        self._endpoints_file: dict[str, str] = {}       # Endpoints key -> its file
        self._file_endpoints: dict[str, set[str]] = {}
        self._refused: dict[str, tuple[str, str]] = {}  # key -> (file, why): not served
        self._shared: dict[str, tuple[str, str]] = {}   # key -> (file, why): served anyway
        # (allocator, value) -> keys giving it explicitly, when more than one does
        self._sharers: dict[tuple[int, int], set[str]] = {}
        self._sharing: dict[str, str] = {}              # key -> its sharing, this admission
        self._reported: dict[str, str] = {}             # key -> what was last logged
        self._stale: set[str] = set()
        # Services whose record changed since the last _publish: a pass costs what it read
        self._dirty: set[str] = set()
        self._state_file = state_file
        self._remembered = store.load(state_file)
        self._saved: dict[str, dict] = dict(self._remembered)
        self._settled = False
        self._reserve_remembered()
        self.failures = 0              # problems reported: refused or shared (metric)
        self.allocations: dict[tuple[str, str], Allocation] = {}
        # (namespace, name, why, served): Services not served as a cluster would store them
        self.problems: tuple[tuple[str, str, str, bool], ...] = ()

    # --- one file --------------------------------------------------------------------

    def admit(self, file: str, documents: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """(where, raw object) of one file as a cluster would store them. A Service the API
        server would refuse (an address another Service holds, a range exhausted) is left
        out, or kept at its last admitted version, and said why once per version."""
        out: dict[int, list[tuple[str, Any]]] = {}
        services, endpoints = [], []
        for i, (where, raw) in enumerate(documents):
            raw = with_namespace(raw)
            kind = (raw.get("apiVersion"), raw.get("kind")) if isinstance(raw, dict) else None
            if kind == ("v1", "Service") and _key(raw):
                services.append((i, where, raw))
            elif kind == ("v1", "Endpoints") and _key(raw):
                endpoints.append((i, where, raw))
            else:
                out[i] = [(where, raw)]
        # explicit addresses first: within a file they never depend on document order
        services.sort(key=lambda s: not explicit_ips(s[2].get("spec") or {}) if
                      isinstance(s[2].get("spec"), dict) else True)
        seen: set[str] = set()
        for i, where, raw in services:
            key = _key(raw)
            seen.add(key)
            try:
                admitted = self._admit_service(file, key, raw)
            except Exception:  # noqa: BLE001 -- our bug: the object goes on as written
                log.exception(kv(event="admission_failed", file=file, object=f"Service {key}"))
                admitted = raw
            out[i] = [(where, admitted)] if admitted is not None else []
        for key in set(self._file_services.get(file, ())) - seen:
            if self._services.get(key) is not None and self._services[key].file == file:
                self._release(key, file)
            self._refused.pop(key, None)
            self._shared.pop(key, None)
        if seen:           # a tuple: a set of one key costs four times as much
            self._file_services[file] = tuple(seen)
        else:              # most files hold no Service (one object per file): no empty set
            self._file_services.pop(file, None)
        seen = set()
        for i, where, raw in endpoints:
            key = _key(raw)
            seen.add(key)
            self._endpoints_file[key] = file
            service = self._services.get(key)
            # the mirroring controller mirrors only for an existing Service without a
            # selector; kube-proxy ignores Endpoints (a Service with one has its slices)
            if service is not None and service.file is not None and service.selectorless:
                try:
                    out[i] = [(f"{where} mirrored", s) for s in mirror(raw)]
                except Exception:  # noqa: BLE001 -- our bug: nothing mirrored from it
                    log.exception(kv(event="mirroring_failed", file=file,
                                     object=f"Endpoints {key}"))
        for key in self._file_endpoints.get(file, set()) - seen:
            if self._endpoints_file.get(key) == file:
                del self._endpoints_file[key]
        if seen:
            self._file_endpoints[file] = seen
        else:
            self._file_endpoints.pop(file, None)
        return [pair for i in sorted(out) for pair in out[i]]

    def settled(self, changes: list, files: Callable[[], Iterable[str]],
                read_again: Callable[[set[str]], list],
                gone: Callable[[], Iterable[str]] | None = None) -> list:
        """A pass's changes once settled: files whose objects another file's change
        altered (an address taken back, Endpoints mirrored or no longer) are read again
        at once, so the consumer never sees a state no cluster would have stored. gone,
        when given, names the files gone since it was last asked (else all are looked at)."""
        for _ in range(_ROUNDS):
            again = self.settle(files(), None if gone is None else gone())
            if not again:
                break
            changes = merge_changes(changes, read_again(again))
        return changes

    def settle(self, files: Iterable[str], gone: Iterable[str] | None = None) -> set[str]:
        """Ends a pass: forgets files gone, releases what an earlier run remembered for
        Services not read, saves the allocations, and returns the files to read again.
        gone: the files gone since the last settle, when the caller knows them (a
        one-file pass then costs that file, not a look at every file)."""
        # the source's own record of its files (a dict) is not copied
        present = files if isinstance(files, (dict, set, frozenset)) else set(files)
        services_files = self._file_services if gone is None else \
            [f for f in gone if f in self._file_services]
        endpoints_files = self._file_endpoints if gone is None else \
            [f for f in gone if f in self._file_endpoints]
        for file in [f for f in services_files if f not in present]:
            for key in self._file_services.pop(file):
                if self._services.get(key) is not None and self._services[key].file == file:
                    self._release(key, None)
        for file in [f for f in endpoints_files if f not in present]:
            del self._file_endpoints[file]
        for problems in (self._refused, self._shared):
            for key, (file, _) in list(problems.items()):
                if file not in present:
                    del problems[key]
        for key in [k for k, f in self._endpoints_file.items() if f not in present]:
            del self._endpoints_file[key]
        if not self._settled:
            self._settled = True
            for key in [k for k, s in self._services.items() if s.file is None]:
                self._release(key, None)
        self._publish()
        stale, self._stale = {f for f in self._stale if f in present}, set()
        return stale

    # --- a Service -------------------------------------------------------------------

    def _admit_service(self, file: str, key: str, raw: dict) -> dict | None:
        raw = default_service(raw)
        spec = raw.get("spec")
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
            return raw                         # parse_object names what is wrong
        previous = self._services.get(key)
        record = _Admitted(file, selectorless=not spec.get("selector"))
        self._sharing.pop(key, None)
        try:
            spec = self._cluster_ips(key, spec, previous, record)
            if spec is None:
                return raw                     # a malformed address: parse_object names it
            spec = self._node_ports(key, spec, previous, record)
        except AdmissionError as e:
            self._undo(key, previous, record)
            return self._refuse(file, key, raw, str(e))
        admitted = {**raw, "spec": spec}
        record.raw_pickle = pickle.dumps(admitted, pickle.HIGHEST_PROTOCOL)
        self._commit(key, previous, record, file)
        return admitted

    def _cluster_ips(self, key: str, spec: dict, previous: _Admitted | None,
                     record: _Admitted) -> dict | None:
        if spec["type"] == "ExternalName":
            return spec
        single, listed = spec.get("clusterIP"), spec.get("clusterIPs")
        if single == "None" or (isinstance(listed, list) and listed[:1] == ["None"]):
            return spec                        # headless: no address
        given = explicit_ips(spec)
        if given is None:
            return None
        families, policy = ip_families(key, spec, given, self.families)
        if given and parse_ip(given[0]).version != families[0]:
            raise AdmissionError(f"Service {key}: spec.ipFamilies[0] does not match "
                                 f"spec.clusterIPs[0] {given[0]}; service not served")
        for text in given:
            ip = parse_ip(text)
            self._claim(self._ips[ip.version], int(ip), key, f"spec.clusterIPs {text}")
            record.ips[ip.version] = (int(ip), False)
        for family in families:
            if family in record.ips:
                continue
            if family not in self._ranges:
                raise AdmissionError(f"Service {key}: spec.ipFamilies: no IPv{family} range "
                                     "in --service-cluster-ip-range; service not served")
            value = self._allocate(self._ips[family], key, f"{key}/IPv{family}",
                                   _held(previous, "ips", family), self._remembered_ip(key, family))
            if value is None:
                raise AdmissionError(
                    f"Service {key}: spec.clusterIPs: no free IPv{family} address in "
                    f"{self._ranges[family]} (--service-cluster-ip-range): range exhausted; "
                    "service not served")
            record.ips[family] = (value, True)
        ips = [address_text(f, record.ips[f][0]) for f in families if f in record.ips]
        return {**spec, "clusterIP": ips[0], "clusterIPs": ips,
                "ipFamilies": [f"IPv{f}" for f in families], "ipFamilyPolicy": policy}

    def _node_ports(self, key: str, spec: dict, previous: _Admitted | None,
                    record: _Admitted) -> dict:
        kind = spec["type"]
        if kind not in ("NodePort", "LoadBalancer") or not isinstance(spec.get("ports"), list):
            return spec
        allocate = kind == "NodePort" or spec.get("allocateLoadBalancerNodePorts") is not False
        ports = [dict(p) if isinstance(p, dict) else p for p in spec["ports"]]
        # one node port per port number: TCP and UDP on one port share it, as the API
        # server's initNodePorts shares it
        for entry in ports:
            if not isinstance(entry, dict) or not _number(entry.get("port")):
                continue
            given = entry.get("nodePort")
            if _number(given) and given:
                if entry["port"] not in record.ports or record.ports[entry["port"]][0] != given:
                    self._claim(self._ports, given, key, f"spec.ports nodePort {given}")
                    record.ports[entry["port"]] = (given, False)
            elif allocate and given in (None, 0):
                if entry["port"] not in record.ports:
                    value = self._allocate(self._ports, key, f"{key}/{entry['port']}",
                                           _held(previous, "ports", entry["port"]),
                                           self._remembered_port(key, entry["port"]))
                    if value is None:
                        raise self._ports_exhausted(key)
                    record.ports[entry["port"]] = (value, True)
                entry["nodePort"] = record.ports[entry["port"]][0]
        spec = {**spec, "ports": ports}
        if kind == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local":
            given = spec.get("healthCheckNodePort")
            if _number(given) and given:
                self._claim(self._ports, given, key, f"spec.healthCheckNodePort {given}")
                record.health_check = (given, False)
            elif given in (None, 0):
                held = previous.health_check if previous and previous.health_check and \
                    previous.health_check[1] else None
                value = self._allocate(self._ports, key, f"{key}/healthCheck",
                                       held[0] if held else None,
                                       self._remembered_port(key, "healthCheck"))
                if value is None:
                    raise self._ports_exhausted(key)
                record.health_check = (value, True)
                spec["healthCheckNodePort"] = value
        return spec

    def _ports_exhausted(self, key: str) -> AdmissionError:
        return AdmissionError(f"Service {key}: spec.ports: no free node port in "
                              f"{self._ports.label} (--service-node-port-range): range "
                              "exhausted; service not served")

    # --- holding values --------------------------------------------------------------

    def _claim(self, allocator: RangeAllocator, value: int, key: str, what: str) -> None:
        """An explicit value: another Service's explicit claim refuses it; one allocated
        (or remembered) to another Service is taken back, and that Service moves."""
        holder = allocator.holder(value)
        if holder is not None and holder.key != key:
            other = self._services.get(holder.key)
            if holder.explicit and other is not None and other.file is not None:
                self._sharers.setdefault((id(allocator), value), {holder.key}).add(key)
                self._sharing[key] = (f"Service {key}: {what} is also given by Service "
                                      f"{holder.key} (a cluster would refuse the later one); "
                                      "served as written")
                return
            self._displace(holder.key, allocator, value)
        allocator.hold(value, Holder(key, explicit=True))

    def _let_go(self, allocator: RangeAllocator, value: int, key: str) -> None:
        """key no longer holds value; another Service giving it explicitly takes it over."""
        sharers = self._sharers.get((id(allocator), value))
        if sharers is None:
            allocator.release(value, key)
            return
        sharers.discard(key)
        holder = allocator.holder(value)
        if holder is not None and holder.key == key:
            allocator.release(value, key)
            if sharers:
                allocator.hold(value, Holder(min(sharers), explicit=True))
        if len(sharers) < 2:
            del self._sharers[id(allocator), value]

    def _allocate(self, allocator: RangeAllocator, key: str, seed: str,
                  *preferred: int | None) -> int | None:
        """The value key holds already, else the one remembered for it if free, else the
        deterministic one."""
        for value in preferred:
            if value is None or not allocator.contains(value):
                continue
            holder = allocator.holder(value)
            if holder is None or holder.key == key:
                allocator.hold(value, Holder(key, explicit=False))
                return value
        return allocator.allocate(seed, key)

    def _displace(self, key: str, allocator: RangeAllocator, value: int) -> None:
        other = self._services.get(key)
        allocator.release(value, key)
        if other is None:
            return
        self._dirty.add(key)
        for family, (ip, _) in list(other.ips.items()):
            if allocator is self._ips[family] and ip == value:
                del other.ips[family]
        for port, (node_port, _) in list(other.ports.items()):
            if allocator is self._ports and node_port == value:
                del other.ports[port]
        if allocator is self._ports and other.health_check and other.health_check[0] == value:
            other.health_check = None
        if other.file is not None:
            self._stale.add(other.file)        # read again: it gets another value
            log.info(kv(event="allocation_moved", object=f"Service {key}",
                        value=value, reason="given explicitly by another Service"))

    def _undo(self, key: str, previous: _Admitted | None, record: _Admitted) -> None:
        """A refused version gives back what it took that the previous one did not hold."""
        kept_ips = previous.held_ips() if previous else set()
        kept_ports = previous.held_ports() if previous else set()
        for family, ip in record.held_ips() - kept_ips:
            self._let_go(self._ips[family], ip, key)
        for port in record.held_ports() - kept_ports:
            self._let_go(self._ports, port, key)
        if previous is not None:      # values its claims displaced from itself stay its own
            for family, (ip, allocated) in previous.ips.items():
                self._ips[family].hold(ip, Holder(key, not allocated))
            for node_port, allocated in previous.ports.values():
                self._ports.hold(node_port, Holder(key, not allocated))

    def _commit(self, key: str, previous: _Admitted | None, record: _Admitted,
                file: str) -> None:
        freed = False
        if previous is not None:
            for family, ip in previous.held_ips() - record.held_ips():
                self._let_go(self._ips[family], ip, key)
                freed = True
            for port in previous.held_ports() - record.held_ports():
                self._let_go(self._ports, port, key)
                freed = True
        self._services[key] = record
        self._dirty.add(key)
        sharing = self._sharing.pop(key, None)
        if sharing is not None:
            self._shared[key] = (file, sharing)
            self._report(file, key, record.raw, sharing, "served_as_written")
        elif self._shared.pop(key, None) is not None:
            self._reported.pop(key, None)
        if self._refused.pop(key, None) is not None:
            self._reported.pop(key, None)
            log.info(kv(event="service_admitted", file=file, object=f"Service {key}"))
        if freed:       # room freed (a NodePort now ClusterIP, a port dropped): as _release
            self._retry_refused()
        if previous is None or previous.file is None or \
                previous.selectorless != record.selectorless:
            self._endpoints_changed(key, file)

    def _release(self, key: str, current_file: str | None) -> None:
        record = self._services.pop(key)
        self._dirty.add(key)
        for family, ip in record.held_ips():
            self._let_go(self._ips[family], ip, key)
        for port in record.held_ports():
            self._let_go(self._ports, port, key)
        self._reported.pop(key, None)
        if record.file is not None:
            self._endpoints_changed(key, current_file)
        self._retry_refused()

    def _retry_refused(self) -> None:
        """Room freed: the files of Services refused (for want of it, or anything else)
        are read again in this pass, as a cluster's client retrying a refused create
        would be admitted once there is room."""
        self._stale.update(file for file, _ in self._refused.values())

    def refusing(self) -> set[str]:
        """The files holding a Service refused: read (parsed and admitted) on every
        read, never kept as the same bytes, since their admission may differ now."""
        return {file for file, _ in self._refused.values()}

    def _endpoints_changed(self, key: str, current_file: str | None) -> None:
        """Whether key's Endpoints are mirrored changed: its file is read again (the
        current file's Endpoints come after its Services anyway)."""
        file = self._endpoints_file.get(key)
        if file is not None and file != current_file:
            self._stale.add(file)

    def _refuse(self, file: str, key: str, raw: dict, why: str) -> dict | None:
        previous = self._services.get(key)
        kept = previous.raw if previous is not None and previous.file is not None else None
        self._refused[key] = (file, why + ("" if kept is None else
                                           " (its previous version is served)"))
        self._shared.pop(key, None)
        self._report(file, key, raw, why, "kept_previous" if kept else "skipped")
        return kept

    def _report(self, file: str, key: str, raw: Any, why: str, action: str) -> None:
        version = f"{why}|{json.dumps(raw, sort_keys=True, default=str)}"
        if self._reported.get(key) != version:     # once per version of the object
            self._reported[key] = version
            self.failures += 1
            log.warning(kv(event="service_not_admitted" if action != "served_as_written"
                           else "service_address_shared", file=file,
                           object=f"Service {key}", error=why, action=action))

    # --- remembered across runs ------------------------------------------------------

    def _reserve_remembered(self) -> None:
        """What an earlier run allocated stays reserved for its Service until the first
        pass has read every file (then what no file claimed is let go)."""
        for key, saved in self._remembered.items():
            record = _Admitted(None)
            for family in (4, 6):
                ip = self._remembered_ip(key, family)
                if ip is not None and self._ips[family].contains(ip) and \
                        self._ips[family].holder(ip) is None:
                    self._ips[family].hold(ip, Holder(key, explicit=False))
                    record.ips[family] = (ip, True)
            for port, node_port in (saved.get("nodePorts") or {}).items():
                if _number(node_port) and self._ports.contains(node_port) and \
                        self._ports.holder(node_port) is None and str(port).isdigit():
                    self._ports.hold(node_port, Holder(key, explicit=False))
                    record.ports[int(port)] = (node_port, True)
            self._services[key] = record

    def _remembered_ip(self, key: str, family: int) -> int | None:
        for text in (self._remembered.get(key) or {}).get("ips") or ():
            try:
                ip = ipaddress.ip_address(text)
            except (ValueError, TypeError):
                continue
            if ip.version == family:
                return int(ip)
        return None

    def _remembered_port(self, key: str, port: int | str) -> int | None:
        saved = self._remembered.get(key) or {}
        value = saved.get("healthCheckNodePort") if port == "healthCheck" else \
            (saved.get("nodePorts") or {}).get(str(port))
        return value if _number(value) else None

    def _publish(self) -> None:
        """allocations and the state file brought up to date for the Services whose
        record changed (a one-file pass costs that file, not every Service); problems."""
        dirty, self._dirty = self._dirty, set()
        if dirty:
            # _saved holds what the state file holds (loaded, then as saved): every
            # Service it names was dirty by the first settle (admitted, or let go)
            allocations = dict(self.allocations)   # replaced whole: other threads read it
            changed = False
            for key in dirty:
                namespace, _, name = key.partition("/")
                published = self._published(key)
                if published is None:
                    allocations.pop((namespace, name), None)
                    changed |= self._saved.pop(key, None) is not None
                    continue
                allocations[namespace, name], remembered = published
                self._remembered[key] = remembered
                if self._saved.get(key) != remembered:
                    self._saved[key] = remembered
                    changed = True
            self.allocations = allocations
            if changed:
                store.save(self._state_file, self._saved)
        self.problems = tuple(sorted(
            [(*key.split("/", 1), why, False) for key, (_, why) in self._refused.items()] +
            [(*key.split("/", 1), why, True) for key, (_, why) in self._shared.items()]))

    def _published(self, key: str) -> tuple[Allocation, dict] | None:
        """(what status shows, what the state file keeps) of what the control plane
        allocated to key; None when it allocated nothing (or key is not read)."""
        record = self._services.get(key)
        if record is None or record.file is None:
            return None
        ips = [address_text(f, ip) for f, (ip, allocated) in sorted(record.ips.items())
               if allocated]
        ports = {port: node_port for port, (node_port, allocated) in record.ports.items()
                 if allocated}
        health = record.health_check[0] if record.health_check and \
            record.health_check[1] else None
        if not ips and not ports and health is None:
            return None
        remembered = {"ips": ips, "nodePorts": {str(p): n for p, n in ports.items()}}
        if health is not None:
            remembered["healthCheckNodePort"] = health
        return Allocation(frozenset(ips), frozenset(ports.values()) |
                          ({health} if health else set())), remembered


def _key(raw: dict) -> str:
    metadata = raw.get("metadata")
    if not isinstance(metadata, dict):
        return ""
    name, namespace = metadata.get("name"), metadata.get("namespace") or "default"
    if not isinstance(name, str) or not name or not isinstance(namespace, str):
        return ""
    return f"{namespace}/{name}"


def _number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _held(previous: _Admitted | None, what: str, index: int) -> int | None:
    """The value previous holds at index, when it was allocated (not given explicitly)."""
    if previous is None:
        return None
    held = getattr(previous, what).get(index)
    return held[0] if held and held[1] else None


def merge_changes(first: list, then: list) -> list:
    """Two passes' ObjectChanges as one: the later change of a key wins."""
    merged = {change.key: change for change in first}
    merged.update((change.key, change) for change in then)
    return sorted(merged.values(), key=lambda c: (c.key.kind, c.key.namespace, c.key.name))
