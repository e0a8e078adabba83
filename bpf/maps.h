/* bpf/maps.h: every map's key, value and size, shared by all programs and mirrored by
 * agent/datapath/layout.py. Layout changes bump BPFP_MAPS_VERSION and the pinned names
 * (bpfp_svc4_v1 -> _v2) so an agent never reads a map written with another layout; a new
 * map (the IPv6 ones joined v1) is no layout change: an older agent's pins stay valid. */
#ifndef BPFP_MAPS_H
#define BPFP_MAPS_H

#define BPFP_MAPS_VERSION 1

/* Defaults; the agent passes every one of these as -D from agent/datapath/config.py
 * (a unit test checks the two agree). */
#ifndef BPFP_PIN_DIR
#define BPFP_PIN_DIR "/sys/fs/bpf/bpfproxy"
#endif
#ifndef BPFP_MAX_FRONTENDS
#define BPFP_MAX_FRONTENDS 262144
#endif
#ifndef BPFP_MAX_SLOTS
#define BPFP_MAX_SLOTS 2097152
#endif
#ifndef BPFP_MAX_REVNAT
#define BPFP_MAX_REVNAT 524288
#endif
#ifndef BPFP_MAX_AFFINITY
#define BPFP_MAX_AFFINITY 262144
#endif
#ifndef BPFP_MAX_STATS
#define BPFP_MAX_STATS 131072
#endif
#ifndef BPFP_CT_MAX
#define BPFP_CT_MAX 262144
#endif
/* conntrack timeouts, seconds */
#ifndef BPFP_CT_TCP_TIMEOUT
#define BPFP_CT_TCP_TIMEOUT 21600
#endif
#ifndef BPFP_CT_TCP_CLOSE_TIMEOUT
#define BPFP_CT_TCP_CLOSE_TIMEOUT 10
#endif
#ifndef BPFP_CT_UDP_TIMEOUT
#define BPFP_CT_UDP_TIMEOUT 60
#endif
/* SNAT source ports: above Linux's default ephemeral range (32768-60999), so the node's
 * own connections never collide with a translated flow */
#ifndef BPFP_SNAT_PORT_MIN
#define BPFP_SNAT_PORT_MIN 61000
#endif
#ifndef BPFP_SNAT_PORT_MAX
#define BPFP_SNAT_PORT_MAX 65535
#endif
#ifndef BPFP_MAX_SOURCE_RANGES
#define BPFP_MAX_SOURCE_RANGES 65536
#endif
#ifndef BPFP_MAGLEV_M
#define BPFP_MAGLEV_M 1021
#endif
#ifndef BPFP_MAX_MAGLEV_ROWS
#define BPFP_MAX_MAGLEV_ROWS 1048576
#endif
/* --nodeport-mode: how a flow from outside reaches a backend on another node (Python:
 * agent/datapath/config.py NODEPORT_MODES, in this order) */
#define BPFP_NODEPORT_SNAT   0  /* SNAT to the entry node, whose reverse NAT sees the reply */
#define BPFP_NODEPORT_DSR    1  /* direct server return: the backend's node replies */
#define BPFP_NODEPORT_HYBRID 2  /* DSR for TCP, SNAT for UDP */
#ifndef BPFP_NODEPORT_MODE
#define BPFP_NODEPORT_MODE 0
#endif

/* A service address as a socket sees it: ClusterIP:port/protocol. */
struct svc_key4 {
        __be32 addr;
        __be16 port;
        __u8   proto;
        __u8   scope;           /* 0: every path; 1: traffic from outside the node only */
};

/* svc_value.flags: how the TC path treats a frontend (the socket LB ignores them).
 * Mirrored by agent/planner/kernel.py SVC_F_*, as BPFP_BE_* by BE_*, BPFP_MAGLEV_ROW by
 * MAGLEV_ROW, BPFP_CT_* and the event slots by agent/datapath/layout.py: checked by
 * tests/unit/test_datapath_config.py. */
#define BPFP_SVC_F_SOURCE_RANGES 1  /* only sources in bpfp_srcrange for its svc_id */
#define BPFP_SVC_F_MAGLEV        2  /* backend from bpfp_maglev, not at random */

/* One frontend -> its service port's backend slots [0, count). */
struct svc_value {
        __u32 svc_id;           /* shared by every frontend of one service port */
        __u32 count;            /* 0: no usable backend, connect() is refused */
        __u32 flags;            /* BPFP_SVC_F_* */
        __u32 affinity_sec;     /* ClientIP session affinity timeout, 0: none */
        __u64 name_hash;        /* which service port owns svc_id: how an agent that
                                 * restarts adopts ids without any state of its own */
};

struct slot_key {
        __u32 svc_id;
        __u32 slot;
};

/* backend4/6.flags: what the agent's model knows of a backend. Written into what was
 * padding (an older agent's slots read 0 there, and the agent rewrites them): same size,
 * same pinned maps. Python's copy: agent/planner/kernel.py BE_LOCAL. */
#define BPFP_BE_LOCAL 1         /* on this node (its EndpointSlice nodeName, or one of the
                                 * node's own addresses): traffic from outside keeps its
                                 * client address; a backend without it is SNATed */

struct backend4 {
        __be32 addr;
        __be16 port;
        __u16  flags;           /* BPFP_BE_* */
};

/* Socket cookie + backend -> the service address the application asked for, so
 * recvmsg() and getpeername() report the service, as with kube-proxy's DNAT. An AF_INET6
 * socket that reached an IPv4 service through ::ffff:a.b.c.d is remembered here too. */
struct revnat4_key {
        __u64  cookie;
        __be32 addr;
        __be16 port;
        __u16  pad;
};

struct revnat4_value {
        __be32 addr;
        __be16 port;
        __u16  pad;
};

/* IPv6: the same maps with 16-byte addresses, stored as ctx->user_ip6 holds them (four
 * 32-bit words in network order). A service port's svc_id indexes the slot map of its
 * family: an IPv6 frontend's slots are in bpfp_slot6, keyed like bpfp_slot4. */
struct svc_key6 {
        __be32 addr[4];
        __be16 port;
        __u8   proto;
        __u8   scope;           /* as in svc_key4 */
};

struct backend6 {
        __be32 addr[4];
        __be16 port;
        __u16  flags;           /* BPFP_BE_* */
};

struct revnat6_key {
        __u64  cookie;
        __be32 addr[4];
        __be16 port;
        __u16  pad;
        __u32  pad2;            /* explicit: a hash key must have no unwritten bytes */
};

struct revnat6_value {
        __be32 addr[4];
        __be16 port;
        __u16  pad;
};

/* A socket's own copy of the reverse NAT entries it made, in socket-local storage: what
 * recvmsg() and getpeername() read first, so no other socket can push it out, and the list
 * of bpfp_revnat4/6 entries the sock_release hook deletes when the socket goes (the shared
 * maps stay: the agent reads them by cookie, and storage is read only through a socket).
 * A connected socket uses one slot; an unconnected UDP socket one per backend it sent to. */
#define BPFP_SOCK_REVNATS 8     /* a power of two; a ninth backend replaces the oldest */
struct sock_revnat {
        __be32 backend[4];      /* IPv4 (also reached through ::ffff:a.b.c.d) in [0] */
        __be32 service[4];
        __be16 backend_port;
        __be16 service_port;
        __u8   family;          /* 4 or 6: the bpfp_revnat map of the entry; 0: slot unused */
        __u8   pad[3];
};

struct sock_revnats {
        struct sock_revnat entry[BPFP_SOCK_REVNATS];
        __u32 next;             /* the slot the next new backend takes once all are used */
        __u32 pad;
};

/* What the socket LB could not keep, per CPU, indexed by BPFP_SOCKEV_*. The agent reports
 * each slot by its macro's name in lower case (agent/datapath/layout.py SOCK_EVENTS). */
#define BPFP_SOCKEV_REVNAT_FAILED     0 /* bpfp_revnat4/6 refused an entry: the agent's
                                         * stale UDP socket sweep cannot see that socket */
#define BPFP_SOCKEV_NO_SOCKET_STORAGE 1 /* no socket-local storage (net.core.optmem_max):
                                         * replies read the shared map only */
#define BPFP_SOCKEV_REVNAT_REPLACED   2 /* a socket sent to more backends than it keeps: the
                                         * oldest one's replies show the backend again */
#define BPFP_SOCKEV_SLOTS             8

/* ClientIP session affinity. The client is its network namespace (a pod, or the node
 * itself), as in Cilium's socket LB: at connect() a socket has no source address yet, and
 * a pod's namespace stands for the pod's IP. The backend is kept whole (an IPv4 one in
 * addr[0]) so a connection finds it again even after its slot moved. */
struct affinity_key {
        __u64 client;           /* bpf_get_netns_cookie() */
        __u32 svc_id;
        __u32 pad;
};

struct affinity_value {
        __u64  last_ns;         /* bpf_ktime_get_ns() of the last connection */
        __u32  slot;            /* where the backend was: checked first */
        __u32  pad;
        __be32 addr[4];
        __be16 port;
        __u16  pad2;
        __u32  pad3;
};

/* Counters, per CPU (the agent sums them). One entry per backend of a service port, and
 * one for the service port itself (addr all zero, port 0). svc_ids are unique across
 * families; family says how to read addr. LRU: a full map forgets the coldest entries
 * rather than refusing to count. */
struct stats_key {
        __u32  svc_id;
        __u8   family;          /* 4 or 6 */
        __u8   pad;
        __be16 port;            /* backend port; 0 for the service port's own entry */
        __be32 addr[4];         /* backend address (IPv4 in addr[0]); zero: the service */
};

struct stats_value {
        __u64 connections;      /* connections (or UDP flows) balanced to it */
        __u64 packets;          /* TC path only: the socket LB never sees a packet */
        __u64 bytes;            /* TC path only, both directions */
        __u64 refused;          /* service entry: no backend (refused or dropped) */
        __u64 dropped;          /* service entry: loadBalancerSourceRanges said no */
};

/* --- Traffic from outside the node (bpf/nodeport.c) ---------------------------------
 * Addresses of both families in one layout: IPv4 in addr[0], the rest zero. */

/* Connection tracking: one entry per direction of a flow, keyed by the packet's tuple as
 * it arrives; the value is the tuple to rewrite it to. The reply direction's key is the
 * forward rewrite swapped, so either entry finds the other. */
struct ct_key {
        __be32 saddr[4];
        __be32 daddr[4];
        __be16 sport;
        __be16 dport;
        __u8   proto;
        __u8   family;          /* 4 or 6 */
        __u16  pad;
};

#define BPFP_CT_REPLY       1   /* this entry is the reply direction */
#define BPFP_CT_SNAT        2   /* the flow was SNATed to the node (backend elsewhere) */
#define BPFP_CT_CLOSING     4   /* RST, or FIN each way: expires after the close timeout */
#define BPFP_CT_ESTABLISHED 8   /* TCP: the reply direction was seen */
#define BPFP_CT_FIN         16  /* TCP: this direction sent FIN */
#define BPFP_CT_TIME_WAIT   32  /* TCP: the backend closed first, so it holds TIME_WAIT */
#define BPFP_CT_DSR         64  /* entry node of a DSR flow: the reply goes to the client
                                 * from the backend's node (the reply entry: ICMP only) */
#define BPFP_CT_DSR_BACKEND 128 /* backend's node of a DSR flow: the forward entry keeps
                                 * the packet, the reply entry answers from the service */
#define BPFP_CT_FIN_ACKED   256 /* TCP: the client's ACK of the backend's FIN passed, after
                                 * the client's own FIN: neither end holds the connection */
#define BPFP_CT_RST_LAST    512 /* TCP: an RST passed and, in this direction, nothing else
                                 * since (a live flow's next packet clears it) */
#define BPFP_CT_GONE        1024 /* the entry is being removed: set once, atomically, by the
                                  * CPU that alone may delete it (nodeport.h ct_claim) */

/* How long a SNATed flow the backend closed first keeps its port: the backend's
 * TIME_WAIT (Linux's TCP_TIMEWAIT_LEN). A new flow on that port before then meets the
 * old connection there, and its SYN is refused (PAWS) until the client retransmits. */
#define BPFP_CT_TIME_WAIT_HOLD 60

struct ct_value {
        __be32 saddr[4];        /* rewrite to */
        __be32 daddr[4];
        __be16 sport;
        __be16 dport;
        __u32  svc_id;          /* for counters, and for the agent's cleanup */
        __u64  expires;         /* bpf_ktime_get_ns() */
        __u32  flags;           /* BPFP_CT_* */
        __u32  partner_refreshed;       /* seconds of ktime: the other entry's last refresh */
};

/* The node's own address on an interface, per family: the SNAT source. */
struct ifaddr_key {
        __u32 ifindex;
        __u32 family;
};

struct ifaddr_value {
        __be32 addr[4];
};

/* ClientIP affinity for traffic from outside: the client is its source address. */
struct affinity_ext_key {
        __u32  svc_id;
        __u32  family;
        __be32 addr[4];
};

/* loadBalancerSourceRanges of a frontend with BPFP_SVC_F_SOURCE_RANGES: longest-prefix
 * match on (svc_id, source). prefixlen counts svc_id's 32 bits plus the range's. */
struct srcrange_key {
        __u32  prefixlen;
        __u32  svc_id;
        __be32 addr[4];
};

/* Maglev: a service port's lookup table of BPFP_MAGLEV_M slot numbers, in rows of 32. */
#define BPFP_MAGLEV_ROW 32
struct maglev_key {
        __u32 svc_id;
        __u32 row;
};

struct maglev_row {
        __u16 slot[BPFP_MAGLEV_ROW];
};

#define BPFP_PIN(name) BPFP_PIN_DIR "/" name

/* Frontends and slots are written only by the agent: no preallocation, so memory
 * follows the cluster's size rather than the configured maximum. */
BPF_TABLE_PINNED("hash", struct svc_key4, struct svc_value, bpfp_svc4,
                 BPFP_MAX_FRONTENDS, BPFP_PIN("bpfp_svc4_v1"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct slot_key, struct backend4, bpfp_slot4,
                 BPFP_MAX_SLOTS, BPFP_PIN("bpfp_slot4_v1"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct revnat4_key, struct revnat4_value, bpfp_revnat4,
                 BPFP_MAX_REVNAT, BPFP_PIN("bpfp_revnat4_v1"));
BPF_TABLE_PINNED("hash", struct svc_key6, struct svc_value, bpfp_svc6,
                 BPFP_MAX_FRONTENDS, BPFP_PIN("bpfp_svc6_v1"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct slot_key, struct backend6, bpfp_slot6,
                 BPFP_MAX_SLOTS, BPFP_PIN("bpfp_slot6_v1"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct revnat6_key, struct revnat6_value, bpfp_revnat6,
                 BPFP_MAX_REVNAT, BPFP_PIN("bpfp_revnat6_v1"));
/* freed with each socket; pinned so that a restarted agent's programs find what the
 * sockets of the old ones kept */
BPF_TABLE_PINNED("sk_storage", int, struct sock_revnats, bpfp_sock_revnat, 0,
                 BPFP_PIN("bpfp_sock_revnat_v1"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("percpu_array", __u32, __u64, bpfp_sock_events, BPFP_SOCKEV_SLOTS,
                 BPFP_PIN("bpfp_sock_events_v1"));
BPF_TABLE_PINNED("lru_hash", struct affinity_key, struct affinity_value, bpfp_affinity,
                 BPFP_MAX_AFFINITY, BPFP_PIN("bpfp_affinity_v1"));
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_value, bpfp_ct,
                 BPFP_CT_MAX, BPFP_PIN("bpfp_ct_v1"));
BPF_TABLE_PINNED("hash", struct ifaddr_key, struct ifaddr_value, bpfp_ifaddr,
                 1024, BPFP_PIN("bpfp_ifaddr_v1"));
BPF_TABLE_PINNED("lru_hash", struct affinity_ext_key, struct affinity_value,
                 bpfp_affinity_ext, BPFP_MAX_AFFINITY, BPFP_PIN("bpfp_affinity_ext_v1"));
BPF_TABLE_PINNED("lpm_trie", struct srcrange_key, __u8, bpfp_srcrange,
                 BPFP_MAX_SOURCE_RANGES, BPFP_PIN("bpfp_srcrange_v1"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct maglev_key, struct maglev_row, bpfp_maglev,
                 BPFP_MAX_MAGLEV_ROWS, BPFP_PIN("bpfp_maglev_v1"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_percpu_hash", struct stats_key, struct stats_value, bpfp_stats,
                 BPFP_MAX_STATS, BPFP_PIN("bpfp_stats_v1"));

/* What the TC path did that no service counter shows, per CPU, indexed by BPFP_TCEV_*
 * (reported as BPFP_SOCKEV_* are: agent/datapath/layout.py TC_EVENTS). */
#define BPFP_TCEV_NO_SNAT_PORT     0 /* a new flow found no free SNAT port: dropped */
#define BPFP_TCEV_TCP_NOT_SYN      1 /* TCP to a service address, no flow, not a SYN: dropped */
#define BPFP_TCEV_SNAT_PORT_REUSED 2 /* a new flow took the SNAT port of a finished one */
#define BPFP_TCEV_FLOW_EXPIRED     3 /* a packet found its flow past its time: both gone */
#define BPFP_TCEV_XDP_FORWARDED    4 /* a packet forwarded by the XDP program (--acceleration) */
#define BPFP_TCEV_SLOTS            8
BPF_TABLE_PINNED("percpu_array", __u32, __u64, bpfp_tc_events, BPFP_TCEV_SLOTS,
                 BPFP_PIN("bpfp_tc_events_v1"));

#endif /* BPFP_MAPS_H */
