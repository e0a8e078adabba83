"""Profiling harness (bench/README.md, "Profile"): the parts issue 16 changed, timed in two trees
side by side, interleaved rep by rep (each part of each tree in its own process, the tree's code).

  python bench/profile_parts.py --before DIR --after DIR [--reps 3] [--services 10000]

Parts, at N services x 10 endpoints: the manifest source's first pass over a directory of one
object per file (yaml, json: listing, open, read, parse, admission, typed objects), a pass over
the unchanged directory, a pass after one file changed; the kube source's list pages made typed
objects (json.loads + _Reflector._parse per item); the map writes of a full sync packed as
BpfServiceMaps.apply does (the batch syscall replaced by a no-op: packing only)."""
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORK = Path("/tmp/bpfp-parts")


def median_of(values: list[float]) -> float:
    return statistics.median(values)


# --- workers: run with cwd = a tree, importing that tree's agent --------------------------

def source_part(form: str) -> dict:
    from agent.sources.manifests import ManifestSource
    directory = WORK / f"m-{form}"
    source = ManifestSource(directory)
    begin = time.perf_counter()
    changes = source.rescan()
    first = time.perf_counter() - begin
    again = []
    for _ in range(5):
        begin = time.perf_counter()
        source.rescan()
        again.append(time.perf_counter() - begin)
    one = []
    victim = sorted(p for p in os.listdir(directory) if not p.startswith("."))[-1]
    for i in range(3):
        os.utime(directory / victim, ns=(time.time_ns(), time.time_ns() + i + 1))
        begin = time.perf_counter()
        source.rescan()
        one.append(time.perf_counter() - begin)
    return {"objects": len(changes), "first_s": first, "unchanged_pass_s": median_of(again),
            "one_file_pass_s": median_of(one)}


def kube_part(services: int) -> dict:
    import threading

    from agent.model.objects import parse_endpoint_slice, parse_service
    from agent.sources import kube
    from bench import workload
    objects = workload.make(services, 10).objects
    pages = []
    for kind, api_version, parse in (("Service", "v1", parse_service),
                                     ("EndpointSlice", "discovery.k8s.io/v1",
                                      parse_endpoint_slice)):
        items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")}
                 for o in objects if o["kind"] == kind]
        resource = kube.Resource(kind, api_version, None, parse)
        for i in range(0, len(items), kube.PAGE_SIZE):
            pages.append((resource, json.dumps({"items": items[i:i + kube.PAGE_SIZE]}).encode()))
    del objects
    begin = time.perf_counter()
    parsed = 0
    for resource, page in pages:
        reflector = kube._Reflector(None, resource, None, threading.Event())
        for raw in json.loads(page)["items"]:
            parsed += reflector._parse(raw)[1] is not None
    return {"objects": parsed, "list_to_typed_s": time.perf_counter() - begin}


def pack_part(services: int) -> dict:
    import ipaddress

    from agent.datapath import bpfsys, layout, maps
    from agent.model.types import Protocol
    from agent.planner import BackendAddr, FrontendKey, PutFrontend, PutSlot
    bpfsys.map_update_batch = lambda fd, keys, values, count: (count, 0)   # packing only
    door = maps.BpfServiceMaps.__new__(maps.BpfServiceMaps)

    def pinned(table: str) -> maps.PinnedMap:
        m = maps.PinnedMap.__new__(maps.PinnedMap)
        m.spec, m.fd, m.max_entries, m.path = layout.MAPS[table], -1, 1 << 24, Path(table)
        return m
    door.svc, door.slots = {4: pinned("bpfp_svc4")}, {4: pinned("bpfp_slot4")}
    v4 = ipaddress.IPv4Address
    ops = [PutSlot(4, s, i, BackendAddr(v4(0x0AF50000 + s * 10 + i), 8080))
           for s in range(2 * services) for i in range(10)]
    ops += [PutFrontend(FrontendKey(v4(0x0A600000 + s), 80, Protocol.TCP), s, 10)
            for s in range(2 * services)]
    runs = []
    for _ in range(3):
        begin = time.perf_counter()
        door.apply(ops)
        runs.append(time.perf_counter() - begin)
    return {"entries": len(ops), "pack_s": median_of(runs)}


def worker(part: str, argument: str) -> None:
    sys.path.insert(0, os.getcwd())
    result = {"source": lambda: source_part(argument), "kube": lambda: kube_part(int(argument)),
              "pack": lambda: pack_part(int(argument))}[part]()
    print(json.dumps(result))


# --- driver -------------------------------------------------------------------------------

def main() -> None:
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", required=True)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--services", type=int, default=10000)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import sources, workload
    objects = workload.make(args.services, 10).objects
    for form in ("yaml", "json"):
        directory = WORK / f"m-{form}"
        subprocess.run(["rm", "-rf", str(directory)], check=True)
        directory.mkdir(parents=True)
        sources._publish(sources.write_objects(directory, objects, form))
    del objects
    parts = [("source", "yaml"), ("source", "json"), ("kube", str(args.services)),
             ("pack", str(args.services))]
    results: dict = {}
    for rep in range(args.reps):
        for part, argument in parts:
            for label, tree in (("before", args.before), ("after", args.after)):
                out = subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--worker", part, argument],
                    cwd=tree, capture_output=True, text=True, check=True).stdout
                for name, value in json.loads(out.splitlines()[-1]).items():
                    results.setdefault((part, argument, name), {}).setdefault(
                        label, []).append(value)
            print(f"rep {rep + 1}/{args.reps} {part} {argument} done", file=sys.stderr)
    print(f"| part ({args.services:,} x 10) | figure | before: median (min-max) | "
          f"after: median (min-max) |\n|---|---|---|---|")
    for (part, argument, name), by_label in results.items():
        if name in ("objects", "entries"):
            continue
        cells = [f"{median_of(v):.3f} s ({min(v):.3f}-{max(v):.3f})"
                 for v in (by_label["before"], by_label["after"])]
        print(f"| {part} {argument} | {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
