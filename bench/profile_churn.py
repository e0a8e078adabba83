"""Profiling harness (bench/README.md, "Churn and one-file changes, third pass"): the parts of
a change's path, in process, CPU time (process_time), in a tree given (its agent imported):

  python bench/profile_churn.py TREE one-file N [ENDPOINTS]   # a watcher-woken pass for one
                                                              # changed file among N services'
  python bench/profile_churn.py TREE source-churn N           # the pass after every file of
                                                              # N x 10 json rewritten (slices +1)
  python bench/profile_churn.py TREE step N SHARE...          # the sync step's compute, full vs
                                                              # the changed services only
Files are written under /tmp/bpfp-churn-parts (one object per file, json)."""
import gc
import ipaddress
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

TREE, WHAT, N = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, TREE)
from bench import sources, workload  # noqa: E402

WORK = Path("/tmp/bpfp-churn-parts")


def directory(name: str, objects: list[dict]) -> Path:
    d = WORK / name
    if not d.exists():
        d.mkdir(parents=True)
        sources._publish(sources.write_objects(d, objects, "json"))
    return d


def one_file(endpoints: int) -> None:
    from agent.sources.manifests import ManifestSource
    d = directory(f"one-{N}x{endpoints}", workload.make(N, endpoints).objects)
    source = ManifestSource(d)
    source.rescan()
    names = sorted(p.name for p in d.iterdir() if p.name.startswith("endpointslice"))[:20]
    cpu = []
    for i, name in enumerate(names):
        obj = json.loads((d / name).read_text())
        obj["endpoints"][0]["addresses"] = [f"10.{random.randrange(200, 250)}.{i}.1"]
        (d / name).write_text(json.dumps(obj))
        begin = time.process_time()
        # a tree before the watcher-woken pass had one kind of pass: the whole directory
        changes = source.rescan_names({name}) if hasattr(source, "rescan_names") else \
            source.rescan({name})
        cpu.append(time.process_time() - begin)
        assert len(changes) == 1, changes
    print(f"{TREE}: one file changed among {len(list(d.iterdir()))} files: pass CPU median "
          f"{statistics.median(cpu) * 1e3:.1f} ms (min {min(cpu) * 1e3:.1f}, max "
          f"{max(cpu) * 1e3:.1f})")


def source_churn() -> None:
    from agent.sources.manifests import ManifestSource
    d = WORK / f"churn-{N}"
    shutil.rmtree(d, ignore_errors=True)
    objects = workload.make(N, 10).objects
    d = directory(f"churn-{N}", objects)
    source = ManifestSource(d)
    source.rescan()
    gc.collect()
    gc.freeze()
    staged = sources.write_objects(d, sources.with_extra_endpoint(objects), "json")
    sources._publish(staged)
    names = {final.name for _, final in staged}
    begin = time.process_time()
    changes = source.rescan_names(names) if hasattr(source, "rescan_names") else \
        source.rescan(names)
    print(f"{TREE}: every file rewritten ({len(names)}), the pass: CPU "
          f"{time.process_time() - begin:.2f} s, {len(changes)} changes")


def step(shares: list[float], reps: int = 3) -> None:
    from agent.changes import ChangeTracker
    from agent.model.objects import parse_object
    from agent.model.types import NodeContext
    from agent.sources.events import ObjectChange
    from agent.sync_step import SyncStep
    objects = workload.make(N, 10).objects
    node = NodeContext("bpfp-node", (ipaddress.ip_address("10.0.0.1"),), ())

    def changes(raw):
        return [ObjectChange(o.key, o) for o in map(parse_object, raw)]

    tracker = ChangeTracker("bpfp-node")
    tracker.record_batch(changes(objects))
    taken = tracker.checkout()
    sync = SyncStep(lambda family, protocol: True, 0, False)
    first = sync.compute(True, tracker.snapshot(True, taken.services, node), frozenset(), {},
                         None, None)
    previous, _ = sync.commit(first)
    slices = [o for o in objects if o["kind"] == "EndpointSlice"]
    grown = [o for o in sources.with_extra_endpoint(objects) if o["kind"] == "EndpointSlice"]
    gc.collect()
    gc.freeze()          # as the agent does after a full sync
    for share in shares:
        k = int(share * N)
        tracker.record_batch(changes(grown[:k]))
        taken = tracker.checkout()
        cpu: dict[str, list[float]] = {"full": [], "changes": []}
        for _ in range(reps):
            for mode in cpu:
                full = mode == "full"
                begin = time.process_time()
                sync.compute(full, tracker.snapshot(full, taken.services, node), frozenset(),
                             previous.result, previous, None)
                cpu[mode].append(time.process_time() - begin)
        print(f"{TREE}: {share:.0%} of {N} services changed: compute CPU full "
              f"{statistics.median(cpu['full']):.2f} s, changed only "
              f"{statistics.median(cpu['changes']):.2f} s (min {min(cpu['full']):.2f} / "
              f"{min(cpu['changes']):.2f})", flush=True)
        tracker.record_batch(changes(slices[:k]))        # back to what the plan holds
        tracker.checkout()


if WHAT == "one-file":
    one_file(int(sys.argv[4]) if len(sys.argv) > 4 else 10)
elif WHAT == "source-churn":
    source_churn()
elif WHAT == "step":
    step([float(s) for s in sys.argv[4:]])
else:
    sys.exit(__doc__)
