/* bpf/xdp.c: --acceleration: NodePort, ExternalIP and LoadBalancer flows to backends on
 * other nodes, forwarded entirely in XDP on each --interfaces device (both directions:
 * DNAT + SNAT to the backend, reverse NAT to the client), out through bpf_fib_lookup's
 * interface and neighbour (XDP_TX when that is where it came in). Conntrack, backend choice
 * and counters are the TC program's own (nodeport.h), on the same maps. Everything else
 * passes (XDP_PASS) to the stack, where the TC program handles it as without XDP: a flow
 * to a backend on this node (opened here, rewritten there), a neighbour not yet resolved,
 * IPv4 with options, ICMP errors, a packet too big for the way out. */
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

/* The way out for the packet's new tuple, with both MACs: its interface, or 0 when XDP
 * cannot take it there (local, no route, neighbour unresolved, too big: the stack can). */
static __always_inline __u32 xdp_route(struct xdp_md *ctx, struct pkt *p, struct ct_value *to,
                                       struct bpf_fib_lookup *fib)
{
        fib->ifindex = ctx->ingress_ifindex;
        fib->l4_protocol = p->t.proto;
        fib->sport = to->sport;
        fib->dport = to->dport;
        if (p->t.family == 4) {
                fib->family = BPFP_AF_INET;
                fib->ipv4_src = to->saddr[0];
                fib->ipv4_dst = to->daddr[0];
                fib->tot_len = p->len - XDP_L3;
        } else {
                fib->family = BPFP_AF_INET6;
                __builtin_memcpy(fib->ipv6_src, to->saddr, 16);
                __builtin_memcpy(fib->ipv6_dst, to->daddr, 16);
                fib->tot_len = p->len - XDP_L3;
        }
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
                /* a DSR flow is opened here and passed: the TC program adds the option */
                __be32 *hop = p->t.family == 4 ? &route.ipv4_dst : route.ipv6_dst;
                if (!(be.flags & BPFP_BE_LOCAL) &&
                    np_dsr_wanted(ctx, ctx->ingress_ifindex, p, hop))
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
        struct bpf_fib_lookup fib = {};
        __u32 out = node ? xdp_route(ctx, p, &fwd, &fib) : 0;
        if (!out) {
                /* the TC program counts this packet on the flow it finds */
                bpfp_count_connection(svc->svc_id, p->t.family, be.addr, be.port, 0, 0);
                return XDP_PASS;
        }
        bpfp_count_connection(svc->svc_id, p->t.family, be.addr, be.port, 1, p->len);
        if (xdp_rewrite(ctx, p, &fwd))
                return XDP_ABORTED;
        return xdp_send(ctx, &fib, out);
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
        if (!(v->flags & BPFP_CT_SNAT))
                return XDP_PASS;
        struct ct_value to = *v;
        struct bpf_fib_lookup fib = {};
        __u32 out = xdp_route(ctx, &p, &to, &fib);
        if (!out)
                return XDP_PASS;
        np_flow_packet(&p, v, now);
        if (xdp_rewrite(ctx, &p, &to))
                return XDP_ABORTED;
        return xdp_send(ctx, &fib, out);
}
