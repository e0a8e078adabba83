"""The bpfproxy command line: argument parsing and printing only.

The flags are held stable (scripts and tests rely on them); flags whose feature comes in a
later release are accepted now and say so in their help."""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import socket
import sys
import time
from pathlib import Path

DEFAULT_API = "unix:///run/bpfproxy/api.sock"
MAX_MAP_ENTRIES = 1 << 30


# the commands that only ask the agent's API: their parser leaves out the agent's and
# cleanup's flags, whose defaults import the datapath (~0.1 s a call)
CLIENT_COMMANDS = frozenset({"status", "services", "backends", "stats", "watch"})


def build_parser(agent_flags: bool = True) -> argparse.ArgumentParser:
    """agent_flags False: the agent and cleanup commands without their flags (for parsing
    a client command's arguments only: main)."""
    parser = argparse.ArgumentParser(prog="bpfproxy", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default=os.environ.get("BPFPROXY_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    agent = sub.add_parser("agent", help="run the node agent")
    if agent_flags:
        _agent_flags(agent)

    status = sub.add_parser("status", help="exit 0 once the first full sync is in the kernel",
                            epilog=EXIT_CODES)
    _api_client_flags(status, filters=False)
    status.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="keep asking until synced or SECONDS have passed")

    services = sub.add_parser("services", help="list service ports as the kernel serves them",
                              epilog=EXIT_CODES)
    _api_client_flags(services)
    backends = sub.add_parser("backends", help="list backends per service port, with state",
                              epilog=EXIT_CODES)
    _api_client_flags(backends)
    stats = sub.add_parser("stats", help="counters per service port and backend",
                           epilog=EXIT_CODES)
    _api_client_flags(stats)
    watch = sub.add_parser("watch", help="print sync events and errors as they happen",
                           epilog=EXIT_CODES)
    _api_client_flags(watch, filters=False)
    watch.add_argument("--count", type=int, default=0, metavar="N",
                       help="exit 0 after N events (default: until interrupted)")

    cleanup = sub.add_parser("cleanup", help="remove every program, link and map installed")
    if agent_flags:
        from agent.datapath.config import DEFAULT_PIN_DIR
        cleanup.add_argument("--cgroup", type=Path, metavar="DIR",
                             help="also check that no program is left attached here")
        cleanup.add_argument("--bpffs", type=Path, default=DEFAULT_PIN_DIR, metavar="DIR")
        cleanup.add_argument("--kube-proxy", action="store_true",
                             help="instead, remove kube-proxy's iptables chains and nftables "
                                  "tables from this network namespace, as `kube-proxy "
                                  "--cleanup` does (run it once bpfproxy serves; bpfproxy's "
                                  "own state stays)")
    return parser


def _agent_flags(agent: argparse.ArgumentParser) -> None:
    """The agent's flags: their defaults come from the datapath and the manifest source's
    control plane, which a client command never imports (main: build_parser)."""
    from agent.datapath import sizing
    from agent.datapath.config import (
        ACCELERATIONS,
        DEFAULT_PIN_DIR,
        LB_ALGORITHMS,
        NODEPORT_MODES,
    )
    from agent.sources.apiserver.control_plane import (
        DEFAULT_CLUSTER_IP_RANGES,
        DEFAULT_NODE_PORT_RANGE,
    )
    src = agent.add_mutually_exclusive_group()
    src.add_argument("--manifests", type=Path, metavar="DIR",
                     help="read Services and EndpointSlices from *.yaml/*.yml/*.json in DIR")
    src.add_argument("--kubeconfig", type=Path, metavar="FILE",
                     help="watch the Kubernetes API this kubeconfig names (default: "
                          "in-cluster, with the pod's service account)")
    # the manifest source's stand-in for a cluster's API server (agent/sources/apiserver)
    agent.add_argument("--service-cluster-ip-range", default=DEFAULT_CLUSTER_IP_RANGES,
                       metavar="CIDR[,CIDR]",
                       help="--manifests: cluster IPs for Services that give none are "
                            "allocated here (one CIDR per family; the first is the primary)")
    agent.add_argument("--service-node-port-range", default=DEFAULT_NODE_PORT_RANGE,
                       metavar="LOW-HIGH",
                       help="--manifests: node ports for NodePort and LoadBalancer "
                            "Services that give none are allocated here")
    agent.add_argument("--config", type=Path, metavar="FILE",
                       help="a BpfProxyConfiguration YAML file; flags given here win over it")
    agent.add_argument("--node-name", default=socket.gethostname())
    agent.add_argument("--node-ip", default="", metavar="IP[,IP]",
                       help="this node's addresses: NodePorts are served on them (default: "
                            "the addresses of the Node object named --node-name)")
    agent.add_argument("--nodeport-addresses", default="", metavar="CIDR[,CIDR]",
                       help="only node addresses in these CIDRs serve NodePorts "
                            "(kube-proxy's --nodeport-addresses)")
    agent.add_argument("--interfaces", default="", metavar="IF[,IF]",
                       help="node interfaces whose traffic from outside the node reaches "
                            "NodePort, ExternalIP and LoadBalancer addresses (TC programs)")
    agent.add_argument("--acceleration", choices=ACCELERATIONS, default="disabled",
                       help="XDP on the --interfaces for flows from outside to backends on "
                            "other nodes: native (fails where the driver has no native "
                            "XDP), best-effort (falls back to the TC programs there)")
    agent.add_argument("--nodeport-mode", choices=NODEPORT_MODES, default="snat",
                       help="flows from outside to backends on other nodes: snat (replies "
                            "come back through this node), dsr (direct server return: the "
                            "backend's node replies to the client), hybrid (DSR for TCP, "
                            "SNAT for UDP)")
    agent.add_argument("--lb-algorithm", choices=LB_ALGORITHMS, default="random",
                       help="backend choice for traffic from outside the node: maglev picks "
                            "the same backend for a flow whichever node it enters through")
    agent.add_argument("--maglev-table-size", type=int, default=1021, metavar="PRIME",
                       help="Maglev lookup table entries per service (a prime, well above "
                            "the largest backend count)")
    agent.add_argument("--conntrack-max", type=int, metavar="N",
                       help="flows tracked for traffic from outside the node (LRU; "
                            "default: from --map-memory-ratio)")
    agent.add_argument("--conntrack-tcp-timeout", type=float, default=21600.0,
                       metavar="SECONDS", help="idle established TCP flows expire after this")
    agent.add_argument("--conntrack-tcp-close-timeout", type=float, default=10.0,
                       metavar="SECONDS", help="TCP flows expire this soon after FIN or RST")
    agent.add_argument("--conntrack-udp-timeout", type=float, default=60.0,
                       metavar="SECONDS", help="idle UDP flows expire after this")
    agent.add_argument("--snat-port-range", default="61000-65535", metavar="LOW-HIGH",
                       help="source ports of flows SNATed to the node (reserved in "
                            "net.ipv4.ip_local_reserved_ports); its size bounds new "
                            "connections a second to one backend")
    # map sizes: a Service whose change would not fit is refused whole and kept as the
    # kernel had it (event=service_refused); a map pinned earlier keeps its size. A size
    # not given is derived from the node's memory (agent/datapath/sizing.py).
    agent.add_argument("--map-memory-ratio", type=float, default=sizing.DEFAULT_MEMORY_RATIO,
                       metavar="FRACTION",
                       help="share of the node's memory that sizes every map whose size "
                            "is not given (each between a floor and its largest default)")
    for size in sizing.SIZE_FLAGS:
        agent.add_argument(size.flag, type=int, default=size.default, metavar="N",
                           help=size.help)
    agent.add_argument("--cgroup", type=Path, metavar="CGROUP2_DIR",
                       help="cgroup v2 directory the socket programs attach to "
                            "(default: the cgroup2 mount, i.e. every process)")
    agent.add_argument("--bpffs", type=Path, default=DEFAULT_PIN_DIR, metavar="DIR",
                       help="where maps and program links are pinned")
    agent.add_argument("--api", default=DEFAULT_API, metavar="ADDR")
    agent.add_argument("--api-tls-cert", type=Path, metavar="FILE",
                       help="serve the API over TLS with this certificate (PEM)")
    agent.add_argument("--api-tls-key", type=Path, metavar="FILE",
                       help="the private key of --api-tls-cert (PEM)")
    agent.add_argument("--api-tls-ca", type=Path, metavar="FILE",
                       help="mutual TLS: only clients with a certificate this CA signed")
    for flag, default, serves in (("--metrics", "127.0.0.1:10249", "Prometheus /metrics"),
                                  ("--healthz", "0.0.0.0:10256", "/healthz and /livez")):
        agent.add_argument(flag, default=default, metavar="ADDR",
                           help=f"{serves} on HOST:PORT (kube-proxy's port); 'off' to disable")
    agent.add_argument("--min-sync-period", type=float, default=0.1, metavar="SECONDS")
    agent.add_argument("--sync-period", type=float, default=30.0, metavar="SECONDS")


EXIT_CODES = ("exit codes: 0 ok; 1 no agent answering, not synced (status) or the stream "
              "broke (watch); 2 bad flags or a request the agent refused; 3 a filter matched "
              "nothing")


def _api_client_flags(parser: argparse.ArgumentParser, filters: bool = True) -> None:
    parser.add_argument("--api", default=DEFAULT_API, metavar="ADDR",
                        help="unix:///path or HOST:PORT")
    parser.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    parser.add_argument("--tls-ca", type=Path, metavar="FILE",
                        help="TLS to a TCP --api: the CA that signed the agent's certificate")
    parser.add_argument("--tls-cert", type=Path, metavar="FILE",
                        help="our client certificate, when the agent asks for one")
    parser.add_argument("--tls-key", type=Path, metavar="FILE")
    parser.add_argument("--tls-server-name", default="", metavar="NAME",
                        help="the name the agent's certificate must carry (default: the host "
                             "of --api)")
    if filters:
        parser.add_argument("-n", "--namespace", default="")
        parser.add_argument("--name", default="", help="the Service's name")
        parser.add_argument("--address", default="", metavar="IP",
                            help="a frontend address (or, for backends, a backend's)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(agent_flags=_command(sys.argv[1:] if argv is None else argv)
                          not in CLIENT_COMMANDS)
    args = parser.parse_args(argv)
    if args.command == "agent" and args.config is not None:
        from agent import config
        try:
            args = config.apply(parser, argv, args)
        except config.ConfigError as exc:
            print(f"bpfproxy: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return {"agent": run_agent, "status": show_status, "services": show_services,
            "backends": show_backends, "stats": show_stats, "watch": watch_events,
            "cleanup": run_cleanup}[args.command](args)


def _command(argv: list[str]) -> str:
    """The command argv names ("" when unclear: then the whole parser is built)."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif word.startswith("--log-level="):
            continue
        else:
            return "" if word.startswith("-") else word
    return ""


# --- agent ----------------------------------------------------------------------------

def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _check_tc_flags(args) -> str:
    """The TC path's flags, checked before anything is loaded."""
    from agent import maglev
    from agent.datapath import sizing
    if not maglev.is_prime(args.maglev_table_size) or \
            not maglev.M_MIN <= args.maglev_table_size <= maglev.M_MAX:
        return (f"--maglev-table-size {args.maglev_table_size}: must be a prime between "
                f"{maglev.M_MIN} and {maglev.M_MAX}")
    if args.conntrack_max is not None and args.conntrack_max < 1024:
        return f"--conntrack-max {args.conntrack_max}: at least 1024"
    if not 0 < args.map_memory_ratio <= 0.5:
        return f"--map-memory-ratio {args.map_memory_ratio}: must be above 0 and at most 0.5"
    for size in sizing.SIZE_FLAGS:
        value = getattr(args, size.dest)
        if value is not None and not 1 <= value <= MAX_MAP_ENTRIES:   # the kernel's limit
            return f"{size.flag} {value}: must be 1 to {MAX_MAP_ENTRIES}"
    for flag in ("tcp_timeout", "tcp_close_timeout", "udp_timeout"):
        value = getattr(args, f"conntrack_{flag}")
        if not 1 <= value <= 7 * 86400:
            return (f"--conntrack-{flag.replace('_', '-')} {value}: must be 1 second to "
                    f"7 days")
    try:
        args.snat_ports = snat_port_range(args.snat_port_range)
    except ValueError as exc:
        return f"--snat-port-range {args.snat_port_range}: {exc}"
    return ""


def snat_port_range(text: str) -> tuple[int, int]:
    """'LOW-HIGH' -> (LOW, HIGH): at least 64 ports, all unprivileged (1024 and up)."""
    low, sep, high = str(text).partition("-")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise ValueError("expected LOW-HIGH, e.g. 61000-65535")
    low_port, high_port = int(low), int(high)
    if not 1024 <= low_port <= high_port <= 65535:
        raise ValueError("ports must be 1024 to 65535, LOW not above HIGH")
    if high_port - low_port + 1 < 64:
        raise ValueError("at least 64 ports")
    return low_port, high_port


def run_agent(args) -> int:
    if args.manifests is None:
        from agent.sources.kube import api_client_for
        try:
            # --kubeconfig, or in-cluster: the service account's token and CA
            args.api_client = api_client_for(str(args.kubeconfig) if args.kubeconfig else None)
        except Exception as exc:  # noqa: BLE001 -- ConfigException, unreadable, not YAML
            where = f"--kubeconfig {args.kubeconfig}" if args.kubeconfig else "in-cluster"
            print(f"bpfproxy: {where}: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
    elif args.manifests.exists() and not args.manifests.is_dir():
        # absent is fine (the source waits for it); a file there is a mistake
        print(f"bpfproxy: --manifests {args.manifests}: not a directory", file=sys.stderr)
        return 2
    try:
        args.node_ips = tuple(ipaddress.ip_address(a) for a in _split(args.node_ip))
        args.interface_names = tuple(_split(args.interfaces))
        args.nodeport_cidrs = tuple(ipaddress.ip_network(c, strict=False)
                                    for c in _split(args.nodeport_addresses))
    except ValueError as exc:
        print(f"bpfproxy: --node-ip/--nodeport-addresses: {exc}", file=sys.stderr)
        return 2
    from agent.sources.apiserver.control_plane import (
        parse_cluster_ip_ranges,
        parse_node_port_range,
    )
    try:
        args.cluster_ip_ranges = parse_cluster_ip_ranges(args.service_cluster_ip_range)
        args.node_port_range = parse_node_port_range(args.service_node_port_range)
    except ValueError as exc:
        print(f"bpfproxy: --service-cluster-ip-range/--service-node-port-range: {exc}",
              file=sys.stderr)
        return 2
    problem = _check_tc_flags(args)
    if problem:
        print(f"bpfproxy: {problem}", file=sys.stderr)
        return 2
    from agent.main import serve
    return asyncio.run(serve(args))


# --- clients of the API ---------------------------------------------------------------
# Plumbing in agent/api/client.py, rendering in agent/cli_output.py; here: ask and print.

def _client(args):
    from agent.api import client
    tls = client.ClientTls(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    channel = client.channel(args.api, tls)
    return channel, client.stub(channel)


def _print(data, args, as_table) -> None:
    from agent import cli_output
    print(as_table(data) if args.output == "table" else cli_output.dump(data, args.output))


def _failed(exc, args) -> int:
    from agent.api import client
    print(f"bpfproxy: {client.describe(exc, args.api)}", file=sys.stderr)
    return client.exit_code(exc)


def _filtered(args) -> bool:
    return bool(args.namespace or args.name or args.address)


def show_status(args) -> int:
    import grpc

    from agent import cli_output
    from agent.api import client
    from agent.api.generated import agent_pb2
    deadline = time.monotonic() + args.wait
    channel, stub = _client(args)
    with channel:
        while True:
            try:
                status = client.to_plain(stub.GetStatus(agent_pb2.GetStatusRequest(),
                                                        timeout=5))
                if status["synced"]:
                    _print(status, args, cli_output.status_text)
                    return client.EXIT_OK
                problem = "agent running, first sync not yet in the kernel"
            except grpc.RpcError as exc:
                status, problem = None, client.describe(exc, args.api)
            if time.monotonic() >= deadline:
                if status is not None and args.output != "table":
                    _print(status, args, cli_output.status_text)
                print(f"not synced: {problem}", file=sys.stderr)
                return client.EXIT_UNAVAILABLE
            time.sleep(0.2)


def _stats_by_port(stub, flt) -> dict[tuple, dict] | None:
    """Counters per service port (families summed) for tables; None when unavailable."""
    import grpc

    from agent.api import client
    from agent.api.generated import agent_pb2
    try:
        rows = list(client.all_pages(stub.GetStats, agent_pb2.GetStatsRequest, "services",
                                     flt))
    except grpc.RpcError:
        return None
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r.namespace, r.name, r.port_name, r.protocol)
        total = out.setdefault(key, dict.fromkeys(("connections", "refused"), 0))
        total["connections"] += r.counters.connections
        total["refused"] += r.counters.refused
    return out


def show_services(args) -> int:
    import grpc

    from agent import cli_output
    from agent.api import client
    from agent.api.generated import agent_pb2
    flt = client.service_filter(args.namespace, args.name, args.address)
    channel, stub = _client(args)
    with channel:
        try:
            ports = list(client.all_pages(stub.ListServices, agent_pb2.ListServicesRequest,
                                          "services", flt))
        except grpc.RpcError as exc:
            return _failed(exc, args)
        stats = _stats_by_port(stub, flt) if args.output == "table" else None
    if args.output == "table":
        print(cli_output.services_table([client.to_plain(p) for p in ports], stats))
    elif args.output == "json":     # json.dumps' text, without its pure-Python indenting
        sys.stdout.writelines(client.services_json(ports))
        sys.stdout.write("\n")
    else:
        print(cli_output.dump([client.service_entry(p) for p in ports], args.output))
    return client.EXIT_NOT_FOUND if not ports and _filtered(args) else client.EXIT_OK


def _show_listing(args, method: str, field: str, as_table, add_to_rows=None) -> int:
    """Print every row of a paged listing call (method, its rows in field), filtered by the
    service flags; add_to_rows(stub, service_filter, rows) may add to them on the same channel."""
    import grpc

    from agent.api import client
    from agent.api.generated import agent_pb2
    flt = client.service_filter(args.namespace, args.name, args.address)
    channel, stub = _client(args)
    with channel:
        try:
            rows = [client.to_plain(row) for row in client.all_pages(
                getattr(stub, method), getattr(agent_pb2, f"{method}Request"), field, flt)]
        except grpc.RpcError as exc:
            return _failed(exc, args)
        if add_to_rows is not None:
            add_to_rows(stub, flt, rows)
    _print(rows, args, as_table)
    return client.EXIT_NOT_FOUND if not rows and _filtered(args) else client.EXIT_OK


def show_backends(args) -> int:
    from agent import cli_output
    return _show_listing(args, "ListBackends", "backends", cli_output.backends_table,
                         _add_backend_counters)


def _add_backend_counters(stub, flt, rows: list[dict]) -> None:
    import grpc

    from agent.api import client
    from agent.api.generated import agent_pb2
    try:   # counters are a bonus here: a node without them still lists its backends
        stats = list(client.all_pages(stub.GetStats, agent_pb2.GetStatsRequest,
                                      "services", flt))
    except grpc.RpcError:
        stats = []
    counters = {(s.namespace, s.name, s.port_name, s.protocol, s.family, b.address, b.port):
                client.to_plain(b.counters) for s in stats for b in s.backends}
    for r in rows:
        r["counters"] = counters.get((r["namespace"], r["name"], r["port_name"],
                                      r["protocol"], r["family"], r["address"], r["port"]))


def show_stats(args) -> int:
    from agent import cli_output
    return _show_listing(args, "GetStats", "services", cli_output.stats_table)


def watch_events(args) -> int:
    import grpc

    from agent import cli_output
    from agent.api import client
    from agent.api.generated import agent_pb2
    seen = 0
    while True:
        # a stream that ends without an error has reached its lifetime (the agent's
        # WatchLimits): watch again, on a fresh connection as the agent ages them out
        channel, stub = _client(args)
        with channel:
            try:
                for event in stub.WatchEvents(agent_pb2.WatchEventsRequest()):
                    print(cli_output.event_record(client.to_plain(event), args.output),
                          flush=True)
                    seen += 1
                    if args.count and seen >= args.count:
                        return client.EXIT_OK
            except grpc.RpcError as exc:
                return _failed(exc, args)
            except KeyboardInterrupt:
                return client.EXIT_OK


# --- cleanup --------------------------------------------------------------------------

def run_cleanup(args) -> int:
    if args.kube_proxy:
        return _cleanup_kube_proxy()
    from agent.datapath import loader
    removed = loader.cleanup(args.bpffs)
    from agent.sources.apiserver import store
    allocations = store.path_for(args.bpffs)
    if allocations.exists():              # the manifest source's allocations, beside them
        allocations.unlink()
        removed.append(allocations)
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


def _cleanup_kube_proxy() -> int:
    from agent import kubeproxy_cleanup
    report = kubeproxy_cleanup.cleanup()
    for what in report.removed:
        print(f"removed {what}")
    for what in report.kept:
        print(f"kept {what}")
    for error in report.errors:
        print(f"bpfproxy: {error}", file=sys.stderr)
    if not report.removed and not report.errors and not report.kept:
        print("nothing of kube-proxy's to remove")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
