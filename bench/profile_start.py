"""Profiling harness (bench/README.md, "Profile"): a 10k x 10 start of the real agent from yaml / json / kube, under py-spy
(all threads) or with tracemalloc (SIGUSR2 snapshot at ready), outside any lab netns."""
import os, signal, subprocess, sys, time, shutil, json
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
PY_SPY = os.environ.get("PY_SPY", "py-spy")
SITE = '# profiling hook (scratch, not project code): SIGUSR2 dumps a tracemalloc snapshot\nimport os, signal, tracemalloc\nif os.environ.get("BPFP_TRACEMALLOC_OUT"):\n    tracemalloc.start(25)\n    def _dump(*_):\n        snap = tracemalloc.take_snapshot()\n        snap.dump(os.environ["BPFP_TRACEMALLOC_OUT"])\n        open(os.environ["BPFP_TRACEMALLOC_OUT"] + ".done", "w").close()\n    signal.signal(signal.SIGUSR2, _dump)\n'
from bench import sources, workload
from bench.topology import AgentClient
MODE, SOURCE = sys.argv[1], sys.argv[2]        # plain|churn|pyspy|tracemalloc|churn-pyspy, yaml|json|kube
N, E = int(sys.argv[3]) if len(sys.argv) > 3 else 10000, 10
W = Path(f"/tmp/bpfp-profile-{SOURCE}")
shutil.rmtree(W, ignore_errors=True); (W / "manifests").mkdir(parents=True)
cg = Path([l.split()[1] for l in open("/proc/mounts") if l.split()[2] == "cgroup2"][0]) / "bpfp-prof"
cg.mkdir(exist_ok=True)
pin = "/sys/fs/bpf/bpfp-prof"
objects = workload.make(N, E).objects
kube = None
if SOURCE == "kube":
    from tests.kubeapi import FakeKubeApi, node
    kube = FakeKubeApi(); kube.start(); kube.put(node("bpfp-node", ["127.0.0.1"]), *objects)
    src = ["--kubeconfig", str(kube.write_kubeconfig(W / "kubeconfig"))]
else:
    sources._publish(sources.write_objects(W / "manifests", objects, SOURCE))
    src = ["--manifests", str(W / "manifests")]
env = dict(os.environ)
if MODE == "tracemalloc":
    (W / "site").mkdir(exist_ok=True)
    (W / "site" / "sitecustomize.py").write_text(SITE)
    env["PYTHONPATH"] = str(W / "site")
    env["BPFP_TRACEMALLOC_OUT"] = str(W / "tm.snap")
argv = [sys.executable, "-m", "agent.cli", "agent", *src, "--cgroup", str(cg),
        "--bpffs", pin, "--api", f"unix://{W}/api.sock", "--node-name", "bpfp-node",
        "--node-ip", "127.0.0.1", "--metrics", "off", "--healthz", "off", "--sync-period", "3600",
        "--max-frontends", "262144", "--max-backend-slots", "2097152"]
if MODE.endswith("pyspy"):
    argv = [PY_SPY, "record", "--format", "raw", "--rate", "200", "--nonblocking",
            "--subprocesses", "-o", str(W / f"{MODE}.txt"), "--"] + argv
t0 = time.time()
p = subprocess.Popen(argv, cwd=str(Path(__file__).resolve().parents[1]), env=env, stdout=open(W / "agent.log", "w"), stderr=subprocess.STDOUT)
try:
    while not (W / "api.sock").exists():
        time.sleep(0.01)
    c = AgentClient(f"unix://{W}/api.sock")
    st = c.wait(lambda s: s.synced and s.service_ports == 2 * N, timeout=900)
    kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    agent_pid = int(kids[0]) if MODE.endswith("pyspy") and kids else p.pid
    mem = {l.split(":")[0]: int(l.split()[1]) // 1024 for l in open(f"/proc/{agent_pid}/status") if l.startswith(("VmRSS", "VmHWM"))}
    polls = []                     # GetStatus as a client polling it sees it, 20 calls 50 ms apart
    for _ in range(20):
        b = time.perf_counter(); c.status(); polls.append(time.perf_counter() - b); time.sleep(0.05)
    polls.sort()
    print(f"{SOURCE}: ready after {st.last_sync_unix - t0:.2f}s (last sync {st.last_sync_seconds:.2f}s) "
          f"rss {mem['VmRSS']} MiB peak {mem['VmHWM']} MiB; GetStatus median {polls[10]*1e3:.1f} ms "
          f"(min {polls[0]*1e3:.1f}, max {polls[-1]*1e3:.1f})", flush=True)
    if MODE in ("churn", "churn-pyspy", "tracemalloc"):
        # churn: every slice rewritten
        new = sources.with_extra_endpoint(objects)
        want = 2 * N * (E + 1)
        if SOURCE == "kube":
            cpu0 = sources.cpu_seconds(p.pid); s0 = c.status(); b = time.time(); kube.put(*new)
        else:
            # the staged files' events pass first; the clock starts at the renames
            staged = sources.write_objects(W / "manifests", new, SOURCE); time.sleep(2)
            cpu0 = sources.cpu_seconds(p.pid); s0 = c.status(); b = time.time(); sources._publish(staged)
        st = c.wait(lambda s: s.backends == want and s.last_sync_unix > b, timeout=900, poll=0.05)
        # the agent's CPU time (and its children's), rewrite -> kernel; syncs it took
        print(f"{SOURCE}: churn -> kernel {st.last_sync_unix - b:.2f}s cpu "
              f"{sources.cpu_seconds(p.pid) - cpu0:.2f}s syncs {st.syncs - s0.syncs} "
              f"full {st.full_syncs - s0.full_syncs}", flush=True)
    if MODE == "tracemalloc":
        os.kill(p.pid, signal.SIGUSR2)
        while not Path(str(W / "tm.snap") + ".done").exists():
            time.sleep(0.1)
    c.close()
finally:
    # py-spy forwards nothing: stop the agent (the child of py-spy, or p itself)
    kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    target = int(kids[0]) if MODE.endswith("pyspy") and kids else p.pid
    os.kill(target, signal.SIGTERM)
    p.wait(timeout=120)
    if kube: kube.stop()
    subprocess.run([sys.executable, "-m", "agent.cli", "cleanup", "--bpffs", pin, "--cgroup", str(cg)], cwd=str(Path(__file__).resolve().parents[1]), capture_output=True)
    try: cg.rmdir()
    except OSError: pass
