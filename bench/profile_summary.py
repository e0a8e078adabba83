"""Profiling harness (bench/README.md, "Profile"): aggregate py-spy raw (collapsed) stacks: top functions by inclusive (cumulative) share,
and by area (yaml/json parsing, model, planner, packing, syscalls, api encoding)."""
import sys, re, collections
incl, self_ = collections.Counter(), collections.Counter()
total = 0
areas = collections.Counter()
AREAS = [("yaml parse", ("yaml/", "_yaml", "CSafeLoader", "construct_", "load_all")),
         ("json parse", ("json/decoder", "json/__init__.py:loads", "raw_decode")),
         ("kube client decode", ("kubernetes/client/api_client", "deserializ", "urllib3", "http/client", "socket.py")),
         ("source (manifests/kube)", ("agent/sources/",)),
         ("model", ("agent/model/",)),
         ("planner", ("agent/planner/",)),
         ("packing + map writes", ("agent/datapath/maps.py", "agent/datapath/bpfsys", "ctypes")),
         ("api encoding", ("agent/api/", "grpc", "protobuf")),
         ("agent loop", ("agent/agent.py", "agent/changes.py", "agent/budget.py", "agent/runner.py",
                         "agent/sync_step.py", "agent/cleanup.py", "agent/status.py")),
         ("bcc compile/load", ("bcc/", "agent/datapath/loader")),
         ]
IDLE = ("select (selectors.py", "_worker (concurrent/futures/thread.py", "wait (threading.py",
        "WorkerThread.run (anyio", "_bootstrap", "get (queue.py")
for line in open(sys.argv[1]):
    line = line.rstrip()
    if not line: continue
    stack, _, n = line.rpartition(" ")
    n = int(n)
    frames = [f for f in stack.split(";") if not f.startswith("process ")]
    if not frames:
        continue
    leaf = frames[-1]
    if any(w in leaf for w in IDLE):
        continue                    # a thread waiting, not working
    total += n
    seen = set()
    for f in frames:
        key = re.sub(r":\d+\)$", ")", f)   # function (file) without line
        if key not in seen:
            incl[key] += n; seen.add(key)
    self_[re.sub(r":\d+\)$", ")", frames[-1])] += n
    # area: the innermost frame that matches an area
    area = "other"
    for f in reversed(frames):
        hit = next((a for a, pats in AREAS if any(p in f for p in pats)), None)
        if hit: area = hit; break
    areas[area] += n
print(f"busy samples {total}")
print("\n# by area (innermost matching frame)")
for a, n in areas.most_common(): print(f"{100*n/total:5.1f}%  {a}")
print("\n# top inclusive")
for k, n in incl.most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 40): print(f"{100*n/total:5.1f}%  {k[:150]}")
print("\n# top self")
for k, n in self_.most_common(25): print(f"{100*n/total:5.1f}%  {k[:150]}")
