"""The first full sync's pure parts in one process (bench/README.md, "Hot types, third pass"):
N services x E endpoints (bench/workload.py) parsed as the kube source does (parse_service,
parse_endpoint_slice of decoded JSON), then desired_state, by_scope and plan against an empty
kernel. Prints each part's process time; TM=1 adds tracemalloc: what each part keeps, and
the largest holders once the plan's operations are dropped (as the agent drops them).

  python bench/profile_model.py [N [E]]          (cwd = the tree to measure)
  TM=1 python bench/profile_model.py 10000 10"""
import gc
import ipaddress
import json
import os
import sys
import time
import tracemalloc

sys.path.insert(0, os.getcwd())

from agent.model import NodeContext, desired_state  # noqa: E402
from agent.model.objects import parse_endpoint_slice, parse_service  # noqa: E402
from agent.planner import plan  # noqa: E402
from agent.planner.scopes import by_scope  # noqa: E402
from bench import workload  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    e = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    traced = os.environ.get("TM") == "1"
    objects = json.loads(json.dumps(workload.make(n, e).objects))
    gc.disable()                  # as the agent during its first sync
    if traced:
        tracemalloc.start()

    def mark() -> int:
        return tracemalloc.get_traced_memory()[0] if traced else 0

    times, sizes = [time.process_time()], [mark()]
    services = [parse_service(o) for o in objects if o["kind"] == "Service"]
    slices = [parse_endpoint_slice(o) for o in objects if o["kind"] == "EndpointSlice"]
    times.append(time.process_time())
    sizes.append(mark())
    node = NodeContext.from_node(None, "node-a", (ipaddress.ip_address("192.168.1.1"),))
    desired = desired_state(services, slices, node)
    times.append(time.process_time())
    sizes.append(mark())
    parts = by_scope(desired)
    times.append(time.process_time())
    sizes.append(mark())
    result = plan(parts, {})
    times.append(time.process_time())
    sizes.append(mark())
    del objects
    names = ("parse", "model", "by_scope", "plan")
    print("  ".join(f"{name} {b - a:.2f}s" for name, a, b in zip(names, times, times[1:],
                                                                   strict=False))
          + f"  ops {len(result.ops)}")
    if traced:
        print("  ".join(f"{name} {(b - a) / 2**20:.1f} MiB" for name, a, b in
                        zip(names, sizes, sizes[1:], strict=False)) + " (plan with its ops)")
        applied = result.result    # noqa: F841  (kept, as the agent keeps it)
        del result
        gc.collect()
        print(f"kept after the plan, its ops dropped: {(mark() - sizes[0]) / 2**20:.1f} MiB")
        for stat in tracemalloc.take_snapshot().statistics("lineno")[:15]:
            frame = stat.traceback[0]
            print(f"{stat.size / 2**20:6.1f} MiB {stat.count:8d}  "
                  f"{'/'.join(frame.filename.split('/')[-3:])}:{frame.lineno}")


if __name__ == "__main__":
    main()
