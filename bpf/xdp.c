/* bpf/xdp.c: --acceleration: NodePort, ExternalIP and LoadBalancer flows to backends on
 * other nodes, forwarded entirely in XDP on each --interfaces device (SNAT: both
 * directions, DNAT + SNAT to the backend and reverse NAT to the client; DSR, with
 * --nodeport-mode dsr|hybrid: DNAT with the option, the reply going elsewhere), out through
 * bpf_fib_lookup's interface and neighbour (XDP_TX when that is where it came in).
 * Conntrack, backend choice and counters are the TC program's own (nodeport.h), on the same
 * maps. Everything else passes (XDP_PASS) to the stack, where the TC program handles it as
 * without XDP: a flow to a backend on this node (opened here, rewritten there), a
 * neighbour not yet resolved, IPv4 with options, ICMP errors, a packet too big for the way
 * out (with the DSR option: the TC program answers it), a DSR packet for this node. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include "nodeport.h"

#define XDP_L3 14                               /* after the Ethernet header */
#define XDP_L4_4 (XDP_L3 + 20)                  /* IPv4 without options only */
#define XDP_L4_6 (XDP_L3 + 40)

/* the shared parse (nodeport.h), without IPv4 options: xdp_rewrite's offsets are fixed */
static __always_inline int xdp_parse(struct xdp_md *ctx, struct pkt *p)
{
        void *data = (void *)(long)ctx->data;
        void *end = (void *)(long)ctx->data_end;
        return np_parse(data, end, end - data, NULL, p);
}

/* --- checksums: incremental updates (RFC 1624), on the words as they lie in memory ---- */

static __always_inline __u16 csum_fold32(__u32 s)
{
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        return (__u16)s;
}

static __always_inline __u32 csum_add32(__u32 s, __u32 from, __u32 to)
{
        return s + (~from & 0xffff) + (~from >> 16) + (to & 0xffff) + (to >> 16);
}

/* An L4 checksum after words of the pseudo-header and the header changed; a UDP
 * checksum of 0 (IPv4: none) stays 0, a computed 0 is sent as 0xffff. */
static __always_inline void l4_sum_set(__u16 *sum, __u32 delta, int udp)
{
        if (udp && *sum == 0)
                return;
        __u16 out = ~csum_fold32((__u16)~*sum + delta);
        *sum = (udp && out == 0) ? 0xffff : out;
}

/* The packet's tuple becomes to's: addresses, ports, checksums. Direct packet access:
 * the offsets are fixed (xdp_parse took no IPv4 options). */
static __always_inline int xdp_rewrite(struct xdp_md *ctx, struct pkt *p, struct ct_value *to)
{
        void *data = (void *)(long)ctx->data;
        void *end = (void *)(long)ctx->data_end;
        int udp = p->t.proto == IPPROTO_UDP;
        __u32 delta = 0;
        void *l4;
        if (p->t.family == 4) {
                struct iphdr *ip = data + XDP_L3;
                if ((void *)(ip + 1) > end)
                        return -1;
                __u32 ip_delta = csum_add32(0, ip->saddr, to->saddr[0]);
                ip_delta = csum_add32(ip_delta, ip->daddr, to->daddr[0]);
                ip->check = ~csum_fold32((__u16)~ip->check + ip_delta);
                ip->saddr = to->saddr[0];
                ip->daddr = to->daddr[0];
                delta = ip_delta;
                l4 = data + XDP_L4_4;
        } else {
                struct ipv6hdr *ip6 = data + XDP_L3;
                if ((void *)(ip6 + 1) > end)
                        return -1;
                __be32 *s = (__be32 *)&ip6->saddr, *d = (__be32 *)&ip6->daddr;
#pragma unroll
                for (int i = 0; i < 4; i++) {
                        delta = csum_add32(delta, s[i], to->saddr[i]);
                        delta = csum_add32(delta, d[i], to->daddr[i]);
                        s[i] = to->saddr[i];
                        d[i] = to->daddr[i];
                }
                l4 = data + XDP_L4_6;
        }
        /* TCP and UDP both start with the two ports */
        __be16 *ports = l4;
        if ((void *)(ports + 2) > end)
                return -1;
        delta = csum_add32(delta, ports[0], to->sport);
        delta = csum_add32(delta, ports[1], to->dport);
        ports[0] = to->sport;
        ports[1] = to->dport;
        if (udp) {
                struct udphdr *uh = l4;
                if ((void *)(uh + 1) > end)
                        return -1;
                l4_sum_set(&uh->check, delta, 1);
        } else {
                struct tcphdr *th = l4;
                if ((void *)(th + 1) > end)
                        return -1;
                l4_sum_set(&th->check, delta, 0);
        }
        return 0;
}

/* --- direct server return: the option after the IP header (nodeport.h has its format) --
 * Room made in front (bpf_xdp_adjust_head), the Ethernet and IP headers moved into it,
 * the option written where they ended; the header's lengths (and IPv4's checksum, summed
 * anew) say so. The L4 checksum does not cover it. */
static __always_inline int xdp_dsr_option(struct xdp_md *ctx, struct pkt *p)
{
        int room = p->t.family == 4 ? DSR_OPT4_LEN : DSR_EXT6_LEN;
        if (bpf_xdp_adjust_head(ctx, -room))
                return -1;
        __u8 *data = (void *)(long)ctx->data;
        void *end = (void *)(long)ctx->data_end;
        if (p->t.family == 4) {
                if ((void *)(data + XDP_L4_4 + DSR_OPT4_LEN) > end)
                        return -1;
#pragma unroll
                for (int i = 0; i < XDP_L4_4; i++)     /* forwards: nothing unread is hit */
                        data[i] = data[i + DSR_OPT4_LEN];
                struct iphdr *ip = (void *)(data + XDP_L3);
                struct dsr_opt4 *opt = (void *)(ip + 1);
                opt->type = DSR_OPT4_TYPE;
                opt->len = DSR_OPT4_LEN;
                opt->port = p->t.dport;
                opt->addr = p->t.daddr[0];
                ip->ihl = 5 + DSR_OPT4_LEN / 4;
                ip->tot_len = bpf_htons(bpf_ntohs(ip->tot_len) + DSR_OPT4_LEN);
                ip->check = 0;
                __u16 *word = (void *)ip;
                __u32 sum = 0;
#pragma unroll
                for (int i = 0; i < (20 + DSR_OPT4_LEN) / 2; i++)
                        sum += word[i];
                ip->check = ~csum_fold32(sum);
                return 0;
        }
        if ((void *)(data + XDP_L4_6 + DSR_EXT6_LEN) > end)
                return -1;
#pragma unroll
        for (int i = 0; i < XDP_L4_6; i++)
                data[i] = data[i + DSR_EXT6_LEN];
        struct ipv6hdr *ip6 = (void *)(data + XDP_L3);
        struct dsr_ext6 *ext = (void *)(ip6 + 1);
        ext->nexthdr = ip6->nexthdr;
        ext->hdrlen = (DSR_EXT6_LEN - 8) / 8;
        ext->type = DSR_OPT6_TYPE;
        ext->len = DSR_OPT6_LEN;
        __builtin_memcpy(ext->addr, p->t.daddr, 16);
        ext->port = p->t.dport;
        ext->pad[0] = ext->pad[1] = 0;
        ip6->nexthdr = IPV6_NEXTHDR_DEST;
        ip6->payload_len = bpf_htons(bpf_ntohs(ip6->payload_len) + DSR_EXT6_LEN);
        return 0;
}

/* The way out for the packet's new tuple (extra: bytes it gains), with both MACs: its
 * interface, or 0 when XDP cannot take it there (local, no route, neighbour unresolved,
 * too big: the stack can, and the TC program answers a DSR packet too big). */
static __always_inline __u32 xdp_route(struct xdp_md *ctx, struct pkt *p, struct ct_value *to,
                                       __u32 extra, struct bpf_fib_lookup *fib)
{
        __builtin_memset(fib, 0, sizeof(*fib));         /* a lookup's answers are gone */
        fib->ifindex = ctx->ingress_ifindex;
        fib->l4_protocol = p->t.proto;
        fib->sport = to->sport;
        fib->dport = to->dport;
        if (p->t.family == 4) {
                fib->family = BPFP_AF_INET;
                fib->ipv4_src = to->saddr[0];
                fib->ipv4_dst = to->daddr[0];
        } else {
                fib->family = BPFP_AF_INET6;
                __builtin_memcpy(fib->ipv6_src, to->saddr, 16);
                __builtin_memcpy(fib->ipv6_dst, to->daddr, 16);
        }
        fib->tot_len = p->len - XDP_L3 + extra;
        if (bpf_fib_lookup(ctx, fib, sizeof(*fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
                return 0;
        return fib->ifindex;
}

static __always_inline int xdp_send(struct xdp_md *ctx, struct bpf_fib_lookup *fib, __u32 out)
{
        void *data = (void *)(long)ctx->data;
        void *end = (void *)(long)ctx->data_end;
        struct ethhdr *eth = data;
        if ((void *)(eth + 1) > end)
                return XDP_ABORTED;
        __builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
        __builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
        tc_event(BPFP_TCEV_XDP_FORWARDED);
        if (out == ctx->ingress_ifindex)
                return XDP_TX;
        return bpf_redirect(out, 0);
}

/* A new flow: opened as the TC program would open it; forwarded here when it is SNATed to
 * a backend on another node and the way there is known, else passed to the TC program,
 * which finds the flow open and rewrites the packet. */
static __always_inline int xdp_new_flow(struct xdp_md *ctx, struct pkt *p, __u64 now)
{
        struct svc_value *svc = NULL;
        struct lb_backend be = {};
        int verdict = np_choose(p, &svc, &be);
        if (verdict != NP_GO || !svc)
                return verdict == NP_PASS ? XDP_PASS : XDP_DROP;
        /* the same decision as the TC program's new_flow (see there), from a route the
         * XDP way: ROUTE_LOCAL and ROUTE_NONE as there */
        struct bpf_fib_lookup route = {};
        route.ifindex = ctx->ingress_ifindex;
        if (p->t.family == 4) {
                route.family = BPFP_AF_INET;
                route.ipv4_src = p->t.saddr[0];
                route.ipv4_dst = be.addr[0];
        } else {
                route.family = BPFP_AF_INET6;
                __builtin_memcpy(route.ipv6_src, p->t.saddr, 16);
                __builtin_memcpy(route.ipv6_dst, be.addr, 16);
        }
        long rc = bpf_fib_lookup(ctx, &route, sizeof(route), 0);
        struct ifaddr_value *node = NULL;
        int dsr = 0;
        if (rc == BPF_FIB_LKUP_RET_NOT_FWDED) {
                node = NULL;                    /* the node itself: as it came */
        } else if (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
                struct ifaddr_key ikey = { .ifindex = route.ifindex, .family = p->t.family };
                __be32 hop[4] = {};
                if (p->t.family == 4)
                        hop[0] = route.ipv4_dst;
                else
                        __builtin_memcpy(hop, route.ipv6_dst, 16);
                if (!(be.flags & BPFP_BE_LOCAL) &&
                    np_dsr_wanted(ctx, ctx->ingress_ifindex, p, hop, &route))
                        dsr = 1;
                else if (!(be.flags & BPFP_BE_LOCAL))
                        node = bpfp_ifaddr.lookup(&ikey);
        } else {
                np_count_drop(p, svc, 1);
                return XDP_DROP;
        }
        struct ct_value fwd = {};
        if (!np_open_flow(p, svc, &be, node, dsr, now, &fwd)) {
                np_count_drop(p, svc, 1);
                return XDP_DROP;
        }
        struct bpf_fib_lookup *fib = &route;            /* the stack is tight */
        __u32 extra = dsr ? np_dsr_option_len(p) : 0;
        __u32 out = node || dsr ? xdp_route(ctx, p, &fwd, extra, fib) : 0;
        if (!out) {
                /* the TC program counts this packet on the flow it finds */
                bpfp_count_connection(svc->svc_id, p->t.family, be.addr, be.port, 0, 0);
                return XDP_PASS;
        }
        bpfp_count_connection(svc->svc_id, p->t.family, be.addr, be.port, 1, p->len);
        if (xdp_rewrite(ctx, p, &fwd) || (extra && xdp_dsr_option(ctx, p)))
                return XDP_ABORTED;
        return xdp_send(ctx, fib, out);
}

int bpfp_xdp(struct xdp_md *ctx)
{
        struct pkt p = {};
        if (!xdp_parse(ctx, &p))
                return XDP_PASS;
        __u64 now = bpf_ktime_get_ns();
        struct ct_value *v = np_find_flow(&p, 1, now);
        if (!v)
                return xdp_new_flow(ctx, &p, now);
        /* a flow of a backend on this node is the TC program's: it leaves towards a pod */
        int dsr = (v->flags & (BPFP_CT_DSR | BPFP_CT_REPLY)) == BPFP_CT_DSR;
        if ((!(v->flags & BPFP_CT_SNAT) && !dsr) || np_dsr_left(&p, v))
                return XDP_PASS;                /* np_dsr_left: the TC program opens it anew */
        struct ct_value to = *v;
        struct bpf_fib_lookup fib = {};
        __u32 extra = dsr ? np_dsr_option_len(&p) : 0;
        __u32 out = xdp_route(ctx, &p, &to, extra, &fib);
        if (!out)
                return XDP_PASS;
        np_flow_packet(&p, v, now);
        if (xdp_rewrite(ctx, &p, &to) || (extra && xdp_dsr_option(ctx, &p)))
                return XDP_ABORTED;
        return xdp_send(ctx, &fib, out);
}
