"""Which functions of bpf/*.c are programs, and the hook each attaches to.

Shared by the loader (which attaches them) and the inventory (which finds them attached),
so neither imports the other."""
from __future__ import annotations

from agent.datapath.bpfsys import AttachType

# compiled together as one object: both programs share the maps
PROGRAM_FILES = ("socklb.c", "nodeport.c", "xdp.c")

# (function in bpf/socklb.c, hook) on the --cgroup directory
SOCKET_PROGRAMS: tuple[tuple[str, AttachType], ...] = (
    ("bpfp_connect4", AttachType.CGROUP_INET4_CONNECT),
    ("bpfp_sendmsg4", AttachType.CGROUP_UDP4_SENDMSG),
    ("bpfp_recvmsg4", AttachType.CGROUP_UDP4_RECVMSG),
    ("bpfp_getpeername4", AttachType.CGROUP_INET4_GETPEERNAME),
    ("bpfp_connect6", AttachType.CGROUP_INET6_CONNECT),
    ("bpfp_sendmsg6", AttachType.CGROUP_UDP6_SENDMSG),
    ("bpfp_recvmsg6", AttachType.CGROUP_UDP6_RECVMSG),
    ("bpfp_getpeername6", AttachType.CGROUP_INET6_GETPEERNAME),
    ("bpfp_sock_release", AttachType.CGROUP_INET_SOCK_RELEASE),
)

# (function in bpf/nodeport.c, hook) on each --interfaces device
TC_PROGRAMS: tuple[tuple[str, AttachType], ...] = (
    ("bpfp_tc_ingress", AttachType.TCX_INGRESS),
    ("bpfp_tc_egress", AttachType.TCX_EGRESS),
)

# bpf/xdp.c's program on each --interfaces device with --acceleration native|best-effort
XDP_PROGRAM = "bpfp_xdp"
