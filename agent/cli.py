"""The bpfproxy command line: argument parsing and printing only.

The flags are held stable (scripts and tests rely on them); flags whose feature comes in a
later release are accepted now and say so in their help."""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from agent.datapath.config import DEFAULT_PIN_DIR

DEFAULT_API = "unix:///run/bpfproxy/api.sock"
LATER = "(accepted; used from a later release)"


def find_cgroup2_mount() -> Path:
    """cgroup v2 may be /sys/fs/cgroup or, in a hybrid layout, /sys/fs/cgroup/unified."""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    raise SystemExit("bpfproxy: no cgroup v2 mount found in /proc/mounts; "
                     "mount one (mount -t cgroup2 none /sys/fs/cgroup/unified)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bpfproxy", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default=os.environ.get("BPFPROXY_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    agent = sub.add_parser("agent", help="run the node agent")
    src = agent.add_mutually_exclusive_group()
    src.add_argument("--manifests", type=Path, metavar="DIR",
                     help="read Services and EndpointSlices from *.yaml/*.yml/*.json in DIR")
    src.add_argument("--kubeconfig", type=Path, metavar="FILE",
                     help=f"watch the Kubernetes API {LATER}")
    agent.add_argument("--node-name", default=socket.gethostname())
    agent.add_argument("--node-ip", default="", metavar="IP[,IP]",
                       help="this node's addresses: NodePorts are served on them (default: "
                            "the addresses of the Node object named --node-name)")
    agent.add_argument("--nodeport-addresses", default="", metavar="CIDR[,CIDR]",
                       help="only node addresses in these CIDRs serve NodePorts "
                            "(kube-proxy's --nodeport-addresses)")
    agent.add_argument("--interfaces", default="", metavar="IF[,IF]",
                       help=f"interfaces for the TC NodePort programs {LATER}")
    agent.add_argument("--cgroup", type=Path, metavar="CGROUP2_DIR",
                       help="cgroup v2 directory the socket programs attach to "
                            "(default: the cgroup2 mount, i.e. every process)")
    agent.add_argument("--bpffs", type=Path, default=DEFAULT_PIN_DIR, metavar="DIR",
                       help="where maps and program links are pinned")
    agent.add_argument("--api", default=DEFAULT_API, metavar="ADDR")
    agent.add_argument("--metrics", default="", metavar="ADDR", help=f"Prometheus {LATER}")
    agent.add_argument("--healthz", default="", metavar="ADDR", help=f"health {LATER}")
    agent.add_argument("--min-sync-period", type=float, default=0.1, metavar="SECONDS")
    agent.add_argument("--sync-period", type=float, default=30.0, metavar="SECONDS")

    status = sub.add_parser("status", help="exit 0 once the first full sync is in the kernel")
    status.add_argument("--api", default=DEFAULT_API, metavar="ADDR")
    status.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="keep asking until synced or SECONDS have passed")

    services = sub.add_parser("services", help="list service ports as the kernel serves them")
    services.add_argument("--api", default=DEFAULT_API, metavar="ADDR")
    services.add_argument("-o", "--output", choices=["table", "json"], default="table")

    cleanup = sub.add_parser("cleanup", help="remove every program, link and map installed")
    cleanup.add_argument("--cgroup", type=Path, metavar="DIR",
                         help="also check that no program is left attached here")
    cleanup.add_argument("--bpffs", type=Path, default=DEFAULT_PIN_DIR, metavar="DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # one line per file change is noise at info level; our source logs what matters
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    return {"agent": run_agent, "status": show_status, "services": show_services,
            "cleanup": run_cleanup}[args.command](args)


# --- agent ----------------------------------------------------------------------------

def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def run_agent(args) -> int:
    if args.manifests is None:
        print("bpfproxy: the Kubernetes API source (--kubeconfig, in-cluster) comes in a "
              "later release; run with --manifests DIR", file=sys.stderr)
        return 2
    if not args.manifests.is_dir():
        print(f"bpfproxy: --manifests {args.manifests}: not a directory", file=sys.stderr)
        return 2
    try:
        args.node_ips = tuple(ipaddress.ip_address(a) for a in _split(args.node_ip))
        args.nodeport_cidrs = tuple(ipaddress.ip_network(c, strict=False)
                                    for c in _split(args.nodeport_addresses))
    except ValueError as exc:
        print(f"bpfproxy: --node-ip/--nodeport-addresses: {exc}", file=sys.stderr)
        return 2
    for flag in ("interfaces", "metrics", "healthz"):
        if getattr(args, flag):
            logging.getLogger("agent").info("event=flag_not_yet_used flag=--%s",
                                            flag.replace("_", "-"))
    return asyncio.run(_agent_main(args))


async def _agent_main(args) -> int:
    from agent.agent import Agent
    from agent.api import server
    from agent.datapath import loader
    from agent.datapath.config import DatapathConfig
    from agent.datapath.maps import BpfServiceMaps, LayoutError
    from agent.datapath.stale_sockets import udp_cleanup_for
    from agent.model.types import NodeContext
    from agent.sources.manifests import ManifestSource

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Leave programs and pinned maps in place: traffic keeps flowing without us.
        loop.add_signal_handler(sig, stopping.set)
    cgroup = args.cgroup or find_cgroup2_mount()
    config = DatapathConfig(pin_dir=args.bpffs)
    try:
        await loop.run_in_executor(None, loader.load_in_child, config, cgroup)
        maps = BpfServiceMaps(config.pin_dir)
    except (loader.DatapathError, LayoutError, OSError) as exc:
        logging.getLogger("agent").error("event=datapath_failed error=%r", str(exc))
        return 1
    source = ManifestSource(args.manifests)
    agent = Agent(source=source, maps=maps,
                  min_sync_period=args.min_sync_period, sync_period=args.sync_period,
                  node=NodeContext(args.node_name, args.node_ips, args.nodeport_cidrs),
                  udp_cleanup=udp_cleanup_for(cgroup, maps))
    agent.status.source = f"manifests:{args.manifests}"
    agent.status.node_name = args.node_name
    api = await server.start(args.api, agent.status)
    stopper = asyncio.create_task(stopping.wait())
    stopper.add_done_callback(lambda _: agent.stop())
    try:
        code = await agent.run()
    finally:
        stopper.cancel()
        await api.stop(grace=0.5)
        logging.getLogger("agent").info(
            "event=agent_stopped programs=left_attached maps=left_pinned")
    return code


# --- clients of the API ---------------------------------------------------------------

def _stub(address: str):
    import grpc

    from agent.api.generated import agent_pb2_grpc
    channel = grpc.insecure_channel(address)
    return channel, agent_pb2_grpc.AgentStub(channel)


def show_status(args) -> int:
    import grpc

    from agent.api.generated import agent_pb2
    deadline = time.monotonic() + args.wait
    channel, stub = _stub(args.api)
    with channel:
        while True:
            try:
                status = stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=2)
                if status.synced:
                    print(f"synced: {status.service_ports} service ports, {status.frontends} "
                          f"frontends, {status.backends} backend slots in the kernel "
                          f"(node {status.node_name}, {status.source})")
                    return 0
                problem = "agent running, first sync not yet in the kernel"
            except grpc.RpcError as exc:
                problem = f"no agent answering at {args.api}: {exc.code().name}"
            if time.monotonic() >= deadline:
                print(f"not synced: {problem}", file=sys.stderr)
                return 1
            time.sleep(0.2)


def show_services(args) -> int:
    import grpc

    from agent.api.generated import agent_pb2
    channel, stub = _stub(args.api)
    with channel:
        try:
            reply = stub.ListServices(agent_pb2.ListServicesRequest(), timeout=5)
        except grpc.RpcError as exc:
            print(f"bpfproxy: no agent answering at {args.api}: {exc.code().name}",
                  file=sys.stderr)
            return 1
    entries = [{
        "namespace": s.namespace, "name": s.name, "port_name": s.port_name,
        "protocol": s.protocol,
        "frontends": [{"address": f.address, "port": f.port, "kind": f.kind}
                      for f in s.frontends],
        "backends": [{"address": b.address, "port": b.port, "state": b.state}
                     for b in s.backends],
    } for s in reply.services]
    if args.output == "json":
        print(json.dumps(entries, indent=2))
        return 0
    rows = [("SERVICE", "PORT", "PROTO", "FRONTENDS", "BACKENDS")]
    for e in entries:
        rows.append((f"{e['namespace']}/{e['name']}", e["port_name"] or "-", e["protocol"],
                     ",".join(f"{f['address']}:{f['port']}" for f in e["frontends"]) or "-",
                     ",".join(f"{b['address']}:{b['port']}" for b in e["backends"])
                     or "(none: connections refused)"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[4])
    return 0


# --- cleanup --------------------------------------------------------------------------

def run_cleanup(args) -> int:
    from agent.datapath import loader
    removed = loader.cleanup(args.bpffs)
    for path in removed:
        print(f"removed {path}")
    if args.cgroup:
        left = loader.wait_detached(args.cgroup, timeout=5.0)
        if left:
            print(f"bpfproxy: programs still attached to {args.cgroup}: {left}",
                  file=sys.stderr)
            return 1
    if not removed:
        print(f"nothing to remove under {args.bpffs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
