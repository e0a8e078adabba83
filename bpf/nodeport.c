/* bpf/nodeport.c: traffic from outside the node to NodePort, ExternalIP and LoadBalancer
 * addresses (and ClusterIPs routed to the node), on the node's interfaces (tcx ingress
 * and egress). Per packet: DNAT to a backend, conntrack in an LRU map, SNAT to the node
 * when the backend is on another node, reverse NAT on the way back. Both families share
 * one code path: addresses travel as four words, IPv4 in word 0. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
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

/* Not ours: the next program on the hook (tcx), else the stack, sees it unchanged. */
#define PASS TC_ACT_UNSPEC

/* BCC's declaration predates the helper's params argument (Linux 5.11) */
static long (*redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
        (void *)BPF_FUNC_redirect_neigh;

/* A parsed packet: where its headers are and its tuple. */
struct pkt {
        struct ct_key t;
        __u32 l3;               /* offset of the IP header */
        __u32 l4;               /* offset of the TCP/UDP header */
        __u32 len;              /* bytes, for counters */
        __u8  tcp_flags;        /* FIN 1, SYN 2, RST 4, ACK 16 */
};

/* --- parsing: anything we do not handle passes untouched ----------------------------- */

static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
        void *data = (void *)(long)skb->data;
        void *end = (void *)(long)skb->data_end;
        struct ethhdr *eth = data;
        if ((void *)(eth + 1) > end)
                return 0;
        p->l3 = sizeof(*eth);
        p->len = skb->len;
        if (eth->h_proto == bpf_htons(ETH_P_IP)) {
                struct iphdr *ip = (void *)(eth + 1);
                if ((void *)(ip + 1) > end || ip->version != 4 || ip->ihl < 5)
                        return 0;
                if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
                        return 0;       /* fragments: no ports to translate */
                p->t.family = 4;
                p->t.proto = ip->protocol;
                p->t.saddr[0] = ip->saddr;
                p->t.daddr[0] = ip->daddr;
                p->l4 = p->l3 + ip->ihl * 4;
        } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
                struct ipv6hdr *ip6 = (void *)(eth + 1);
                if ((void *)(ip6 + 1) > end || ip6->version != 6)
                        return 0;
                /* extension headers (fragments among them) are not followed */
                p->t.family = 6;
                p->t.proto = ip6->nexthdr;
                __builtin_memcpy(p->t.saddr, &ip6->saddr, 16);
                __builtin_memcpy(p->t.daddr, &ip6->daddr, 16);
                p->l4 = p->l3 + sizeof(*ip6);
        } else {
                return 0;
        }
        if (p->t.proto == IPPROTO_TCP) {
                struct tcphdr *tcp = data + p->l4;
                if ((void *)(tcp + 1) > end)
                        return 0;
                p->t.sport = tcp->source;
                p->t.dport = tcp->dest;
                p->tcp_flags = ((__u8 *)tcp)[13];
                return 1;
        }
        if (p->t.proto == IPPROTO_UDP) {
                struct udphdr *udp = data + p->l4;
                if ((void *)(udp + 1) > end)
                        return 0;
                p->t.sport = udp->source;
                p->t.dport = udp->dest;
                return 1;
        }
        return 0;
}

/* --- rewriting, with checksums kept right --------------------------------------------- */

static __always_inline __u32 l4_csum_off(struct pkt *p)
{
        return p->l4 + (p->t.proto == IPPROTO_TCP ? __builtin_offsetof(struct tcphdr, check)
                                                  : __builtin_offsetof(struct udphdr, check));
}

static __always_inline int set_addr(struct __sk_buff *skb, struct pkt *p, int dst,
                                    const __be32 *old, const __be32 *new)
{
        __u64 flags = BPF_F_PSEUDO_HDR | (p->t.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0);
        if (p->t.family == 4) {
                if (old[0] == new[0])
                        return 0;
                __u32 off = p->l3 + (dst ? __builtin_offsetof(struct iphdr, daddr)
                                         : __builtin_offsetof(struct iphdr, saddr));
                if (bpf_l4_csum_replace(skb, l4_csum_off(p), old[0], new[0], flags | 4) ||
                    bpf_l3_csum_replace(skb, p->l3 + __builtin_offsetof(struct iphdr, check),
                                        old[0], new[0], 4))
                        return -1;
                return bpf_skb_store_bytes(skb, off, (void *)&new[0], 4, 0);
        }
        __u32 off = p->l3 + (dst ? __builtin_offsetof(struct ipv6hdr, daddr)
                                 : __builtin_offsetof(struct ipv6hdr, saddr));
#pragma unroll
        for (int i = 0; i < 4; i++) {
                if (old[i] != new[i] &&
                    bpf_l4_csum_replace(skb, l4_csum_off(p), old[i], new[i], flags | 4))
                        return -1;
        }
        return bpf_skb_store_bytes(skb, off, (void *)new, 16, 0);
}

static __always_inline int set_port(struct __sk_buff *skb, struct pkt *p, int dst,
                                    __be16 old, __be16 new)
{
        if (old == new)
                return 0;
        __u64 flags = p->t.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
        __u32 off = p->l4 + (dst ? 2 : 0);      /* dest follows source in TCP and UDP */
        if (bpf_l4_csum_replace(skb, l4_csum_off(p), old, new, flags | 2))
                return -1;
        return bpf_skb_store_bytes(skb, off, &new, 2, 0);
}

/* The packet's tuple becomes the entry's. */
static __always_inline int rewrite(struct __sk_buff *skb, struct pkt *p, struct ct_value *v)
{
        if (set_addr(skb, p, 0, p->t.saddr, v->saddr) ||
            set_addr(skb, p, 1, p->t.daddr, v->daddr) ||
            set_port(skb, p, 0, p->t.sport, v->sport) ||
            set_port(skb, p, 1, p->t.dport, v->dport))
                return -1;
        return 0;
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

/* The reply's key: the forward rewrite, swapped. */
static __always_inline void reply_key(struct ct_key *fwd, struct ct_value *v,
                                      struct ct_key *out)
{
        __builtin_memcpy(out->saddr, v->daddr, 16);
        __builtin_memcpy(out->daddr, v->saddr, 16);
        out->sport = v->dport;
        out->dport = v->sport;
        out->proto = fwd->proto;
        out->family = fwd->family;
        out->pad = 0;
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
        reply_key(key, v, other);
        struct ct_value *o = bpfp_ct.lookup(other);
        if (!o)
                return NULL;
        struct ct_key back = {};
        reply_key(other, o, &back);
        return same_key(&back, key) ? o : NULL;
}

/* A flow is over when neither of its entries is alive (a one-way stream refreshes its
 * partner only now and then, so one entry alone may lag). Its entries are removed and
 * 0 returned; a live flow's lagging entry takes its partner's time and 1 is returned. */
static __always_inline int expire_flow(struct ct_key *key, struct ct_value *v, __u64 now)
{
        struct ct_key other = {};
        struct ct_value *o = partner_of(key, v, &other);
        if (o && o->expires >= now) {
                v->expires = o->expires;
                return 1;
        }
        if (o)
                bpfp_ct.delete(&other);
        bpfp_ct.delete(key);
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

/* Where the kernel would send a packet for dst: its egress interface; ROUTE_LOCAL for an
 * address of this node (a hostNetwork backend); ROUTE_NONE when nowhere. */
#define ROUTE_NONE  0
#define ROUTE_LOCAL 0xffffffff
static __always_inline __u32 route_out(struct __sk_buff *skb, __u8 family, const __be32 *src,
                                       const __be32 *dst)
{
        struct bpf_fib_lookup fib = {};
        fib.ifindex = skb->ingress_ifindex;
        if (family == 4) {
                fib.family = BPFP_AF_INET;
                fib.ipv4_src = src[0];
                fib.ipv4_dst = dst[0];
        } else {
                fib.family = BPFP_AF_INET6;
                __builtin_memcpy(fib.ipv6_src, src, 16);
                __builtin_memcpy(fib.ipv6_dst, dst, 16);
        }
        long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
        if (rc == BPF_FIB_LKUP_RET_NOT_FWDED)
                return ROUTE_LOCAL;
        if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
                return ROUTE_NONE;
        return fib.ifindex;
}

/* Claim a node port for a SNATed flow: the reply entry is inserted only if no other flow
 * holds that (backend, node address, port). A port whose flow is over (closed and past
 * the close timeout, or idle past its lifetime) is taken back here, at once: waiting for
 * a packet of that flow, or for the LRU to evict it, would leave the port lost.
 * Two plain loops and one take-over between them keep the verifier's work small. */
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
                if (old && old->expires < now)
                        break;                  /* a finished flow's, perhaps: see below */
                old = NULL;
        }
        if (old) {
                /* taken when its partner is past its time too; another CPU may take it
                 * first: then its insert wins and we go on */
                if (!expire_flow(rkey, old, now) && bpfp_ct.insert(rkey, rev) == 0) {
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

#define DROP(p, svc, what) ({                                           \
        struct bpfp_delta d = { .what = 1 };                            \
        bpfp_count((svc)->svc_id, (p)->t.family, NULL, 0, &d);          \
        TC_ACT_SHOT; })

static __always_inline int new_flow(struct __sk_buff *skb, struct pkt *p)
{
        struct svc_value *svc = find_service(p);
        if (!svc)
                return PASS;                    /* not a service address: not ours */
        /* a TCP flow starts with a SYN; anything else without a flow (a stray ACK or RST,
         * a flow the LRU forgot) would take a port and a backend for nothing */
        if (p->t.proto == IPPROTO_TCP && (p->tcp_flags & (TH_SYN | TH_ACK | TH_RST)) != TH_SYN) {
                tc_event(BPFP_TCEV_TCP_NOT_SYN);
                return TC_ACT_SHOT;
        }
        if (!source_allowed(p, svc))
                return DROP(p, svc, dropped);
        struct lb_backend be = {};
        /* no backend: dropped (externalTrafficPolicy Local without a local endpoint is
         * kube-proxy's DROP too; with none anywhere kube-proxy REJECTs) */
        if (svc->count == 0 || !select_backend(p, svc, &be))
                return DROP(p, svc, refused);

        __u64 now = bpf_ktime_get_ns();
        struct ct_value fwd = { .sport = p->t.sport, .dport = be.port, .svc_id = svc->svc_id };
        __builtin_memcpy(fwd.saddr, p->t.saddr, 16);
        __builtin_memcpy(fwd.daddr, be.addr, 16);
        struct ct_value rev = { .sport = p->t.dport, .dport = p->t.sport,
                                .svc_id = svc->svc_id, .flags = BPFP_CT_REPLY };
        __builtin_memcpy(rev.saddr, p->t.daddr, 16);
        __builtin_memcpy(rev.daddr, p->t.saddr, 16);

        /* Where the backend runs is the model's word, carried in its slot: one on this
         * node (a pod here, or the node itself) gets the packet as it came, with the
         * client's address; so does every backend of an externalTrafficPolicy Local
         * frontend, all of them local. One on another node is SNATed to this node's
         * address on the interface the route leaves through (bpfp_ifaddr: the
         * --interfaces), so its reply comes back here to be translated. The route is only
         * the path: a bridge holding both the uplink and the pods is one of the
         * --interfaces, and a pod behind it is still here. A remote backend reached where
         * the node has no address the programs know is sent as it is. */
        __u32 out = route_out(skb, p->t.family, p->t.saddr, be.addr);
        if (out == ROUTE_NONE)
                return DROP(p, svc, refused);
        struct ifaddr_key ikey = { .ifindex = out, .family = p->t.family };
        struct ifaddr_value *node = NULL;
        if (!(be.flags & BPFP_BE_LOCAL) && out != ROUTE_LOCAL)
                node = bpfp_ifaddr.lookup(&ikey);
        int snat = node != NULL;
        __u64 life = p->t.proto == IPPROTO_TCP ? BPFP_CT_SYN_TIMEOUT * NSEC
                                                : BPFP_CT_UDP_TIMEOUT * NSEC;
        fwd.expires = rev.expires = now + life;
        struct ct_key rkey = {};
        if (node) {
                __builtin_memcpy(fwd.saddr, node->addr, 16);
                fwd.flags = rev.flags = BPFP_CT_SNAT;
                rev.flags |= BPFP_CT_REPLY;
                if (!claim_snat(p, &fwd, &rev, &rkey, now))
                        return DROP(p, svc, refused);
        } else {
                reply_key(&p->t, &fwd, &rkey);
                bpfp_ct.update(&rkey, &rev);
        }
        bpfp_ct.update(&p->t, &fwd);

        bpfp_count_connection(svc->svc_id, p->t.family, be.addr, be.port, 1, p->len);
        if (rewrite(skb, p, &fwd))
                return TC_ACT_SHOT;
        /* the new source is the node's own address: the input path would drop it as a
         * martian, so it leaves straight from the egress side */
        return snat ? redirect_neigh(out, NULL, 0, 0) : TC_ACT_OK;
}

/* TCP's progress on both entries of a flow: established once a reply passed, closing
 * after an RST or a FIN each way (then the short close timeout applies, or the backend's
 * TIME_WAIT when it closed first and the flow is SNATed). */
#define CT_SHARED (BPFP_CT_ESTABLISHED | BPFP_CT_CLOSING | BPFP_CT_TIME_WAIT)
static __always_inline void track_tcp(struct pkt *p, struct ct_value *v, __u64 now)
{
        __u32 add = 0;
        if ((v->flags & BPFP_CT_REPLY) && !(v->flags & BPFP_CT_ESTABLISHED))
                add |= BPFP_CT_ESTABLISHED;
        if (p->tcp_flags & TH_RST)
                add |= BPFP_CT_CLOSING;
        if ((p->tcp_flags & TH_FIN) && !(v->flags & BPFP_CT_FIN)) {
                v->flags |= BPFP_CT_FIN;
                add |= BPFP_CT_FIN;     /* tells the other entry, which checks its own */
        }
        if (!add)
                return;
        struct ct_key other = {};
        struct ct_value *o = partner_of(&p->t, v, &other);
        if (o && (add & BPFP_CT_FIN)) {
                if (o->flags & BPFP_CT_FIN)
                        add |= BPFP_CT_CLOSING;
                else if (v->flags & BPFP_CT_REPLY)
                        add |= BPFP_CT_TIME_WAIT;       /* the backend's FIN came first */
        }
        v->flags |= add & CT_SHARED;
        if (!o)
                return;
        o->flags |= add & CT_SHARED;
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
        reply_key(&p->t, v, &other);
        struct ct_value *o = bpfp_ct.lookup(&other);
        if (o)
                o->expires = now + lifetime(p, o->flags);
}

/* --- ICMP errors about translated flows ------------------------------------------------
 * A "fragmentation needed" / "packet too big" (path MTU), "unreachable" or "time exceeded"
 * quotes the packet it is about, as that packet looked where the error was raised: after
 * our translation on one side, before it on the other. The quoted packet's reverse tuple is
 * a conntrack key; its entry's rewrite tells what the packet was on the other side, so the
 * quote is rewritten to that and the error sent to whoever sent it there (kube-proxy gets
 * the same from conntrack's RELATED NAT). */

#define ICMP_DEST_UNREACH   3
#define ICMP_TIME_EXCEEDED  11
#define ICMP6_DEST_UNREACH  1
#define ICMP6_PKT_TOOBIG    2
#define ICMP6_TIME_EXCEED   3
#define ICMP_HDR            8

/* Rewrite `words` 32-bit words at off to new (old read from the packet), keeping the
 * ICMP checksum at csum right; pseudo: the words are in ICMPv6's pseudo-header. */
static __always_inline int icmp_store(struct __sk_buff *skb, __u32 off, const __be32 *new,
                                      int words, __u32 csum, int pseudo)
{
        __be32 old[4] = {};
        if (bpf_skb_load_bytes(skb, off, old, words * 4))
                return -1;
#pragma unroll
        for (int i = 0; i < 4; i++) {
                if (i < words && old[i] != new[i] &&
                    bpf_l4_csum_replace(skb, csum, old[i], new[i],
                                        4 | (pseudo ? BPF_F_PSEUDO_HDR : 0)))
                        return -1;
        }
        return bpf_skb_store_bytes(skb, off, (void *)new, words * 4, 0);
}

static __always_inline int icmp_store_port(struct __sk_buff *skb, __u32 off, __be16 new,
                                           __u32 csum)
{
        __be16 old;
        if (bpf_skb_load_bytes(skb, off, &old, 2))
                return -1;
        if (old == new)
                return 0;
        if (bpf_l4_csum_replace(skb, csum, old, new, 2))
                return -1;
        return bpf_skb_store_bytes(skb, off, &new, 2, 0);
}

/* The quoted IPv4 header's checksum changes with its addresses, and is itself quoted. */
static __always_inline int icmp_store_inner4(struct __sk_buff *skb, __u32 inner, __u32 field,
                                             __be32 new, __u32 csum)
{
        __be32 old;
        __be16 check_old, check_new;
        if (bpf_skb_load_bytes(skb, inner + field, &old, 4) || old == new)
                return 0;
        if (bpf_skb_load_bytes(skb, inner + 10, &check_old, 2) ||
            bpf_l3_csum_replace(skb, inner + 10, old, new, 4) ||
            bpf_skb_load_bytes(skb, inner + 10, &check_new, 2) ||
            bpf_l4_csum_replace(skb, csum, check_old, check_new, 2))
                return -1;
        return icmp_store(skb, inner + field, &new, 1, csum, 0);
}

/* An outer IPv4 address (ICMP's checksum does not cover it; the IP header's does). */
static __always_inline int outer4(struct __sk_buff *skb, __u32 off, __be32 new)
{
        __be32 old;
        if (bpf_skb_load_bytes(skb, off, &old, 4))
                return -1;
        if (old == new)
                return 0;
        if (bpf_l3_csum_replace(skb, 14 + 10, old, new, 4))
                return -1;
        return bpf_skb_store_bytes(skb, off, &new, 4, 0);
}

static __always_inline int icmp_error(struct __sk_buff *skb)
{
        __u8 head[2];
        __u16 proto;
        if (bpf_skb_load_bytes(skb, 12, &proto, 2))
                return PASS;
        struct ct_key key = {};
        __u32 l3 = 14, icmp, inner, inner_l4;
        if (proto == bpf_htons(ETH_P_IP)) {
                struct iphdr ip;
                if (bpf_skb_load_bytes(skb, l3, &ip, sizeof(ip)) || ip.ihl < 5 ||
                    ip.protocol != IPPROTO_ICMP || ip.frag_off & bpf_htons(IP_MF | IP_OFFSET))
                        return PASS;
                icmp = l3 + ip.ihl * 4;
                if (bpf_skb_load_bytes(skb, icmp, head, 2) ||
                    (head[0] != ICMP_DEST_UNREACH && head[0] != ICMP_TIME_EXCEEDED))
                        return PASS;
                inner = icmp + ICMP_HDR;
                struct iphdr in;
                if (bpf_skb_load_bytes(skb, inner, &in, sizeof(in)) || in.ihl < 5 ||
                    in.frag_off & bpf_htons(IP_OFFSET))   /* a later fragment: no ports */
                        return PASS;
                inner_l4 = inner + in.ihl * 4;
                key.family = 4;
                key.proto = in.protocol;
                key.saddr[0] = in.daddr;         /* the quote, reversed: a conntrack key */
                key.daddr[0] = in.saddr;
        } else if (proto == bpf_htons(ETH_P_IPV6)) {
                struct ipv6hdr ip6;
                if (bpf_skb_load_bytes(skb, l3, &ip6, sizeof(ip6)) || ip6.nexthdr != 58)
                        return PASS;
                icmp = l3 + sizeof(ip6);
                if (bpf_skb_load_bytes(skb, icmp, head, 2) ||
                    (head[0] != ICMP6_DEST_UNREACH && head[0] != ICMP6_PKT_TOOBIG &&
                     head[0] != ICMP6_TIME_EXCEED))
                        return PASS;
                inner = icmp + ICMP_HDR;
                struct ipv6hdr in;
                if (bpf_skb_load_bytes(skb, inner, &in, sizeof(in)))
                        return PASS;
                inner_l4 = inner + sizeof(in);
                key.family = 6;
                key.proto = in.nexthdr;
                __builtin_memcpy(key.saddr, &in.daddr, 16);
                __builtin_memcpy(key.daddr, &in.saddr, 16);
        } else {
                return PASS;
        }
        if (key.proto != IPPROTO_TCP && key.proto != IPPROTO_UDP)
                return PASS;
        __be16 ports[2];
        if (bpf_skb_load_bytes(skb, inner_l4, ports, 4))
                return PASS;
        key.sport = ports[1];
        key.dport = ports[0];
        struct ct_value *v = bpfp_ct.lookup(&key);
        if (!v)
                return PASS;                    /* not about a flow of ours */
        struct ct_value r = *v;
        __u32 csum = icmp + 2;
        /* the quote becomes the packet as the other side sent it: source r.daddr, dest
         * r.saddr; the error goes to that sender */
        if (key.family == 4) {
                if (icmp_store_inner4(skb, inner, 12, r.daddr[0], csum) ||
                    icmp_store_inner4(skb, inner, 16, r.saddr[0], csum))
                        return TC_ACT_SHOT;
        } else if (icmp_store(skb, inner + 8, r.daddr, 4, csum, 0) ||
                   icmp_store(skb, inner + 24, r.saddr, 4, csum, 0)) {
                return TC_ACT_SHOT;
        }
        if (icmp_store_port(skb, inner_l4, r.dport, csum) ||
            icmp_store_port(skb, inner_l4 + 2, r.sport, csum))
                return TC_ACT_SHOT;
        /* an error raised by the quoted packet's destination itself (a backend's "port
         * unreachable") comes from the address the sender dialled: the service's */
        __be32 src[4] = {};
        int from_target;
        if (key.family == 4) {
                if (bpf_skb_load_bytes(skb, l3 + 12, src, 4))
                        return TC_ACT_SHOT;
                from_target = src[0] == key.saddr[0];
        } else {
                if (bpf_skb_load_bytes(skb, l3 + 8, src, 16))
                        return TC_ACT_SHOT;
                from_target = src[0] == key.saddr[0] && src[1] == key.saddr[1] &&
                              src[2] == key.saddr[2] && src[3] == key.saddr[3];
        }
        if (key.family == 4) {
                if (outer4(skb, l3 + 16, r.daddr[0]) ||
                    (from_target && outer4(skb, l3 + 12, r.saddr[0])))
                        return TC_ACT_SHOT;
        } else if (icmp_store(skb, l3 + 24, r.daddr, 4, csum, 1) ||
                   (from_target && icmp_store(skb, l3 + 8, r.saddr, 4, csum, 1))) {
                return TC_ACT_SHOT;
        }
        return TC_ACT_OK;
}

/* --- entry points --------------------------------------------------------------------- */

static __always_inline int handle(struct __sk_buff *skb, int ingress)
{
        struct pkt p = {};
        if (!parse(skb, &p))
                return icmp_error(skb);
        struct ct_value *v = bpfp_ct.lookup(&p.t);
        __u64 now = bpf_ktime_get_ns();
        if (v && v->expires < now && !expire_flow(&p.t, v, now)) {
                tc_event(BPFP_TCEV_FLOW_EXPIRED);
                v = NULL;
        }
        /* a new connection on a tuple whose last one closed: balanced afresh */
        if (v && ingress && (p.tcp_flags & (TH_SYN | TH_ACK)) == TH_SYN &&
            (v->flags & (BPFP_CT_CLOSING | BPFP_CT_REPLY)) == BPFP_CT_CLOSING) {
                struct ct_key other = {};
                if (partner_of(&p.t, v, &other))
                        bpfp_ct.delete(&other);
                bpfp_ct.delete(&p.t);
                v = NULL;
        }
        if (!v)
                return ingress ? new_flow(skb, &p) : PASS;

        if (p.t.proto == IPPROTO_TCP)
                track_tcp(&p, v, now);
        keep_alive(&p, v, now);
        __u32 flags = v->flags;
        struct bpfp_delta d = { .packets = 1, .bytes = p.len };
        count_flow(&p, v, &d);
        struct ct_value to = *v;
        if (rewrite(skb, &p, &to))
                return TC_ACT_SHOT;
        if (ingress && (flags & (BPFP_CT_SNAT | BPFP_CT_REPLY))) {
                /* both directions of a SNATed flow carry a node address as source or
                 * destination, and so does the reply of a backend on this node that comes
                 * in here (its pod behind a bridge that is one of the --interfaces) once
                 * translated: the input path would drop them as martians, so they are
                 * routed out directly (see new_flow) */
                __u32 out = route_out(skb, p.t.family, to.saddr, to.daddr);
                if (out != ROUTE_NONE && out != ROUTE_LOCAL)
                        return redirect_neigh(out, NULL, 0, 0);
        }
        return TC_ACT_OK;
}

int bpfp_tc_ingress(struct __sk_buff *skb)
{
        return handle(skb, 1);
}

int bpfp_tc_egress(struct __sk_buff *skb)
{
        return handle(skb, 0);
}
