"""The cluster a benchmark serves: N Services (TCP 80 and UDP 53 each) with E endpoints,
as manifest objects for the agent and as desired state for the kube-proxy renderers."""
from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from agent.model import desired_state
from agent.model.objects import parse_endpoint_slice, parse_service
from agent.model.types import DesiredState

NAMESPACE = "bench"
SERVICE_BASE = int(ipaddress.IPv4Address("10.96.0.1"))
FAKE_ENDPOINT_BASE = int(ipaddress.IPv4Address("10.245.0.1"))   # no pod behind these
BACKEND_PORT = 8080
PORTS = (("http", "TCP", 80), ("dns", "UDP", 53))
PER_FILE = 20000           # services per manifest file


def service_name(i: int) -> str:
    return f"svc-{i:06d}"          # zero-padded: name order is index order (KUBE-SERVICES)


def cluster_ip(i: int) -> str:
    return str(ipaddress.IPv4Address(SERVICE_BASE + i))


@dataclass(frozen=True)
class Workload:
    services: int
    endpoints: int
    objects: list[dict]

    def desired(self) -> DesiredState:
        services = [parse_service(o) for o in self.objects if o["kind"] == "Service"]
        slices = [parse_endpoint_slice(o) for o in self.objects if o["kind"] == "EndpointSlice"]
        return desired_state(services, slices)

    def stage(self, directory: Path, stem: str = "services",
              per_file: int = PER_FILE) -> list[tuple[Path, Path]]:
        """Serialize into hidden files, (staged, final) pairs: publish() is then only
        renames. Several files, as a cluster's manifests are: the source refuses files
        over 64 MiB, and 100k services make 86 MB in one."""
        pairs = []
        services = [o for o in self.objects if o["kind"] == "Service"]
        slices = [o for o in self.objects if o["kind"] == "EndpointSlice"]
        for n, start in enumerate(range(0, len(services), per_file)):
            final = directory / f"{stem}-{n:03d}.json"
            staged = directory / f".{final.name}.staged"
            items = services[start:start + per_file] + slices[start:start + per_file]
            staged.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
            pairs.append((staged, final))
        return pairs

    def write(self, path: Path) -> None:
        """One JSON `kind: List` (the source reads .json with the json module), written to
        a hidden name first: publishing it is a single rename."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": self.objects}))
        os.replace(tmp, path)


def publish(pairs: list[tuple[Path, Path]]) -> None:
    for staged, final in pairs:
        os.replace(staged, final)


def withdraw(directory: Path, stem: str = "services", keep: set[Path] = frozenset()) -> None:
    for path in directory.glob(f"{stem}-*.json"):
        if path not in keep:
            path.unlink()


def make(services: int, endpoints: int, backend_ips: list[str] | None = None,
         first: int = 0, target_port: int = BACKEND_PORT) -> Workload:
    """Every service gets the given backend pods (real ones, for traffic) or, without
    them, `endpoints` distinct fake addresses (for control-plane sizes)."""
    objects: list[dict] = []
    for i in range(first, first + services):
        name = service_name(i)
        objects.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"type": "ClusterIP", "clusterIP": cluster_ip(i), "clusterIPs": [cluster_ip(i)],
                     "ports": [{"name": n, "protocol": p, "port": port,
                                "targetPort": target_port} for n, p, port in PORTS]}})
        if backend_ips is not None:
            addresses = backend_ips[:endpoints]
        else:
            addresses = [str(ipaddress.IPv4Address(FAKE_ENDPOINT_BASE + (i * endpoints + j)
                                                   % (1 << 20)))
                         for j in range(endpoints)]
        objects.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-abcde", "namespace": NAMESPACE,
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": n, "protocol": p, "port": target_port} for n, p, _ in PORTS],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses]})
    return Workload(services, endpoints, objects)
