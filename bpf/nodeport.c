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
#include "nodeport.h"

/* Not ours: the next program on the hook (tcx), else the stack, sees it unchanged. */
#define PASS TC_ACT_UNSPEC

/* ICMP types (and ICMP's header size) this file reads or writes */
#define ICMP_DEST_UNREACH   3
#define ICMP_TIME_EXCEEDED  11
#define ICMP6_DEST_UNREACH  1
#define ICMP6_PKT_TOOBIG    2
#define ICMP6_TIME_EXCEED   3
#define ICMP_HDR            8

/* BCC's declaration predates the helper's params argument (Linux 5.11) */
static long (*redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
        (void *)BPF_FUNC_redirect_neigh;


/* --- parsing: anything we do not handle passes untouched ----------------------------- */

static __always_inline int parse(struct __sk_buff *skb, struct pkt *p, struct np_dsr *dsr)
{
        return np_parse((void *)(long)skb->data, (void *)(long)skb->data_end, skb->len, dsr, p);
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



/* Where the kernel would send a packet for dst: its egress interface; ROUTE_LOCAL for an
 * address of this node (a hostNetwork backend); ROUTE_NONE when nowhere. With tot_len (the
 * packet's IP length), ROUTE_TOO_BIG when that exceeds the way's MTU, then in *mtu. */
#define ROUTE_NONE    0
#define ROUTE_LOCAL   0xffffffff
#define ROUTE_TOO_BIG 0xfffffffe
static __always_inline __u32 route_mtu(struct __sk_buff *skb, __u8 family, const __be32 *src,
                                       const __be32 *dst, __u16 tot_len, __u32 *mtu,
                                       __be32 *hop)
{
        struct bpf_fib_lookup fib = {};
        fib.ifindex = skb->ingress_ifindex;
        fib.tot_len = tot_len;
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
        if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED && mtu) {
                *mtu = fib.mtu_result;
                return ROUTE_TOO_BIG;
        }
        if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
                return ROUTE_NONE;
        if (hop && family == 4)                 /* the next hop: a gateway, or dst */
                hop[0] = fib.ipv4_dst;
        else if (hop)
                __builtin_memcpy(hop, fib.ipv6_dst, 16);
        return fib.ifindex;
}

static __always_inline __u32 route_out(struct __sk_buff *skb, __u8 family, const __be32 *src,
                                       const __be32 *dst)
{
        return route_mtu(skb, family, src, dst, 0, NULL, NULL);
}


/* --- direct server return: the entry node's side (nodeport.h has the format) --------- */

/* The DSR option after the IP header, naming the service address and port the client sent
 * to (p's tuple as it came): room made with bpf_skb_adjust_room, then the header's length
 * fields (and IPv4's checksum, computed anew) say so. The L4 checksums do not cover it. */
static __always_inline int dsr_add_option(struct __sk_buff *skb, struct pkt *p)
{
        if (p->t.family == 4) {
                struct {
                        struct iphdr ip;
                        struct dsr_opt4 opt;
                } h = {};
                if (bpf_skb_load_bytes(skb, p->l3, &h.ip, sizeof(h.ip)) ||
                    h.ip.ihl > 15 - DSR_OPT4_LEN / 4)
                        return -1;
                if (bpf_skb_adjust_room(skb, DSR_OPT4_LEN, BPF_ADJ_ROOM_NET, 0))
                        return -1;
                h.opt.type = DSR_OPT4_TYPE;
                h.opt.len = DSR_OPT4_LEN;
                h.opt.port = p->t.dport;
                h.opt.addr = p->t.daddr[0];
                h.ip.ihl += DSR_OPT4_LEN / 4;
                h.ip.tot_len = bpf_htons(bpf_ntohs(h.ip.tot_len) + DSR_OPT4_LEN);
                h.ip.check = 0;
                __u32 sum = bpf_csum_diff(NULL, 0, &h, sizeof(h), 0);
                sum = (sum & 0xffff) + (sum >> 16);
                sum = (sum & 0xffff) + (sum >> 16);
                h.ip.check = ~sum;
                return bpf_skb_store_bytes(skb, p->l3, &h, sizeof(h), 0);
        }
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, p->l3, &ip6, sizeof(ip6)))
                return -1;
        struct dsr_ext6 ext = { .nexthdr = ip6.nexthdr, .hdrlen = (DSR_EXT6_LEN - 8) / 8,
                                .type = DSR_OPT6_TYPE, .len = DSR_OPT6_LEN,
                                .port = p->t.dport };
        __builtin_memcpy(ext.addr, p->t.daddr, 16);
        if (bpf_skb_adjust_room(skb, DSR_EXT6_LEN, BPF_ADJ_ROOM_NET, 0))
                return -1;
        ip6.nexthdr = IPV6_NEXTHDR_DEST;
        ip6.payload_len = bpf_htons(bpf_ntohs(ip6.payload_len) + DSR_EXT6_LEN);
        if (bpf_skb_store_bytes(skb, p->l3, &ip6, 8, 0))       /* up to the addresses */
                return -1;
        return bpf_skb_store_bytes(skb, p->l3 + sizeof(ip6), &ext, sizeof(ext), 0);
}

static __always_inline __u16 csum_fold(__u32 sum)
{
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        return ~sum;
}

/* A packet that the DSR option would make too big for the way to the backend's node: the
 * packet becomes a "fragmentation needed" (IPv4) / "packet too big" (IPv6) to its sender,
 * from the address it was sent to, quoting it as it came (so the client's socket finds it)
 * and giving the MTU less the option: the client's next packets fit with it. Sent back
 * out where it came in. */
#define ICMP_FRAG_NEEDED 4
static __always_inline int dsr_too_big(struct __sk_buff *skb, struct pkt *p, __u32 mtu)
{
        __u8 macs[12];
        if (bpf_skb_load_bytes(skb, 0, macs, 12))
                return TC_ACT_SHOT;
        if (p->t.family == 4) {
                struct {
                        struct iphdr ip;
                        __u8   type, code;
                        __u16  check;
                        __u16  unused;
                        __be16 mtu;
                        __u8   quote[28];       /* its IP header and 8 bytes more */
                } m = {};
                if (p->l4 != p->l3 + 20 ||
                    bpf_skb_load_bytes(skb, p->l3, m.quote, sizeof(m.quote)))
                        return TC_ACT_SHOT;     /* with IPv4 options: not quoted here */
                m.type = ICMP_DEST_UNREACH;
                m.code = ICMP_FRAG_NEEDED;
                m.mtu = bpf_htons(mtu - DSR_OPT4_LEN);
                m.check = csum_fold(bpf_csum_diff(NULL, 0, &m.type, sizeof(m) - sizeof(m.ip),
                                                  0));
                m.ip.version = 4;
                m.ip.ihl = 5;
                m.ip.tot_len = bpf_htons(sizeof(m));
                m.ip.ttl = 64;
                m.ip.protocol = IPPROTO_ICMP;
                m.ip.saddr = p->t.daddr[0];
                m.ip.daddr = p->t.saddr[0];
                m.ip.check = csum_fold(bpf_csum_diff(NULL, 0, &m.ip, sizeof(m.ip), 0));
                if (bpf_skb_change_tail(skb, p->l3 + sizeof(m), 0) ||
                    bpf_skb_store_bytes(skb, p->l3, &m, sizeof(m), 0))
                        return TC_ACT_SHOT;
        } else {
                struct {
                        __be32 saddr[4];        /* ICMPv6's pseudo-header ... */
                        __be32 daddr[4];
                        __be32 len;
                        __u8   zero[3];
                        __u8   nexthdr;
                        __u8   type, code;      /* ... and the message */
                        __u16  check;
                        __be32 mtu;
                        __u8   quote[48];       /* its IPv6 header and 8 bytes more */
                } m = {};
                if (bpf_skb_load_bytes(skb, p->l3, m.quote, sizeof(m.quote)))
                        return TC_ACT_SHOT;
                __u32 icmp_len = sizeof(m) - 40;
                __builtin_memcpy(m.saddr, p->t.daddr, 16);
                __builtin_memcpy(m.daddr, p->t.saddr, 16);
                m.len = bpf_htonl(icmp_len);
                m.nexthdr = IPPROTO_ICMPV6;
                m.type = ICMP6_PKT_TOOBIG;
                m.mtu = bpf_htonl(mtu - DSR_EXT6_LEN);
                m.check = csum_fold(bpf_csum_diff(NULL, 0, &m, sizeof(m), 0));
                struct ipv6hdr ip6 = { .version = 6, .nexthdr = IPPROTO_ICMPV6,
                                       .hop_limit = 64, .payload_len = bpf_htons(icmp_len) };
                __builtin_memcpy(&ip6.saddr, p->t.daddr, 16);
                __builtin_memcpy(&ip6.daddr, p->t.saddr, 16);
                if (bpf_skb_change_tail(skb, p->l3 + sizeof(ip6) + icmp_len, 0) ||
                    bpf_skb_store_bytes(skb, p->l3, &ip6, sizeof(ip6), 0) ||
                    bpf_skb_store_bytes(skb, p->l3 + sizeof(ip6), &m.type, icmp_len, 0))
                        return TC_ACT_SHOT;
        }
        if (bpf_skb_store_bytes(skb, 0, macs + 6, 6, 0) ||
            bpf_skb_store_bytes(skb, 6, macs, 6, 0))
                return TC_ACT_SHOT;
        return bpf_redirect(skb->ifindex, 0);
}

/* The way out for a packet of a DSR flow on the entry node (the flow's forward entry
 * `to`): DNATed to its backend, keeping the client's address, straight out towards the
 * backend's node. ROUTE_NONE: no way there (dropped); ROUTE_TOO_BIG with *mtu. */
static __always_inline __u32 dsr_route(struct __sk_buff *skb, struct pkt *p,
                                       struct ct_value *to, __u32 *mtu)
{
        __u32 extra = np_dsr_option_len(p);
        __u16 tot_len = 0;
        if (extra && skb->gso_segs <= 1)
                tot_len = skb->len - p->l3 + extra;
        __u32 out = route_mtu(skb, p->t.family, to->saddr, to->daddr, tot_len, mtu, NULL);
        return out == ROUTE_LOCAL ? ROUTE_NONE : out;
}


/* A flow np_dsr_left: its entries go, its backend is kept in *be for the flow opened anew. */
static __always_inline void dsr_flow_left(struct pkt *p, struct ct_value *v,
                                          struct lb_backend *be)
{
        __builtin_memcpy(be->addr, v->daddr, 16);
        be->port = v->dport;
        be->flags = 0;                          /* on another node: it was DSR */
        struct ct_key other = {};
        if (partner_of(&p->t, v, &other))
                bpfp_ct.delete(&other);
        bpfp_ct.delete(&p->t);
}

#define NEW_DSR_FLOW (-1000)            /* no TC_ACT_* */
/* keep: the backend of a flow opened anew (dsr_flow_left), else a backend is chosen */
static __always_inline int new_flow(struct __sk_buff *skb, struct pkt *p,
                                    struct lb_backend *keep)
{
        struct svc_value *svc = NULL;
        struct lb_backend be = {};
        if (keep) {
                svc = find_service(p);
                if (!svc)
                        return PASS;            /* the service is gone, and its flow */
                be = *keep;
        } else {
                int verdict = np_choose(p, &svc, &be);
                if (verdict != NP_GO || !svc)
                        return verdict == NP_PASS ? PASS : TC_ACT_SHOT;
        }

        /* Where the backend runs is the model's word, carried in its slot: one on this
         * node (a pod here, or the node itself) gets the packet as it came, with the
         * client's address; so does every backend of an externalTrafficPolicy Local
         * frontend, all of them local. One on another node is SNATed to this node's
         * address on the interface the route leaves through (bpfp_ifaddr: the
         * --interfaces), so its reply comes back here to be translated. The route is only
         * the path: a bridge holding both the uplink and the pods is one of the
         * --interfaces, and a pod behind it is still here. A remote backend reached where
         * the node has no address the programs know is sent as it is. */
        __be32 hop[4] = {};
        __u32 out = route_mtu(skb, p->t.family, p->t.saddr, be.addr, 0, NULL, hop);
        if (out == ROUTE_NONE)
                return np_count_drop(p, svc, 1), TC_ACT_SHOT;
        struct ifaddr_key ikey = { .ifindex = out, .family = p->t.family };
        struct ifaddr_value *node = NULL;
        int dsr = 0;
        if (!(be.flags & BPFP_BE_LOCAL) && out != ROUTE_LOCAL) {
                /* --nodeport-mode dsr|hybrid: the reply comes from the backend's node */
                struct bpf_fib_lookup fib = {};
                if (np_dsr_wanted(skb, skb->ingress_ifindex, p, hop, &fib))
                        dsr = 1;
                else
                        node = bpfp_ifaddr.lookup(&ikey);
        }
        int snat = node != NULL;
        __u64 now = bpf_ktime_get_ns();
        struct ct_value fwd = {};
        if (!np_open_flow(p, svc, &be, node, dsr, now, &fwd))
                return np_count_drop(p, svc, 1), TC_ACT_SHOT;

        bpfp_count_connection(svc->svc_id, p->t.family, be.addr, be.port, 1, p->len);
        if (dsr)
                return NEW_DSR_FLOW;            /* handle() forwards it, as any DSR packet */
        if (rewrite(skb, p, &fwd))
                return TC_ACT_SHOT;
        /* the new source is the node's own address: the input path would drop it as a
         * martian, so it leaves straight from the egress side */
        return snat ? redirect_neigh(out, NULL, 0, 0) : TC_ACT_OK;
}


/* --- ICMP errors about translated flows ------------------------------------------------
 * A "fragmentation needed" / "packet too big" (path MTU), "unreachable" or "time exceeded"
 * quotes the packet it is about, as that packet looked where the error was raised: after
 * our translation on one side, before it on the other. The quoted packet's reverse tuple is
 * a conntrack key; its entry's rewrite tells what the packet was on the other side, so the
 * quote is rewritten to that and the error sent to whoever sent it there (kube-proxy gets
 * the same from conntrack's RELATED NAT). */


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

/* --- direct server return: the backend's node ------------------------------------------
 * A packet that came with the DSR option is already DNATed to a backend here: it goes on
 * as it is. The first opens the flow (np_dsr_arrived), so that the reply, which leaves
 * through the egress program, is answered from the service address; the option stays in
 * the packet (IPv4 ignores an option it does not know on the way in, IPv6 skips one whose
 * type says so). A path of its own: the headers' offsets differ from the other paths'.
 * The client's tuple to this backend is the same whichever service address it dialled:
 * a flow open here that answers from another one than the option names (a client port
 * reused for another service) is opened anew. */
static __always_inline int dsr_backend(struct pkt *p, struct np_dsr *dsr, __u64 now)
{
        struct ct_value *v = np_find_flow(p, 1, now);
        if (v && (v->flags & BPFP_CT_DSR_BACKEND)) {
                struct ct_key rkey = {};
                partner_key(&p->t, v, &rkey);
                struct ct_value *r = bpfp_ct.lookup(&rkey);
                if (r && r->sport == dsr->port && r->saddr[0] == dsr->addr[0] &&
                    r->saddr[1] == dsr->addr[1] && r->saddr[2] == dsr->addr[2] &&
                    r->saddr[3] == dsr->addr[3]) {
                        np_flow_packet(p, v, now);
                        return TC_ACT_OK;
                }
        }
        np_dsr_arrived(p, dsr, now);
        return TC_ACT_OK;
}

/* --- entry points --------------------------------------------------------------------- */

static __always_inline int handle(struct __sk_buff *skb, int ingress)
{
        struct pkt p = {};
        struct np_dsr dsr = {};
        if (!parse(skb, &p, &dsr))
                return icmp_error(skb);
        __u64 now = bpf_ktime_get_ns();
        if (ingress && dsr.found)
                return dsr_backend(&p, &dsr, now);
        struct ct_value *v = np_find_flow(&p, ingress, now);
        struct lb_backend keep = {};
        int left = v && ingress && np_dsr_left(&p, v);
        if (left) {
                dsr_flow_left(&p, v, &keep);
                v = NULL;
        }
        if (!v) {
                if (!ingress)
                        return PASS;
                int verdict = new_flow(skb, &p, left ? &keep : NULL);
                if (verdict != NEW_DSR_FLOW)
                        return verdict;
                v = bpfp_ct.lookup(&p.t);       /* opened by new_flow, counted there */
                if (!v)
                        return TC_ACT_SHOT;
        } else {
                np_flow_packet(&p, v, now);
        }
        __u32 flags = v->flags;
        struct ct_value to = *v;
        __u32 dsr_out = ROUTE_NONE;
        if (ingress && (flags & (BPFP_CT_DSR | BPFP_CT_REPLY)) == BPFP_CT_DSR) {
                __u32 mtu = 0;
                dsr_out = dsr_route(skb, &p, &to, &mtu);
                if (dsr_out == ROUTE_TOO_BIG)
                        return dsr_too_big(skb, &p, mtu);
                if (dsr_out == ROUTE_NONE)
                        return TC_ACT_SHOT;
        }
        if (rewrite(skb, &p, &to))
                return TC_ACT_SHOT;
        if (dsr_out) {
                if (np_dsr_option_len(&p) && dsr_add_option(skb, &p))
                        return TC_ACT_SHOT;
                return redirect_neigh(dsr_out, NULL, 0, 0);
        }
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
