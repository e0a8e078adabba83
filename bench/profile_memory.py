"""Memory profile of an agent start (bench/README.md, "Memory profile (issue 16)").

  profile_memory.py plain SOURCE N E        start -> ready, RSS, peak, anon/file RSS; SMAPS=1
                                            adds the largest mappings (which libraries)
  profile_memory.py tracemalloc SOURCE N E  the same, then a tracemalloc snapshot taken in the
                                            agent at ready (TM_FRAMES frames, default 1: more
                                            slow a 10k start down by minutes)
  profile_memory.py top SNAPSHOT [K] [lineno|filename]   the K largest holders

SOURCE: yaml | json (one object per file) | kube (tests/kubeapi.py with paging). N services
with E endpoints each (bench/workload.py), outside any lab. TREE=/path runs the agent of
another checkout (a "before" tree; its .venv and agent/api/generated must be there)."""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

SITE = """# profiling hook: SIGUSR2 dumps a tracemalloc snapshot
import os, signal, tracemalloc
if os.environ.get("BPFP_TRACEMALLOC_OUT"):
    tracemalloc.start(int(os.environ.get("TM_FRAMES", "1")))
    def _dump(*_):
        tracemalloc.take_snapshot().dump(os.environ["BPFP_TRACEMALLOC_OUT"])
        open(os.environ["BPFP_TRACEMALLOC_OUT"] + ".done", "w").close()
    signal.signal(signal.SIGUSR2, _dump)
"""


def top(path: str, count: int = 30, key: str = "lineno") -> None:
    snapshot = tracemalloc.Snapshot.load(path)
    stats = snapshot.statistics(key)
    print(f"traced {sum(s.size for s in stats) / 2**20:.1f} MiB")
    for s in stats[:count]:
        frame = s.traceback[0]
        where = "/".join(frame.filename.split("/")[-3:])
        print(f"{s.size / 2**20:6.1f} MiB {s.count:8d}  {where}:{frame.lineno}")


def status(pid: int) -> dict[str, int]:
    return {line.split(":")[0]: int(line.split()[1]) // 1024
            for line in open(f"/proc/{pid}/status")
            if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile"))}


def mappings(pid: int, count: int = 8) -> list[tuple[str, int]]:
    rss: dict[str, int] = {}
    current = "[anon]"
    for line in open(f"/proc/{pid}/smaps"):
        parts = line.split()
        if not parts[0].endswith(":"):
            current = parts[5] if len(parts) > 5 else "[anon]"
        elif parts[0] == "Rss:":
            rss[current] = rss.get(current, 0) + int(parts[1]) // 1024
    return sorted(rss.items(), key=lambda item: -item[1])[:count]


def start(mode: str, source: str, n: int, e: int) -> None:
    tree = Path(os.environ.get("TREE", Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(tree))
    from bench import sources, workload
    from bench.topology import AgentClient
    work = Path(f"/tmp/bpfp-memprof-{source}-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    (work / "manifests").mkdir(parents=True)
    cgroup2 = [line.split()[1] for line in open("/proc/mounts") if line.split()[2] == "cgroup2"]
    cgroup = Path(cgroup2[0]) / f"bpfp-memprof-{os.getpid()}"
    cgroup.mkdir(exist_ok=True)
    pins = f"/sys/fs/bpf/bpfp-memprof-{os.getpid()}"
    objects = workload.make(n, e).objects if n else []
    kube = None
    if source == "kube":
        from tests.kubeapi import FakeKubeApi, node
        kube = FakeKubeApi()
        kube.start()
        kube.put(node("bpfp-node", ["127.0.0.1"]), *objects)
        args = ["--kubeconfig", str(kube.write_kubeconfig(work / "kubeconfig"))]
    else:
        sources._publish(sources.write_objects(work / "manifests", objects, source))
        args = ["--manifests", str(work / "manifests")]
    del objects
    env = dict(os.environ)
    if mode == "tracemalloc":
        (work / "site").mkdir()
        (work / "site" / "sitecustomize.py").write_text(SITE)
        env["PYTHONPATH"] = str(work / "site")
        env["BPFP_TRACEMALLOC_OUT"] = str(work / "tm.snap")
    python = str(tree / ".venv/bin/python")
    argv = [python, "-m", "agent.cli", "agent", *args, "--cgroup", str(cgroup),
            "--bpffs", pins, "--api", f"unix://{work}/api.sock", "--node-name", "bpfp-node",
            "--node-ip", "127.0.0.1", "--metrics", "off", "--healthz", "off",
            "--sync-period", "3600", "--max-frontends", "262144",
            "--max-backend-slots", "2097152"]
    began = time.time()
    agent = subprocess.Popen(argv, cwd=str(tree), env=env, stdout=open(work / "agent.log", "w"),
                             stderr=subprocess.STDOUT)
    try:
        while not (work / "api.sock").exists():
            if agent.poll() is not None:
                raise SystemExit((work / "agent.log").read_text()[-3000:])
            time.sleep(0.01)
        client = AgentClient(f"unix://{work}/api.sock")
        st = client.wait(lambda s: s.synced and s.service_ports == 2 * n, timeout=1800)
        time.sleep(1.0)            # what the sync left behind is released
        mem = status(agent.pid)
        print(f"{source} {n}x{e}: ready {st.last_sync_unix - began:.2f}s (sync "
              f"{st.last_sync_seconds:.2f}s) rss {mem['VmRSS']} peak {mem['VmHWM']} anon "
              f"{mem['RssAnon']} file {mem['RssFile']} MiB", flush=True)
        if os.environ.get("SMAPS"):
            for name, mib in mappings(agent.pid):
                print(f"  {mib:5d} MiB {name}")
        if mode == "tracemalloc":
            os.kill(agent.pid, signal.SIGUSR2)
            while not Path(f"{work}/tm.snap.done").exists():
                time.sleep(0.1)
            kept = Path(f"/tmp/bpfp-memprof-{source}-{n}x{e}.snap")
            shutil.copy(work / "tm.snap", kept)
            print(f"snapshot: {kept}")
        client.close()
    finally:
        agent.terminate()
        agent.wait(timeout=300)
        if kube:
            kube.stop()
        subprocess.run([python, "-m", "agent.cli", "cleanup", "--bpffs", pins, "--cgroup",
                        str(cgroup)], cwd=str(tree), capture_output=True)
        with contextlib.suppress(OSError):
            cgroup.rmdir()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1] == "top":
        top(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 30,
            sys.argv[4] if len(sys.argv) > 4 else "lineno")
    else:
        start(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
