"""`make demo`: a lab node with three backend pods and a client, the real agent on
examples/manifests, real TCP and UDP to a ClusterIP; then a scale-down followed live. Then
two nodes with an agent each and a client outside: NodePort through the TC programs."""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

from lab import Lab, manifests
from lab.agent_runner import AgentRunner
from lab.cluster import Cluster

EXAMPLES = Path(__file__).resolve().parent / "manifests"
VIP = "10.96.0.10"
BACKENDS = ["backend-a", "backend-b", "backend-c"]


def say(text: str = "") -> None:
    print(text, flush=True)


def spread(title: str, tcp, udp) -> None:
    say(f"\n{title}")
    say(f"  {'backend':<12}{'TCP conns':>10}{'UDP reqs':>10}")
    tcp_by = Counter({a.split(':')[0]: n for a, n in tcp.answers.items()})
    udp_by = Counter({a.split(':')[0]: n for a, n in udp.answers.items()})
    for name in BACKENDS:
        say(f"  {name:<12}{tcp_by[name]:>10}{udp_by[name]:>10}")
    errors = tcp.errors + udp.errors
    say(f"  {'errors':<12}{sum(tcp.errors.values()):>10}{sum(udp.errors.values()):>10}"
        + (f"   {dict(errors)}" if errors else ""))
    if udp.wrong_source or tcp.wrong_peer:
        say(f"  !! replies from the wrong address: udp {udp.wrong_source}, tcp {tcp.wrong_peer}")


def scale_down(manifest: Path, remove: str) -> None:
    """Edit the EndpointSlice as the endpoints controller would when a pod goes away."""
    docs = list(yaml.safe_load_all(manifest.read_text()))
    for doc in docs:
        if doc.get("kind") == "EndpointSlice":
            doc["endpoints"] = [e for e in doc["endpoints"]
                                if e.get("targetRef", {}).get("name") != remove]
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    os.replace(tmp, manifest)


def main() -> int:
    started = time.monotonic()
    with Lab("demo") as lab:
        pods = [lab.add_pod(name) for name in BACKENDS]
        client = lab.add_pod("client")
        for pod in pods:
            pod.start_server([8080, 5353], udp=True)
        say(f"lab: node {lab.node_netns} ({lab.node_ip}), pods "
            + ", ".join(f"{p.name} {p.ip}" for p in pods) + f", client {client.ip}")

        directory = lab.workdir / "manifests"
        shutil.copytree(EXAMPLES, directory)
        with AgentRunner(lab, directory) as agent:
            t0 = time.monotonic()
            agent.start()
            say(f"agent: compiled, attached to {lab.cgroup}, first sync in the kernel after "
                f"{time.monotonic() - t0:.1f}s")
            say("  " + agent.cli("status", "--api", agent.api).stdout.strip())

            tcp = client.tcp(VIP, 80, count=300)
            udp = client.udp(VIP, 53, count=300)
            spread(f"300 TCP connections to {VIP}:80 and 300 UDP requests to {VIP}:53:", tcp, udp)

            refused = client.tcp("10.96.0.20", 80, count=5)
            say(f"\nservice demo/no-pods (10.96.0.20:80, no endpoints): "
                f"{dict(refused.errors)} (kube-proxy rejects too)")

            say("\nscaling down: backend-c leaves the EndpointSlice (manifest edited)")
            t0 = time.monotonic()
            scale_down(directory / "web.yaml", "backend-c")
            while len(next(s for s in agent.services()
                           if s["port_name"] == "http")["backends"]) != 2:
                if time.monotonic() - t0 > 10:
                    say("!! the agent did not follow the edit within 10s")
                    return 1
                time.sleep(0.02)
            say(f"  in the kernel after {1000 * (time.monotonic() - t0):.0f} ms")
            tcp = client.tcp(VIP, 80, count=300)
            udp = client.udp(VIP, 53, count=300)
            spread("the same traffic again:", tcp, udp)

            say("\n$ bpfproxy services")
            say(agent.cli("services", "--api", agent.api).stdout.rstrip())
            say("\n$ bpfproxy stats --name web")
            say(agent.cli("stats", "--api", agent.api, "--name", "web").stdout.rstrip())
            agent.stop(signal.SIGTERM)
            after = client.tcp(VIP, 80, count=20)
            say(f"\nagent stopped (SIGTERM): programs and maps stay, "
                f"{sum(after.answers.values())}/20 connections still served")
            removed = agent.cleanup().stdout.count("removed ")
            say(f"$ bpfproxy cleanup: removed {removed} pinned links and maps")
        ok = sum(tcp.answers.values()) == 300 and sum(udp.answers.values()) == 300 \
            and not any(a.startswith("backend-c") for a in tcp.answers)
    ok = nodeport() and ok
    say(f"\ndone in {time.monotonic() - started:.0f}s; labs removed")
    return 0 if ok else 1


def nodeport() -> bool:
    """Traffic from outside the nodes, through each node's TC programs."""
    say("\n--- NodePort: two nodes, an agent on each, a client outside ---")
    with Cluster("demonp") as cluster:
        a, b = cluster.add_pod(1, "pod-a"), cluster.add_pod(2, "pod-b")
        for pod in (a, b):
            pod.start_server([8080], peer=True)   # answers with the client address it saw
        directory = cluster.nodes[1].workdir / "np-manifests"
        port = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
        endpoints = [{"name": "http", "port": 8080, "protocol": "TCP"}]
        for name, node_port, policy, pods in (("web", 30080, "Cluster", (a, b)),
                                              ("web-local", 30081, "Local", (a,))):
            manifests.write(directory, f"{name}.yaml", manifests.service(
                name, f"10.96.1.{node_port - 30000}", [{**port[0], "nodePort": node_port}],
                service_type="NodePort", external_traffic_policy=policy),
                manifests.endpoint_slice(name, [p.ip for p in pods], endpoints,
                                         nodes={a.ip: "node1", b.ip: "node2"}))
        cluster.start_agents(directory)
        n1, n2 = cluster.node_ip(1), cluster.node_ip(2)
        say(f"nodes {n1} (pod-a {a.ip}) and {n2} (pod-b {b.ip}); client "
            f"{cluster.external.ip}, which has no route to any pod")
        ok = True
        for title, node, node_port, count in (
                ("externalTrafficPolicy Cluster via node 1", n1, 30080, 100),
                ("externalTrafficPolicy Local via node 1", n1, 30081, 100),
                ("externalTrafficPolicy Local via node 2", n2, 30081, 5)):   # each times out
            result = cluster.external.tcp(node, node_port, count=count, timeout=0.5)
            say(f"\n{title} ({node}:{node_port}), {count} connections:")
            for answer, n in sorted(result.answers.items()):
                server, _, seen = answer.partition("@")
                say(f"  {server.split(':')[0]:<8}{n:>4}  saw the client as {seen}")
            if result.errors:
                say(f"  failed  {sum(result.errors.values()):>4}  {dict(result.errors)}")
            ok = ok and result.wrong_peer == 0
        say("\n(Cluster: the remote backend sees node 1's address, SNAT brings its replies "
            "back;\n Local: the client's own address, and node 2, with no local endpoint, "
            "drops.)")
        return ok


if __name__ == "__main__":
    sys.exit(main())
