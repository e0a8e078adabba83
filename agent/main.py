"""The agent process: loads the datapath, picks the source, starts the API, metrics and
health servers around the Agent, and keeps the TC path's view of the node's interfaces
current. agent/cli.py parses and checks the flags; this wires the rooms for them."""
from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from agent import capabilities
from agent.agent import Agent
from agent.api import observe
from agent.api.service_health import ServiceHealthServer
from agent.datapath import loader
from agent.datapath.config import DatapathConfig
from agent.datapath.conntrack import FlowTable
from agent.datapath.maps import BpfServiceMaps, LayoutError
from agent.datapath.netns_opener import NetnsDoorClosed, NetnsOpener
from agent.datapath.sizing import sizes_for
from agent.datapath.stale_sockets import udp_cleanup_for
from agent.datapath.tc import check_snat_ports, interface_addresses, reserve_snat_ports
from agent.model.types import NodeContext
from agent.read_ahead import ReadAhead
from agent.sources.apiserver import store
from agent.sources.apiserver.control_plane import ControlPlane
from agent.sources.manifests import ManifestSource
from agent.sync_step import pause_collector_for_start

log = logging.getLogger("agent")

FLOW_SWEEP_PERIOD = 10.0     # seconds between sweeps of the TC path's flow table


def find_cgroup2_mount() -> Path:
    """cgroup v2 may be /sys/fs/cgroup or, in a hybrid layout, /sys/fs/cgroup/unified."""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    raise SystemExit("bpfproxy: no cgroup v2 mount found in /proc/mounts; "
                     "mount one (mount -t cgroup2 none /sys/fs/cgroup/unified)")


async def serve(args) -> int:
    """Run the agent for parsed command-line arguments (agent/cli.py checked them)."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Leave programs and pinned maps in place: traffic keeps flowing without us.
        loop.add_signal_handler(sig, stopping.set)
    cgroup = args.cgroup or find_cgroup2_mount()
    sizes = sizes_for(args)         # flags given, the rest from the node's memory
    log.info("event=map_sizes %s", " ".join(f"{k}={v}" for k, v in sorted(sizes.items())))
    config = DatapathConfig(
        pin_dir=args.bpffs, interfaces=args.interface_names,
        acceleration=args.acceleration if args.interface_names else "disabled",
        nodeport_mode=args.nodeport_mode,
        ct_tcp_timeout=round(args.conntrack_tcp_timeout),
        ct_tcp_close_timeout=round(args.conntrack_tcp_close_timeout),
        ct_udp_timeout=round(args.conntrack_udp_timeout), maglev_m=args.maglev_table_size,
        snat_port_min=args.snat_ports[0], snat_port_max=args.snat_ports[1],
        max_source_ranges=args.max_source_ranges, **sizes)
    # The loader child compiles, pins and attaches with this process's capabilities (it is
    # started before the drop below and keeps them); the agent drops its own at once and
    # reads its source meanwhile: the compile takes seconds of a second core.
    try:
        loading = loader.LoaderChild(config, cgroup)
    except OSError as exc:
        log.error("event=datapath_failed error=%r", str(exc))
        return 1
    # Entering pods' network namespaces is left to a child started before the drop, the
    # only part that keeps CAP_SYS_ADMIN and CAP_SYS_PTRACE (agent/datapath/netns_opener.py).
    try:
        opener = NetnsOpener.start(cgroup)
    except NetnsDoorClosed as exc:
        loading.kill()
        log.error("event=netns_opener_failed error=%r action=exiting", str(exc))
        return 1
    # Ports below 1024 are bound by a thread that alone keeps CAP_NET_BIND_SERVICE until
    # the API, metrics and health listen; every other thread drops it now.
    binder = None
    try:
        if capabilities.needs_bind_service(observe.listen_ports(args)):
            binder = capabilities.PortBinder()
        capabilities.drop_after_loading(binder=binder)
    except capabilities.DropFailed as exc:
        if binder is not None:
            binder.close()
        opener.close()
        loading.kill()
        log.error("event=capabilities_drop_failed error=%r action=exiting", str(exc))
        return 1
    if args.manifests is None:
        from agent.sources.kube import KubeSource
        source = KubeSource(args.api_client, args.node_name)
        source_name = f"kube:{source.host}"
    else:
        source = ManifestSource(args.manifests, control_plane=ControlPlane(
            args.cluster_ip_ranges, args.node_port_range, store.path_for(args.bpffs)))
        source_name = f"manifests:{args.manifests}"
    pause_collector_for_start()      # ended by the first full sync (Agent.freeze_heap)
    reading = ReadAhead(source)
    try:
        xdp_fallback = await loop.run_in_executor(None, loading.wait)
        maps = await loop.run_in_executor(None, BpfServiceMaps, config.pin_dir)
        # pyroute2's synchronous API runs its own event loop: not on ours
        addresses = await loop.run_in_executor(None, interface_addresses,
                                               config.interfaces, args.node_ips)
        maps.set_interface_addresses(addresses)
    except (loader.DatapathError, LayoutError, OSError) as exc:
        if binder is not None:
            binder.close()
        await reading.close()
        opener.close()
        log.error("event=datapath_failed error=%r", str(exc))
        return 1
    # a reserved SNAT port is never a local socket's; where it cannot be, say so
    if config.interfaces and not reserve_snat_ports(config.snat_port_min, config.snat_port_max):
        check_snat_ports(config.snat_port_min, config.snat_port_max)
    # healthCheckNodePorts: on the --node-ip addresses, else on all of them
    health_checks = ServiceHealthServer(args.node_ips)
    agent = Agent(source=reading, maps=maps,
                  min_sync_period=args.min_sync_period, sync_period=args.sync_period,
                  node=NodeContext(args.node_name, args.node_ips, args.nodeport_cidrs),
                  udp_cleanup=udp_cleanup_for(cgroup, maps, door=opener),
                  maglev_m=args.maglev_table_size if args.lb_algorithm == "maglev" else 0,
                  flow_cleanup=maps.forget_flows if config.interfaces else None,
                  service_health=health_checks.update, freeze_heap=True)
    agent.status.source = source_name
    agent.status.node_name = args.node_name
    try:
        observers = await observe.start(args, agent, cgroup, source_name,
                                        binder.run if binder else None,
                                        xdp_fallback=xdp_fallback)
    except (OSError, ValueError) as exc:
        await reading.close()
        log.error("event=api_failed error=%r", str(exc))
        return 1
    finally:
        if binder is not None:
            binder.close()
    stopper = asyncio.create_task(stopping.wait())
    stopper.add_done_callback(lambda _: agent.stop())
    refresher = asyncio.create_task(_refresh_interface_addresses(
        maps, config.interfaces, args.node_ips, args.sync_period))
    sweeper = None
    if config.interfaces:
        table = FlowTable(maps.ct, config.pin_dir,
                          config.snat_port_max - config.snat_port_min + 1)
        sweeper = asyncio.create_task(_sweep_flows(table, agent.status,
                                                   min(FLOW_SWEEP_PERIOD, args.sync_period)))
    try:
        code = await agent.run()
    finally:
        stopper.cancel()
        refresher.cancel()
        if sweeper:
            sweeper.cancel()
        await observers.stop()
        await health_checks.close()
        await reading.close()
        opener.close()
        log.info(
            "event=agent_stopped programs=left_attached maps=left_pinned")
    return code


async def _sweep_flows(table: FlowTable, status, period: float) -> None:
    """Finished flows out of the conntrack map, and the figures status and metrics show.
    A big table is swept less often: a sweep takes at most a twentieth of the time."""
    loop = asyncio.get_running_loop()
    dropped = 0
    while True:
        took = 0.0
        try:
            stats = await loop.run_in_executor(None, table.sweep)
        except Exception as exc:  # noqa: BLE001 -- a failed sweep is retried, never fatal
            log.warning("event=flow_sweep_failed error=%r", str(exc))
        else:
            status.flows, took = stats, stats.seconds
            if stats.removed:
                log.debug("event=flows_swept removed=%d entries=%d", stats.removed,
                          stats.entries)
            if stats.events.get("no_snat_port", 0) > dropped:
                log.warning("event=snat_ports_exhausted new_flows_dropped=%d "
                            "busiest_backend_ports=%d of=%d",
                            stats.events["no_snat_port"] - dropped, stats.snat_ports_busiest,
                            stats.snat_port_range)
                dropped = stats.events["no_snat_port"]
        await asyncio.sleep(max(period, 20 * took))


async def _refresh_interface_addresses(maps: BpfServiceMaps, interfaces: tuple[str, ...],
                                       node_ips, period: float) -> None:
    """A node address that changes (DHCP, a re-created interface) would leave SNATed flows
    without a source: look again every sync period."""
    loop = asyncio.get_running_loop()
    while interfaces:
        await asyncio.sleep(period)
        try:
            # pyroute2's synchronous API runs its own event loop: not on ours
            addresses = await loop.run_in_executor(None, interface_addresses, interfaces,
                                                   node_ips)
            await loop.run_in_executor(None, maps.set_interface_addresses, addresses)
        except Exception as exc:  # noqa: BLE001 -- the next period tries again
            log.warning("event=interface_addresses_failed error=%r", str(exc))
