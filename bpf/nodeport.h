/* bpf/nodeport.h: the NodePort path's conntrack and backend choice, shared by the TC
 * program (nodeport.c) and the XDP program (xdp.c): one flow table (bpfp_ct) with one set
 * of semantics (the SNAT port claim, TCP state, expiry) whichever program sees a packet.
 * Both parse a packet alike (np_parse); rewriting and forwarding are each program's. */
#ifndef BPFP_NODEPORT_H
#define BPFP_NODEPORT_H

#include "maps.h"
#include "counters.h"
#include "lb.h"

#define BPFP_CT_SYN_TIMEOUT 60     /* a flow whose reply never came: like Cilium's */

#define SNAT_PORT_SPAN (BPFP_SNAT_PORT_MAX - BPFP_SNAT_PORT_MIN + 1)
/* Ports tried for a new SNATed flow, each at random: with 75 % of the ports in use, all
 * 64 taken has odds of 1e-8; with 90 %, 1e-3 (then the range is what is too small) */
#define SNAT_TRIES 64

#define IP_MF     0x2000
#define IP_OFFSET 0x1FFF
#define TH_FIN    0x01
#define TH_RST    0x04
#define BPFP_AF_INET  2
#define BPFP_AF_INET6 10
#define TH_SYN    0x02
#define TH_ACK    0x10

/* A parsed packet: where its headers are and its tuple. */
struct pkt {
        struct ct_key t;
        __u32 l3;               /* offset of the IP header */
        __u32 l4;               /* offset of the TCP/UDP header */
        __u32 len;              /* bytes, for counters */
        __u8  tcp_flags;        /* FIN 1, SYN 2, RST 4, ACK 16 */
};

/* A packet's DSR option, when it has one: the service address and port it was sent to. */
struct np_dsr {
        __be32 addr[4];
        __be16 port;
        __u8   found;
};

/* --- direct server return (--nodeport-mode dsr|hybrid) --------------------------------
 * The entry node DNATs a flow to a backend on another node keeping the client's address,
 * and tells the backend's node the service address and port the client dialled in an IP
 * option: the IPv4 option below, or an IPv6 destination options header. The backend's
 * node opens the flow from it and its reverse NAT answers the client straight from that
 * address. Type numbers are RFC 4727's experimental ones: IPv4 30 with the copy bit (in
 * every fragment), IPv6 0x1e (the high bits 00: a node that does not know it skips it). */
#define DSR_OPT4_TYPE 0x9e
#define DSR_OPT4_LEN  8
#define DSR_OPT6_TYPE 0x1e
#define DSR_OPT6_LEN  18         /* the option's data: address and port */
#define DSR_EXT6_LEN  24         /* the whole header, 8-byte aligned (two Pad1 at its end) */
#define IPV6_NEXTHDR_DEST 60

struct dsr_opt4 {
        __u8   type;
        __u8   len;
        __be16 port;
        __be32 addr;
};

struct dsr_ext6 {
        __u8   nexthdr;
        __u8   hdrlen;          /* 8-byte units after the first 8: 2 */
        __u8   type;
        __u8   len;
        __be32 addr[4];
        __be16 port;
        __u8   pad[2];          /* two Pad1 options */
};

/* Whether a new flow of proto to a backend on another node goes by DSR. */
static __always_inline int np_uses_dsr(__u8 proto)
{
        return BPFP_NODEPORT_MODE == BPFP_NODEPORT_DSR ||
               (BPFP_NODEPORT_MODE == BPFP_NODEPORT_HYBRID && proto == IPPROTO_TCP);
}

/* A flow this node opened by DSR that its mode no longer sends that way: a UDP flow after a
 * restart from dsr into hybrid or snat. Kept, its datagrams would carry the option for as
 * long as the client used it (one with a fixed port: for ever), and a new socket of the
 * client drawing its port would be a DSR flow too. The caller opens it anew on the same
 * backend (nodeport.c's handle; XDP passes it there): only the address the backend sees changes, as for a
 * client that moved. A TCP flow keeps its way: the backend answers its connection from
 * the service address. */
static __always_inline int np_dsr_left(struct pkt *p, struct ct_value *v)
{
        return p->t.proto == IPPROTO_UDP && !np_uses_dsr(IPPROTO_UDP) &&
               (v->flags & (BPFP_CT_DSR | BPFP_CT_REPLY)) == BPFP_CT_DSR;
}

/* The bytes the DSR option adds to a packet of a DSR flow on the entry node: a TCP flow's
 * first packet (its SYN) and every UDP datagram carry it, the backend's node needing it to
 * open the flow; 0 for the others. */
static __always_inline __u32 np_dsr_option_len(struct pkt *p)
{
        if (p->t.proto != IPPROTO_UDP && !(p->tcp_flags & TH_SYN))
                return 0;
        return p->t.family == 4 ? DSR_OPT4_LEN : DSR_EXT6_LEN;
}

/* DSR for a new flow of p to a backend on another node, whose next hop from here is
 * be_hop (bpf_fib_lookup's, the program's ctx), unless the client is behind that same hop
 * (a pod of the backend's node, or that node itself): the reply would not leave that node
 * through the interface whose program translates it, so that flow is SNATed as in snat
 * mode and its reply comes back here. fib: room for the lookup (the XDP stack is tight). */
static __always_inline int np_dsr_wanted(void *ctx, __u32 ifindex, struct pkt *p,
                                         const __be32 *be_hop, struct bpf_fib_lookup *fib)
{
        if (!np_uses_dsr(p->t.proto))
                return 0;
        __builtin_memset(fib, 0, sizeof(*fib));
        fib->ifindex = ifindex;
        if (p->t.family == 4) {
                fib->family = BPFP_AF_INET;
                fib->ipv4_src = p->t.daddr[0];
                fib->ipv4_dst = p->t.saddr[0];
        } else {
                fib->family = BPFP_AF_INET6;
                __builtin_memcpy(fib->ipv6_src, p->t.daddr, 16);
                __builtin_memcpy(fib->ipv6_dst, p->t.saddr, 16);
        }
        long rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
        if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
                return 1;
        if (p->t.family == 4)
                return fib->ipv4_dst != be_hop[0];
        return fib->ipv6_dst[0] != be_hop[0] || fib->ipv6_dst[1] != be_hop[1] ||
               fib->ipv6_dst[2] != be_hop[2] || fib->ipv6_dst[3] != be_hop[3];
}


/* --- parsing: one parse for both programs --------------------------------------------
 * The Ethernet, IP and TCP/UDP headers of a packet in [data, end): its tuple, where its
 * headers are, and 1 when it is one we may translate. With dsr (the TC program), IPv4
 * options are taken (its helpers find the L4 header wherever it is) and a DSR option is
 * read into *dsr; without (XDP), only a 20-byte IPv4 header is (its rewrite has fixed
 * offsets). Fragments, other protocols and other IPv6 extension headers are not ours: 0,
 * and the packet passes untouched. */
static __always_inline int np_parse(void *data, void *end, __u32 len, struct np_dsr *dsr,
                                    struct pkt *p)
{
        struct ethhdr *eth = data;
        if ((void *)(eth + 1) > end)
                return 0;
        p->l3 = sizeof(*eth);
        p->len = len;
        if (eth->h_proto == bpf_htons(ETH_P_IP)) {
                struct iphdr *ip = (void *)(eth + 1);
                if ((void *)(ip + 1) > end || ip->version != 4 || ip->ihl < 5 ||
                    (!dsr && ip->ihl != 5))
                        return 0;
                if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
                        return 0;       /* fragments: no ports to translate */
                p->t.family = 4;
                p->t.proto = ip->protocol;
                p->t.saddr[0] = ip->saddr;
                p->t.daddr[0] = ip->daddr;
                p->l4 = p->l3 + ip->ihl * 4;
                /* DSR: our option first (the entry node puts it there) */
                struct dsr_opt4 *opt = (void *)(ip + 1);
                if (dsr && BPFP_NODEPORT_MODE != BPFP_NODEPORT_SNAT &&
                    ip->ihl >= 5 + DSR_OPT4_LEN / 4 && (void *)(opt + 1) <= end &&
                    opt->type == DSR_OPT4_TYPE && opt->len == DSR_OPT4_LEN) {
                        dsr->found = 1;
                        dsr->port = opt->port;
                        dsr->addr[0] = opt->addr;
                }
        } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
                struct ipv6hdr *ip6 = (void *)(eth + 1);
                if ((void *)(ip6 + 1) > end || ip6->version != 6)
                        return 0;
                p->t.family = 6;
                p->t.proto = ip6->nexthdr;
                __builtin_memcpy(p->t.saddr, &ip6->saddr, 16);
                __builtin_memcpy(p->t.daddr, &ip6->daddr, 16);
                p->l4 = p->l3 + sizeof(*ip6);
                /* DSR: our destination options header; other extension headers (fragments
                 * among them) are not followed */
                struct dsr_ext6 *ext = (void *)(ip6 + 1);
                if (dsr && BPFP_NODEPORT_MODE != BPFP_NODEPORT_SNAT &&
                    p->t.proto == IPV6_NEXTHDR_DEST && (void *)(ext + 1) <= end &&
                    ext->hdrlen == (DSR_EXT6_LEN - 8) / 8 && ext->type == DSR_OPT6_TYPE &&
                    ext->len == DSR_OPT6_LEN) {
                        dsr->found = 1;
                        dsr->port = ext->port;
                        __builtin_memcpy(dsr->addr, ext->addr, 16);
                        p->t.proto = ext->nexthdr;
                        p->l4 += DSR_EXT6_LEN;
                }
        } else {
                return 0;
        }
        /* TCP and UDP both start with the two ports */
        __be16 *ports = data + p->l4;
        if ((void *)(ports + 2) > end)
                return 0;
        if (p->t.proto == IPPROTO_TCP) {
                struct tcphdr *tcp = (void *)ports;
                if ((void *)(tcp + 1) > end)
                        return 0;
                p->tcp_flags = ((__u8 *)tcp)[13];
        } else if (p->t.proto == IPPROTO_UDP) {
                struct udphdr *udp = (void *)ports;
                if ((void *)(udp + 1) > end)
                        return 0;
        } else {
                return 0;
        }
        p->t.sport = ports[0];
        p->t.dport = ports[1];
        return 1;
}


/* --- conntrack ------------------------------------------------------------------------ */

static __always_inline __u64 lifetime(struct pkt *p, __u32 flags)
{
        if (p->t.proto != IPPROTO_TCP)
                return BPFP_CT_UDP_TIMEOUT * NSEC;
        if ((flags & (BPFP_CT_CLOSING | BPFP_CT_SNAT | BPFP_CT_TIME_WAIT)) ==
            (BPFP_CT_CLOSING | BPFP_CT_SNAT | BPFP_CT_TIME_WAIT) &&
            BPFP_CT_TIME_WAIT_HOLD > BPFP_CT_TCP_CLOSE_TIMEOUT)
                return BPFP_CT_TIME_WAIT_HOLD * NSEC;
        if (flags & BPFP_CT_CLOSING)
                return BPFP_CT_TCP_CLOSE_TIMEOUT * NSEC;
        if (flags & BPFP_CT_ESTABLISHED)
                return BPFP_CT_TCP_TIMEOUT * NSEC;
        return BPFP_CT_SYN_TIMEOUT * NSEC;
}

/* The key of the tuple saddr:sport -> daddr:dport (of key's protocol) seen the other way. */
static __always_inline void key_swapped(struct ct_key *key, const __be32 *saddr,
                                        const __be32 *daddr, __be16 sport, __be16 dport,
                                        struct ct_key *out)
{
        __builtin_memcpy(out->saddr, daddr, 16);
        __builtin_memcpy(out->daddr, saddr, 16);
        out->sport = dport;
        out->dport = sport;
        out->proto = key->proto;
        out->family = key->family;
        out->pad = 0;
}

/* The reply's key: the forward rewrite, swapped. */
static __always_inline void reply_key(struct ct_key *fwd, struct ct_value *v,
                                      struct ct_key *out)
{
        key_swapped(fwd, v->saddr, v->daddr, v->sport, v->dport, out);
}

/* The key of an entry's partner. A flow's entries name each other through their rewrites
 * (reply_key), except on a DSR backend's node, where the forward direction is not
 * rewritten and the reply is rewritten from the service: there each is the other reversed. */
static __always_inline void partner_key(struct ct_key *key, struct ct_value *v,
                                        struct ct_key *out)
{
        if (v->flags & BPFP_CT_DSR_BACKEND)
                key_swapped(key, key->saddr, key->daddr, key->sport, key->dport, out);
        else
                reply_key(key, v, out);
}

static __always_inline void tc_event(__u32 what)
{
        __u64 *n = bpfp_tc_events.lookup(&what);
        if (n)
                *n += 1;
}

static __always_inline int same_key(const struct ct_key *a, const struct ct_key *b)
{
        const __u32 *x = (const void *)a, *y = (const void *)b;
#pragma unroll
        for (int i = 0; i < sizeof(*a) / 4; i++) {
                if (x[i] != y[i])
                        return 0;
        }
        return 1;
}

/* The other entry of key's flow, when it is still that flow's: a client tuple reused for
 * a new flow points its entry elsewhere, and the old reply entry is then alone. */
static __always_inline struct ct_value *partner_of(struct ct_key *key, struct ct_value *v,
                                                   struct ct_key *other)
{
        partner_key(key, v, other);
        struct ct_value *o = bpfp_ct.lookup(other);
        if (!o)
                return NULL;
        struct ct_key back = {};
        partner_key(other, o, &back);
        return same_key(&back, key) ? o : NULL;
}

/* Removing a flow. Several CPUs (XDP and TC too) may meet one old flow at once: new flows
 * of other clients picking its SNAT port (claim_snat), its own late packets finding it
 * expired. A map delete is not conditional: a CPU that
 * deleted a key after another had removed the old flow and inserted a new flow's entry
 * there would delete the new entry (two live flows SNATed to one port); and in the
 * preallocated LRU map a pointer from an earlier lookup may meet an element already
 * reused for another entry. So a flow's entries are deleted only by the CPU that claimed
 * it (ct_claim, on its reply entry: remove_flow): the one whose atomic fetch-or set
 * BPFP_CT_GONE on that entry, and which then found the element still the key's; the
 * decision is taken again on the flags the fetch-or returned. No other BPF path then
 * deletes it or puts another entry on that key (a SNAT port's reply entry goes in with
 * BPF_NOEXIST only), so the delete removes that entry. Every flag change of an existing
 * entry is an atomic or/and (track_tcp), which keeps the mark. Left unguarded: the
 * agent's sweep (a fresh read, then a delete), nodeport.c's dsr_flow_left (a UDP DSR
 * flow's entries, no SNAT port), a forward entry deleted with its claimed reply entry
 * while a SYN of that client tuple opens a new flow on another CPU (np_open_flow writes
 * it with BPF_ANY), and the LRU's own eviction when the table is full.
 * The atomics are on the 64-bit word of flags and partner_refreshed: BCC's clang (LLVM 14
 * without -mcpu=v3) has no 32-bit ones; on a little-endian target flags is its low half. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "ct_word: flags is the low half of its 64-bit word on little-endian targets only"
#endif
static __always_inline __u64 *ct_word(struct ct_value *v)
{
        return (__u64 *)&v->flags;      /* offset 48 of 56: 8-byte aligned */
}

static __always_inline void ct_set_flags(struct ct_value *v, __u32 flags)
{
        __sync_fetch_and_or(ct_word(v), (__u64)flags);
}

/* Claim key's entry v for removal: 1 when this CPU set BPFP_CT_GONE on it (its flags
 * before in *flags) and v is still key's entry. An element found reused for another key
 * keeps the mark (releasing it might undo a claim made since): that entry is then removed
 * by the agent's sweep once expired, or by the LRU. */
static __always_inline int ct_claim(struct ct_key *key, struct ct_value *v, __u32 *flags)
{
        __u64 before = __sync_fetch_and_or(ct_word(v), (__u64)BPFP_CT_GONE);
        if (before & BPFP_CT_GONE)
                return 0;
        if (bpfp_ct.lookup(key) != v)
                return 0;
        *flags = (__u32)before;
        return 1;
}

/* Give a claim back (ct_claim returned 1) when the flow turned out not to be over. */
static __always_inline void ct_release(struct ct_value *v)
{
        __sync_fetch_and_and(ct_word(v), ~(__u64)BPFP_CT_GONE);
}

/* Remove key's flow, v its entry and o its partner at other (partner_of's, or NULL), when
 * this CPU claims it: 1 when it did. A flow is claimed on its reply entry (the one keyed
 * by the SNAT port), or on v when alone: one claim per flow whichever entry a CPU met it
 * by, so that no two CPUs delete the entries of one flow. */
static __always_inline int remove_flow(struct ct_key *key, struct ct_value *v,
                                       struct ct_value *o, struct ct_key *other)
{
        struct ct_key *lkey = key;
        struct ct_value *lock = v;
        if (o && !(v->flags & BPFP_CT_REPLY)) {
                lkey = other;
                lock = o;
        }
        __u32 flags;
        if (!ct_claim(lkey, lock, &flags))
                return 0;
        if (o)
                bpfp_ct.delete(other);
        bpfp_ct.delete(key);
        return 1;
}

/* A flow is over when neither of its entries is alive (a one-way stream refreshes its
 * partner only now and then, so one entry alone may lag). Its entries are removed and
 * 0 returned; a live flow's lagging entry takes its partner's time and 1 is returned.
 * 0 too when another CPU claimed the flow first: that one removes it. */
static __always_inline int expire_flow(struct ct_key *key, struct ct_value *v, __u64 now)
{
        struct ct_key other = {};
        struct ct_value *o = partner_of(key, v, &other);
        if (o && o->expires >= now) {
                v->expires = o->expires;
                return 1;
        }
        remove_flow(key, v, o, &other);
        return 0;
}

/* Backend of a flow, for counters: the forward entry rewrites to it, the reply comes
 * from it. */
static __always_inline void count_flow(struct pkt *p, struct ct_value *v,
                                       struct bpfp_delta *d)
{
        if (v->flags & BPFP_CT_REPLY)
                bpfp_count(v->svc_id, p->t.family, p->t.saddr, p->t.sport, d);
        else
                bpfp_count(v->svc_id, p->t.family, v->daddr, v->dport, d);
}

/* --- backends ------------------------------------------------------------------------- */

static __always_inline __u32 mix32(__u32 h)
{
        h ^= h >> 16;
        h *= 0x85ebca6b;
        h ^= h >> 13;
        h *= 0xc2b2ae35;
        h ^= h >> 16;
        return h;
}

/* Maglev hashes what every node sees alike: the client's address and port, the service
 * port and the protocol (not the node address a NodePort client dialled). */
static __always_inline __u32 flow_hash(struct pkt *p)
{
        __u32 h = mix32(p->t.saddr[0] ^ 0x9e3779b9);
        h = mix32(h ^ p->t.saddr[1]);
        h = mix32(h ^ p->t.saddr[2]);
        h = mix32(h ^ p->t.saddr[3]);
        h = mix32(h ^ (((__u32)p->t.sport << 16) | p->t.dport));
        return mix32(h ^ p->t.proto);
}

static __always_inline int pick(struct pkt *p, struct svc_value *svc,
                                struct lb_backend *out, __u32 *slot_out)
{
        __u32 slot = bpf_get_prandom_u32() % svc->count;
        if (svc->flags & BPFP_SVC_F_MAGLEV) {
                __u32 idx = flow_hash(p) % BPFP_MAGLEV_M;
                struct maglev_key key = { .svc_id = svc->svc_id, .row = idx / BPFP_MAGLEV_ROW };
                struct maglev_row *row = bpfp_maglev.lookup(&key);
                if (row) {
                        __u32 col = idx % BPFP_MAGLEV_ROW;
                        if (col < BPFP_MAGLEV_ROW && row->slot[col] < svc->count)
                                slot = row->slot[col];
                }
        }
        *slot_out = slot;
        return lb_slot_backend(p->t.family, svc->svc_id, slot, out);
}

/* The client's affinity backend while it lasts and is still a backend (its slot may have
 * moved), else a fresh pick remembered: the socket LB's semantics (bpf/lb.h), keyed by
 * source address. */
static __always_inline int select_backend(struct pkt *p, struct svc_value *svc,
                                          struct lb_backend *out)
{
        struct affinity_ext_key akey = { .svc_id = svc->svc_id, .family = p->t.family };
        __builtin_memcpy(akey.addr, p->t.saddr, 16);
        __u64 now = 0;
        if (svc->affinity_sec) {
                now = bpf_ktime_get_ns();
                struct affinity_value *aff = bpfp_affinity_ext.lookup(&akey);
                if (aff && lb_affinity_alive(aff, svc, now) &&
                    lb_affinity_refind(p->t.family, svc, aff, now, out))
                        return 1;
        }
        __u32 slot;
        if (!pick(p, svc, out, &slot))
                return 0;
        if (svc->affinity_sec) {
                struct affinity_value value = {};
                lb_affinity_set(&value, now, slot, out);
                bpfp_affinity_ext.update(&akey, &value);
        }
        return 1;
}

/* --- a new flow ----------------------------------------------------------------------- */

static __always_inline struct svc_value *find_service(struct pkt *p)
{
        /* scope 1 first: a frontend whose traffic from outside has its own backends
         * (externalTrafficPolicy Local, source ranges); else the one every path uses */
        if (p->t.family == 4) {
                struct svc_key4 key = { .addr = p->t.daddr[0], .port = p->t.dport,
                                        .proto = p->t.proto, .scope = 1 };
                struct svc_value *svc = bpfp_svc4.lookup(&key);
                if (svc)
                        return svc;
                key.scope = 0;
                return bpfp_svc4.lookup(&key);
        }
        struct svc_key6 key = { .port = p->t.dport, .proto = p->t.proto, .scope = 1 };
        __builtin_memcpy(key.addr, p->t.daddr, 16);
        struct svc_value *svc = bpfp_svc6.lookup(&key);
        if (svc)
                return svc;
        key.scope = 0;
        return bpfp_svc6.lookup(&key);
}

static __always_inline int source_allowed(struct pkt *p, struct svc_value *svc)
{
        if (!(svc->flags & BPFP_SVC_F_SOURCE_RANGES))
                return 1;
        struct srcrange_key key = {
                .prefixlen = 32 + (p->t.family == 4 ? 32 : 128),
                .svc_id = svc->svc_id,
        };
        __builtin_memcpy(key.addr, p->t.saddr, 16);
        return bpfp_srcrange.lookup(&key) != NULL;
}


/* Claim a node port for a SNATed flow: the reply entry is inserted only if no other flow
 * holds that (backend, node address, port). A port whose flow is over (closed and past
 * the close timeout, or idle past its lifetime) is taken back here, at once: waiting for
 * a packet of that flow, or for the LRU to evict it, would leave the port lost.
 * Two plain loops and one take-over between them keep the verifier's work small.
 *
 * When the range is nearly full, the last SNAT_CLOSING_TRIES tries may also take the port
 * of a TCP flow that is over for both ends before its close timeout is, as Linux's SNAT
 * (kube-proxy's MASQUERADE) does in its last attempts since 6.5 (nf_nat_used_tuple_harder:
 * "snat: evict closing tcp entries on reply tuple collision"). The close timeout is only a
 * margin for the old flow's last packets, and a new flow refused for want of a port costs
 * its client a second (its SYN's retransmission): at the defaults, 4,536 ports held 10 s
 * each after an RST last a client of one backend 4,536 connections, under a second of
 * TCP_CRR. Linux (nf_nat_may_kill) evicts a conntrack entry only in TIME_WAIT (the last
 * ACK seen) or CLOSE (an RST inside the window), and only a reply-direction clash. Here,
 * with no sequence numbers kept (snat_flow_done):
 *  - the FIN way: the client's FIN, the backend's FIN, then the client's ACK of it
 *    (BPFP_CT_FIN_ACKED; Linux's LAST_ACK -> TIME_WAIT): the backend's socket is gone.
 *    Not at the second FIN: the backend in LAST_ACK would resend its FIN to the new
 *    client until that ACK came;
 *  - the RST way: an RST and, in each direction, nothing but RSTs since (BPFP_CT_RST_LAST,
 *    cleared by the next other packet of that direction). A stray RST (out of window:
 *    the ends ignore it) into a flow that is still talking does not free its port: the
 *    client's next segment, the backend's challenge ACK clear it. Into an idle flow it
 *    does, until either end sends: the cost of keeping no sequence numbers; an RST
 *    answered by anything but RSTs is Linux's ignored one;
 *  - never a flow the backend closed first: it holds TIME_WAIT on that tuple and would
 *    refuse the new SYN (BPFP_CT_TIME_WAIT_HOLD).
 * Only reply entries are looked at: the port's key (backend -> node:port) is the reply
 * direction, as Linux's clash is. */
#define SNAT_CLOSING_TRIES (SNAT_TRIES / 4)

/* Whether a SNATed TCP flow not yet past its time is over for both ends (flags: its reply
 * entry's; partner: its forward entry's, or BPFP_CT_RST_LAST when it has none). */
static __always_inline int snat_flow_done(__u32 flags, __u32 partner)
{
        if (flags & (BPFP_CT_TIME_WAIT | BPFP_CT_GONE))
                return 0;
        if (flags & BPFP_CT_FIN_ACKED)
                return 1;
        return (flags & partner & BPFP_CT_RST_LAST) != 0;
}

/* Whether old's port may go to a new flow: past its time, or (late: the last tries) its
 * TCP flow over for both ends. A first look: take_port decides on the claimed flags. */
static __always_inline int snat_port_yields(struct ct_value *old, __u64 now, int late)
{
        if (old->expires < now)
                return 1;
        return late && snat_flow_done(old->flags, BPFP_CT_RST_LAST);
}

/* Free rkey's port, held by old (snat_port_yields), for a new flow: 1 when old's flow is
 * gone (removed here, or by another CPU that claimed it first: the caller's insert, with
 * BPF_NOEXIST, then tells whether this CPU got the port). */
static __always_inline int take_port(struct ct_key *rkey, struct ct_value *old, __u64 now)
{
        if (old->expires < now)
                return !expire_flow(rkey, old, now);
        __u32 flags;
        if (!ct_claim(rkey, old, &flags))       /* old: a reply entry, its flow's claim */
                return 0;
        struct ct_key other = {};
        struct ct_value *o = partner_of(rkey, old, &other);
        if (!snat_flow_done(flags, o ? o->flags : BPFP_CT_RST_LAST)) {
                ct_release(old);
                return 0;
        }
        if (o)
                bpfp_ct.delete(&other);
        bpfp_ct.delete(rkey);
        return 1;
}

static __always_inline int try_port(struct pkt *p, struct ct_value *fwd,
                                    struct ct_value *rev, struct ct_key *rkey)
{
        /* each try at random: probing in a fixed order from one random start piles taken
         * ports into runs (linear probing's clustering), and a run of SNAT_TRIES is then
         * far likelier than as many independent misses */
        fwd->sport = bpf_htons(BPFP_SNAT_PORT_MIN + bpf_get_prandom_u32() % SNAT_PORT_SPAN);
        reply_key(&p->t, fwd, rkey);
        return bpfp_ct.insert(rkey, rev) == 0;
}

static __always_inline int claim_snat(struct pkt *p, struct ct_value *fwd,
                                      struct ct_value *rev, struct ct_key *rkey, __u64 now)
{
        struct ct_value *old = NULL;
        for (int i = 0; i < SNAT_TRIES; i++) {
                if (try_port(p, fwd, rev, rkey))
                        return 1;
                old = bpfp_ct.lookup(rkey);
                if (old && snat_port_yields(old, now, i >= SNAT_TRIES - SNAT_CLOSING_TRIES))
                        break;                  /* a finished flow's, perhaps: see below */
                old = NULL;
        }
        if (old) {
                /* of the CPUs that picked this port, one alone removes the old flow (it
                 * claimed it) and one alone inserts (BPF_NOEXIST); the others go on */
                if (take_port(rkey, old, now) && bpfp_ct.insert(rkey, rev) == 0) {
                        tc_event(BPFP_TCEV_SNAT_PORT_REUSED);
                        return 1;
                }
                for (int i = 0; i < SNAT_TRIES; i++) {
                        if (try_port(p, fwd, rev, rkey))
                                return 1;
                }
        }
        tc_event(BPFP_TCEV_NO_SNAT_PORT);
        return 0;
}


/* TCP's progress on both entries of a flow: established once a reply passed, closing
 * after an RST or a FIN each way (then the short close timeout applies, or the backend's
 * TIME_WAIT when it closed first and the flow is SNATed); over for both ends
 * (snat_flow_done) after the client's ACK of the backend's FIN, or an RST with nothing
 * else since. Flags change by atomic or/and only (ct_claim's mark must stay). */
#define CT_SHARED (BPFP_CT_ESTABLISHED | BPFP_CT_CLOSING | BPFP_CT_TIME_WAIT | \
                   BPFP_CT_FIN_ACKED | BPFP_CT_RST_LAST)
static __always_inline void track_tcp(struct pkt *p, struct ct_value *v, __u64 now)
{
        __u32 add = 0;
        if ((v->flags & BPFP_CT_REPLY) && !(v->flags & BPFP_CT_ESTABLISHED))
                add |= BPFP_CT_ESTABLISHED;
        if (p->tcp_flags & TH_RST)
                add |= BPFP_CT_CLOSING | BPFP_CT_RST_LAST;
        else if (v->flags & BPFP_CT_RST_LAST)   /* this side still talks: not reset */
                __sync_fetch_and_and(ct_word(v), ~(__u64)BPFP_CT_RST_LAST);
        /* the client's pure ACK once its FIN and the flow's closing passed, the backend
         * not first (its FIN too: checked below), not yet seen: the last ACK */
        __u32 last = ((p->tcp_flags & (TH_SYN | TH_ACK | TH_FIN | TH_RST)) ^ TH_ACK) |
                     ((v->flags & (BPFP_CT_REPLY | BPFP_CT_FIN | BPFP_CT_CLOSING |
                                   BPFP_CT_TIME_WAIT | BPFP_CT_FIN_ACKED)) ^
                      (BPFP_CT_FIN | BPFP_CT_CLOSING));
        if (!last)
                add |= BPFP_CT_FIN_ACKED;
        if (v->flags & BPFP_CT_DSR) {
                /* the entry node of a DSR flow sees the client's side alone: its ACK of the
                 * backend's SYN-ACK establishes the flow, its FIN closes it */
                if ((p->tcp_flags & (TH_SYN | TH_ACK)) == TH_ACK &&
                    !(v->flags & BPFP_CT_ESTABLISHED))
                        add |= BPFP_CT_ESTABLISHED;
                if (p->tcp_flags & TH_FIN)
                        add |= BPFP_CT_CLOSING;
        }
        if ((p->tcp_flags & TH_FIN) && !(v->flags & BPFP_CT_FIN)) {
                ct_set_flags(v, BPFP_CT_FIN);
                add |= BPFP_CT_FIN;     /* tells the other entry, which checks its own */
        }
        if (!add)
                return;
        struct ct_key other = {};
        struct ct_value *o = partner_of(&p->t, v, &other);
        if (!o) {
                ct_set_flags(v, add & CT_SHARED & ~BPFP_CT_FIN_ACKED);
                return;
        }
        if (add & BPFP_CT_FIN) {
                if (o->flags & BPFP_CT_FIN)
                        add |= BPFP_CT_CLOSING;
                else if (v->flags & BPFP_CT_REPLY)
                        add |= BPFP_CT_TIME_WAIT;       /* the backend's FIN came first */
        }
        /* the last ACK's only after both FINs (not an RST's closing): FIN_ACKED is FIN << 4 */
        add &= ~((~o->flags & BPFP_CT_FIN) << 4);
        ct_set_flags(v, add & CT_SHARED);
        ct_set_flags(o, add & CT_SHARED);
        o->expires = now + lifetime(p, o->flags);
}

/* An entry lives while packets use it. Its partner is refreshed too, at most every
 * quarter of a lifetime: a one-way stream keeps its reply direction (and its SNAT port)
 * alive, and the two entries of a flow expire together. */
static __always_inline void keep_alive(struct pkt *p, struct ct_value *v, __u64 now)
{
        __u64 life = lifetime(p, v->flags);
        v->expires = now + life;
        __u32 seconds = now / NSEC;
        if (seconds - v->partner_refreshed < life / NSEC / 4)
                return;
        v->partner_refreshed = seconds;
        struct ct_key other = {};
        partner_key(&p->t, v, &other);
        struct ct_value *o = bpfp_ct.lookup(&other);
        if (o)
                o->expires = now + lifetime(p, o->flags);
}

/* --- the steps both programs take ---------------------------------------------------- */

/* The packet's flow: its entry, or NULL for a new flow. A flow past its time goes (both
 * entries). A closed one whose client tuple opens a new connection (a SYN on ingress) is
 * left for a new flow, balanced afresh: its forward entry is overwritten by the new
 * flow's, and its reply entry, which no longer finds a partner, holds its old port until
 * it is over (claim_snat may take it) or past its time. Not deleted here: that would take
 * a claim (the port's entry may be another CPU's by now), which costs the verifier more
 * than the program may have. */
static __always_inline struct ct_value *np_find_flow(struct pkt *p, int ingress, __u64 now)
{
        struct ct_value *v = bpfp_ct.lookup(&p->t);
        if (v && v->expires < now && !expire_flow(&p->t, v, now)) {
                tc_event(BPFP_TCEV_FLOW_EXPIRED);
                v = NULL;
        }
        if (v && ingress && (p->tcp_flags & (TH_SYN | TH_ACK)) == TH_SYN &&
            (v->flags & (BPFP_CT_CLOSING | BPFP_CT_REPLY)) == BPFP_CT_CLOSING) {
                v = NULL;
        }
        return v;
}

/* What a new flow's first packet gets: not ours, dropped (counted), or a backend. */
#define NP_PASS 0
#define NP_DROP 1
#define NP_GO   2

static __always_inline int np_count_drop(struct pkt *p, struct svc_value *svc, int refused)
{
        struct bpfp_delta d = { .refused = refused, .dropped = !refused };
        bpfp_count(svc->svc_id, p->t.family, NULL, 0, &d);
        return NP_DROP;
}

/* The service the packet is for and the backend it goes to. */
static __always_inline int np_choose(struct pkt *p, struct svc_value **svc_out,
                                     struct lb_backend *be)
{
        struct svc_value *svc = find_service(p);
        if (!svc)
                return NP_PASS;                 /* not a service address: not ours */
        /* a TCP flow starts with a SYN; anything else without a flow (a stray ACK or RST,
         * a flow the LRU forgot) would take a port and a backend for nothing */
        if (p->t.proto == IPPROTO_TCP && (p->tcp_flags & (TH_SYN | TH_ACK | TH_RST)) != TH_SYN) {
                tc_event(BPFP_TCEV_TCP_NOT_SYN);
                return NP_DROP;
        }
        if (!source_allowed(p, svc))
                return np_count_drop(p, svc, 0);
        /* no backend: dropped (externalTrafficPolicy Local without a local endpoint is
         * kube-proxy's DROP too; with none anywhere kube-proxy REJECTs) */
        if (svc->count == 0 || !select_backend(p, svc, be))
                return np_count_drop(p, svc, 1);
        *svc_out = svc;
        return NP_GO;
}

/* The flow's two entries: fwd (returned) rewrites the packet to the backend, from node
 * (SNAT) when given; the reply entry rewrites back. 0 when no SNAT port was free. dsr: a
 * DSR flow (no node), whose reply entry only ICMP errors use: its replies go elsewhere. */
static __always_inline int np_open_flow(struct pkt *p, struct svc_value *svc,
                                        struct lb_backend *be, struct ifaddr_value *node,
                                        int dsr, __u64 now, struct ct_value *fwd)
{
        fwd->sport = p->t.sport;
        fwd->dport = be->port;
        fwd->svc_id = svc->svc_id;
        __builtin_memcpy(fwd->saddr, p->t.saddr, 16);
        __builtin_memcpy(fwd->daddr, be->addr, 16);
        struct ct_value rev = { .sport = p->t.dport, .dport = p->t.sport,
                                .svc_id = svc->svc_id, .flags = BPFP_CT_REPLY };
        __builtin_memcpy(rev.saddr, p->t.daddr, 16);
        __builtin_memcpy(rev.daddr, p->t.saddr, 16);
        __u64 life = p->t.proto == IPPROTO_TCP ? BPFP_CT_SYN_TIMEOUT * NSEC
                                                : BPFP_CT_UDP_TIMEOUT * NSEC;
        fwd->expires = rev.expires = now + life;
        struct ct_key rkey = {};
        if (node) {
                __builtin_memcpy(fwd->saddr, node->addr, 16);
                fwd->flags = rev.flags = BPFP_CT_SNAT;
                rev.flags |= BPFP_CT_REPLY;
                if (!claim_snat(p, fwd, &rev, &rkey, now))
                        return 0;
        } else {
                if (dsr) {
                        fwd->flags = rev.flags = BPFP_CT_DSR;
                        rev.flags |= BPFP_CT_REPLY;
                }
                reply_key(&p->t, fwd, &rkey);
                bpfp_ct.update(&rkey, &rev);
        }
        bpfp_ct.update(&p->t, fwd);
        return 1;
}

/* The backend's node of a DSR flow: a packet that came with the option opens the flow
 * unless it is open. Its forward entry keeps the packet as it is (the entry node DNATed
 * it), its reply entry answers from the service address and port the option names. The
 * service is not looked up: a NodePort names the entry node's address, which is no
 * frontend here; so these entries have no svc_id (0) and count nothing (the entry node
 * counts the flow). */
static __always_inline void np_dsr_arrived(struct pkt *p, struct np_dsr *dsr, __u64 now)
{
        __u64 life = p->t.proto == IPPROTO_TCP ? BPFP_CT_SYN_TIMEOUT * NSEC
                                                : BPFP_CT_UDP_TIMEOUT * NSEC;
        struct ct_value fwd = { .sport = p->t.sport, .dport = p->t.dport,
                                .expires = now + life, .flags = BPFP_CT_DSR_BACKEND };
        __builtin_memcpy(fwd.saddr, p->t.saddr, 16);
        __builtin_memcpy(fwd.daddr, p->t.daddr, 16);
        struct ct_value rev = { .sport = dsr->port, .dport = p->t.sport,
                                .expires = now + life,
                                .flags = BPFP_CT_DSR_BACKEND | BPFP_CT_REPLY };
        __builtin_memcpy(rev.saddr, dsr->addr, 16);
        __builtin_memcpy(rev.daddr, p->t.saddr, 16);
        struct ct_key rkey = {};
        partner_key(&p->t, &fwd, &rkey);
        bpfp_ct.update(&rkey, &rev);
        bpfp_ct.update(&p->t, &fwd);
}

/* A packet of a known flow: TCP state, lifetimes and counters (the caller rewrites). */
static __always_inline void np_flow_packet(struct pkt *p, struct ct_value *v, __u64 now)
{
        if (p->t.proto == IPPROTO_TCP)
                track_tcp(p, v, now);
        keep_alive(p, v, now);
        if (v->flags & BPFP_CT_DSR_BACKEND)
                return;                         /* no service here (np_dsr_arrived) */
        struct bpfp_delta d = { .packets = 1, .bytes = p->len };
        count_flow(p, v, &d);
}

#endif /* BPFP_NODEPORT_H */
