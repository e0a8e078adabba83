/* bpf/socklb.c: socket-level load balancing for cgroup v2 (connect, sendmsg, recvmsg and
 * getpeername, IPv4 and IPv6). A connection to a service address is pointed at a backend
 * before it leaves the socket: no per-packet NAT, no conntrack entry. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include "maps.h"
#include "counters.h"
#include "lb.h"

#define SOCK_ALLOW  1
#define SOCK_REJECT 0
#define BPFP_ECONNREFUSED 111
#define BPFP_AF_INET 2

/* Word 2 of an IPv4-mapped IPv6 address (::ffff:a.b.c.d) as user_ip6[2] reads it. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define BPFP_V4_MAPPED_WORD 0xffff0000U
#else
#define BPFP_V4_MAPPED_WORD 0x0000ffffU
#endif

/* Keeps clang from merging or splitting the 32-bit user_ip6[] accesses: the verifier
 * accepts only whole words (or aligned pairs) there, as Cilium's ctx_{get,set}_v6_address. */
#define bpfp_barrier() asm volatile("" ::: "memory")

/* What a lookup found for a destination address. */
enum xlate { NOT_A_SERVICE, TO_BACKEND, NO_BACKEND };

static __always_inline int is_balanced_protocol(struct bpf_sock_addr *ctx)
{
        /* SCTP connects through the same hook (a kernel without SCTP never gets here) */
        return ctx->protocol == IPPROTO_TCP || ctx->protocol == IPPROTO_UDP ||
               ctx->protocol == IPPROTO_SCTP;
}

/* O(1) whatever the number of services or backends. TCP: a random slot per connection.
 * UDP: a slot from the socket cookie, so every datagram of one socket reaches the same
 * backend, as kube-proxy's conntrack entry keeps a UDP flow on one endpoint. */
static __always_inline struct slot_key pick_slot(struct bpf_sock_addr *ctx,
                                                 struct svc_value *svc)
{
        __u32 pick;
        if (ctx->protocol == IPPROTO_UDP)
                pick = (__u32)((bpf_get_socket_cookie(ctx) * 0x9E3779B97F4A7C15ULL) >> 32);
        else
                pick = bpf_get_prandom_u32();
        struct slot_key slot = {
                .svc_id = svc->svc_id,
                .slot   = pick % svc->count,
        };
        return slot;
}

/* --- backend selection, with ClientIP session affinity (bpf/lb.h) -------------------- */

/* The backend this connection goes to: the client's affinity backend while it lasts and
 * is still a backend of the service (its slot may have moved), else a fresh pick. The
 * client is its network namespace (maps.h struct affinity_key). */
static __always_inline int sock_select_backend(struct bpf_sock_addr *ctx, __u8 family,
                                               struct svc_value *svc, struct lb_backend *out)
{
        struct affinity_key akey = { .svc_id = svc->svc_id };
        __u64 now = 0;
        if (svc->affinity_sec) {
                now = bpf_ktime_get_ns();
                akey.client = bpf_get_netns_cookie(ctx);
                struct affinity_value *aff = bpfp_affinity.lookup(&akey);
                if (aff && lb_affinity_alive(aff, svc, now) &&
                    lb_affinity_refind(family, svc, aff, now, out))
                        return 1;
        }
        struct slot_key slot = pick_slot(ctx, svc);
        if (!lb_slot_backend(family, svc->svc_id, slot.slot, out))
                return 0;
        if (svc->affinity_sec) {
                struct affinity_value value = {};
                lb_affinity_set(&value, now, slot.slot, out);
                bpfp_affinity.update(&akey, &value);
        }
        return 1;
}

/* ECONNREFUSED for a service with no backend, as kube-proxy's REJECT rule answers. */
static __always_inline int verdict(enum xlate found)
{
        if (found != NO_BACKEND)
                return SOCK_ALLOW;
        bpf_set_retval(-BPFP_ECONNREFUSED);
        return SOCK_REJECT;
}

/* --- reverse NAT kept with the socket ------------------------------------------------
 * bpfp_revnat4/6 are shared by every socket on the node; the socket's own list (socket-local
 * storage) is what replies are translated with, and what sock_release deletes from them. */

static __always_inline void count_sock_event(__u32 event)
{
        __u64 *count = bpfp_sock_events.lookup(&event);
        if (count)
                *count += 1;
}

static __always_inline int same_backend(const struct sock_revnat *e, __u8 family,
                                        const __be32 *addr, __be16 port)
{
        if (e->family != family || e->backend_port != port || e->backend[0] != addr[0])
                return 0;
        return family == 4 || (e->backend[1] == addr[1] && e->backend[2] == addr[2] &&
                               e->backend[3] == addr[3]);
}

/* This socket's entry for replies from addr:port, or NULL. */
static __always_inline struct sock_revnat *own_revnat(struct bpf_sock_addr *ctx, __u8 family,
                                                      const __be32 *addr, __be16 port)
{
        struct sock_revnats *own = bpfp_sock_revnat.sk_storage_get(ctx->sk, 0, 0);
        if (!own)
                return NULL;
        for (int i = 0; i < BPFP_SOCK_REVNATS; i++) {
                if (same_backend(&own->entry[i], family, addr, port))
                        return &own->entry[i];
        }
        return NULL;
}

enum remembered { REMEMBERED_NEW, REMEMBERED_ALREADY, REMEMBERED_NOWHERE };

/* Adds want to the socket's list. A full list gives up its oldest slot, whose old entry is
 * copied to *replaced (family 0: none) for the caller to delete from the shared map. */
static __always_inline enum remembered remember_revnat(struct bpf_sock_addr *ctx,
                                                       const struct sock_revnat *want,
                                                       struct sock_revnat *replaced)
{
        struct sock_revnats *own = bpfp_sock_revnat.sk_storage_get(
                ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
        if (!own) {
                count_sock_event(BPFP_SOCKEV_NO_SOCKET_STORAGE);
                return REMEMBERED_NOWHERE;
        }
        __u32 free = BPFP_SOCK_REVNATS;
        for (__u32 i = 0; i < BPFP_SOCK_REVNATS; i++) {
                struct sock_revnat *e = &own->entry[i];
                if (!e->family) {
                        if (free == BPFP_SOCK_REVNATS)
                                free = i;
                        continue;
                }
                if (!same_backend(e, want->family, want->backend, want->backend_port))
                        continue;
                if (e->service[0] == want->service[0] && e->service[1] == want->service[1] &&
                    e->service[2] == want->service[2] && e->service[3] == want->service[3] &&
                    e->service_port == want->service_port)
                        return REMEMBERED_ALREADY;
                __builtin_memcpy(e, want, sizeof(*e));  /* same backend, another service */
                return REMEMBERED_NEW;
        }
        if (free == BPFP_SOCK_REVNATS) {
                free = own->next & (BPFP_SOCK_REVNATS - 1);
                own->next = free + 1;
                __builtin_memcpy(replaced, &own->entry[free], sizeof(*replaced));
                count_sock_event(BPFP_SOCKEV_REVNAT_REPLACED);
        }
        __builtin_memcpy(&own->entry[free & (BPFP_SOCK_REVNATS - 1)], want, sizeof(*want));
        return REMEMBERED_NEW;
}

/* Deletes one entry of the shared maps: family 4 or 6; 0 does nothing. */
static __always_inline void forget_shared(__u64 cookie, __u8 family, const __be32 *addr,
                                          __be16 port)
{
        if (family == 4) {
                struct revnat4_key key = { .cookie = cookie, .addr = addr[0], .port = port };
                bpfp_revnat4.delete(&key);
        } else if (family == 6) {
                struct revnat6_key key = {
                        .cookie = cookie,
                        .addr   = { addr[0], addr[1], addr[2], addr[3] },
                        .port   = port,
                };
                bpfp_revnat6.delete(&key);
        }
}

/* Remembers, with the socket and in the shared map, that replies from the backend stand for
 * the service. The shared map is written only when the socket's list changed (an unconnected
 * sender runs this for every datagram) or when it has lost the entry. */
static __always_inline void remember(struct bpf_sock_addr *ctx, const struct sock_revnat *want)
{
        struct sock_revnat replaced = {};
        enum remembered done = remember_revnat(ctx, want, &replaced);
        __u64 cookie = bpf_get_socket_cookie(ctx);
        forget_shared(cookie, replaced.family, replaced.backend, replaced.backend_port);
        int err;
        if (want->family == 4) {
                struct revnat4_key key = {
                        .cookie = cookie, .addr = want->backend[0], .port = want->backend_port,
                };
                if (done == REMEMBERED_ALREADY && bpfp_revnat4.lookup(&key))
                        return;
                struct revnat4_value value = {
                        .addr = want->service[0], .port = want->service_port,
                };
                err = bpfp_revnat4.update(&key, &value);
        } else {
                struct revnat6_key key = {
                        .cookie = cookie,
                        .addr   = { want->backend[0], want->backend[1], want->backend[2],
                                    want->backend[3] },
                        .port   = want->backend_port,
                };
                if (done == REMEMBERED_ALREADY && bpfp_revnat6.lookup(&key))
                        return;
                struct revnat6_value value = {
                        .addr = { want->service[0], want->service[1], want->service[2],
                                  want->service[3] },
                        .port = want->service_port,
                };
                err = bpfp_revnat6.update(&key, &value);
        }
        if (err)
                count_sock_event(BPFP_SOCKEV_REVNAT_FAILED);
}

/* --- IPv4 --------------------------------------------------------------------------- */

/* addr:port in the IPv4 maps; on TO_BACKEND *to is the backend and the reverse NAT entry is
 * written. Takes the address, not the ctx field, so that an IPv4-mapped destination of an
 * AF_INET6 socket shares it (Cilium's sock6_xlate_v4_in_v6 reuses __sock4_xlate_fwd). */
static __always_inline enum xlate forward4(struct bpf_sock_addr *ctx, __be32 addr,
                                           __be16 port, struct lb_backend *to)
{
        struct svc_key4 key = {
                .addr  = addr,
                .port  = port,
                .proto = (__u8)ctx->protocol,
        };
        struct svc_value *svc = bpfp_svc4.lookup(&key);
        if (!svc)
                return NOT_A_SERVICE;           /* not a service address: untouched */
        if (!svc->count || !sock_select_backend(ctx, 4, svc, to)) {
                /* count 0; or a slot missing, which only a map corrupted from outside
                 * does: a slot is written before the count that covers it */
                bpfp_count_refused(svc->svc_id, 4);
                return NO_BACKEND;
        }
        bpfp_count_connection(svc->svc_id, 4, to->addr, to->port, 0, 0);
        struct sock_revnat want = {
                .backend      = { to->addr[0] },
                .service      = { addr },
                .backend_port = to->port,
                .service_port = port,
                .family       = 4,
        };
        remember(ctx, &want);
        return TO_BACKEND;
}

/* The service address a socket's peer addr:port stands for: the socket's own entry, else
 * the shared map's (a socket the programs of an older build balanced). 0: none. */
static __always_inline int reverse4(struct bpf_sock_addr *ctx, __be32 addr, __be16 port,
                                    struct revnat4_value *out)
{
        struct sock_revnat *own = own_revnat(ctx, 4, &addr, port);
        if (own) {
                out->addr = own->service[0];
                out->port = own->service_port;
                return 1;
        }
        struct revnat4_key rkey = {
                .cookie = bpf_get_socket_cookie(ctx),
                .addr   = addr,
                .port   = port,
        };
        struct revnat4_value *shared = bpfp_revnat4.lookup(&rkey);
        if (!shared)
                return 0;
        out->addr = shared->addr;
        out->port = shared->port;
        return 1;
}

static __always_inline int balance4(struct bpf_sock_addr *ctx)
{
        if (!is_balanced_protocol(ctx))
                return SOCK_ALLOW;
        struct lb_backend to = {};
        enum xlate found = forward4(ctx, ctx->user_ip4, (__be16)ctx->user_port, &to);
        if (found == TO_BACKEND) {
                ctx->user_ip4  = to.addr[0];
                ctx->user_port = (__u32)to.port;
        }
        return verdict(found);
}

/* Replies and peer names show the service address the application connected to. */
static __always_inline void reverse_translate4(struct bpf_sock_addr *ctx)
{
        struct revnat4_value rval;
        if (!reverse4(ctx, ctx->user_ip4, (__be16)ctx->user_port, &rval))
                return;
        ctx->user_ip4  = rval.addr;
        ctx->user_port = (__u32)rval.port;
}

/* --- IPv6 --------------------------------------------------------------------------- */

static __always_inline void get_user_ip6(struct bpf_sock_addr *ctx, __be32 *addr)
{
        addr[0] = ctx->user_ip6[0];
        bpfp_barrier();
        addr[1] = ctx->user_ip6[1];
        bpfp_barrier();
        addr[2] = ctx->user_ip6[2];
        bpfp_barrier();
        addr[3] = ctx->user_ip6[3];
        bpfp_barrier();
}

static __always_inline void set_user_ip6(struct bpf_sock_addr *ctx, const __be32 *addr)
{
        ctx->user_ip6[0] = addr[0];
        bpfp_barrier();
        ctx->user_ip6[1] = addr[1];
        bpfp_barrier();
        ctx->user_ip6[2] = addr[2];
        bpfp_barrier();
        ctx->user_ip6[3] = addr[3];
        bpfp_barrier();
}

/* ::ffff:a.b.c.d (RFC 4291 2.5.5.2): an AF_INET6 socket talking IPv4. */
static __always_inline int is_v4_mapped(const __be32 *addr)
{
        return addr[0] == 0 && addr[1] == 0 && addr[2] == BPFP_V4_MAPPED_WORD;
}

static __always_inline enum xlate forward6(struct bpf_sock_addr *ctx, const __be32 *addr,
                                           __be16 port, struct lb_backend *to)
{
        struct svc_key6 key = {
                .addr  = { addr[0], addr[1], addr[2], addr[3] },
                .port  = port,
                .proto = (__u8)ctx->protocol,
        };
        struct svc_value *svc = bpfp_svc6.lookup(&key);
        if (!svc)
                return NOT_A_SERVICE;
        if (!svc->count || !sock_select_backend(ctx, 6, svc, to)) {
                bpfp_count_refused(svc->svc_id, 6);
                return NO_BACKEND;
        }
        bpfp_count_connection(svc->svc_id, 6, to->addr, to->port, 0, 0);
        struct sock_revnat want = {
                .backend      = { to->addr[0], to->addr[1], to->addr[2], to->addr[3] },
                .service      = { addr[0], addr[1], addr[2], addr[3] },
                .backend_port = to->port,
                .service_port = port,
                .family       = 6,
        };
        remember(ctx, &want);
        return TO_BACKEND;
}

/* An AF_INET6 socket: an IPv6 service, or an IPv4 one through its IPv4-mapped address,
 * which goes to ::ffff:<IPv4 backend> (the kernel then talks IPv4 on that socket). */
static __always_inline int balance6(struct bpf_sock_addr *ctx)
{
        if (!is_balanced_protocol(ctx))
                return SOCK_ALLOW;
        __be32 addr[4];
        get_user_ip6(ctx, addr);
        __be16 port = (__be16)ctx->user_port;
        enum xlate found;
        if (is_v4_mapped(addr)) {
                struct lb_backend to4 = {};
                found = forward4(ctx, addr[3], port, &to4);
                if (found == TO_BACKEND) {
                        ctx->user_ip6[3] = to4.addr[0]; /* words 0-2 stay ::ffff */
                        ctx->user_port   = (__u32)to4.port;
                }
                return verdict(found);
        }
        struct lb_backend to6 = {};
        found = forward6(ctx, addr, port, &to6);
        if (found == TO_BACKEND) {
                set_user_ip6(ctx, to6.addr);
                ctx->user_port = (__u32)to6.port;
        }
        return verdict(found);
}

static __always_inline void reverse_translate6(struct bpf_sock_addr *ctx)
{
        __be32 addr[4];
        get_user_ip6(ctx, addr);
        __be16 port = (__be16)ctx->user_port;
        if (is_v4_mapped(addr)) {
                struct revnat4_value rval4;
                if (reverse4(ctx, addr[3], port, &rval4)) {
                        ctx->user_ip6[3] = rval4.addr;
                        ctx->user_port   = (__u32)rval4.port;
                }
                return;
        }
        struct sock_revnat *own = own_revnat(ctx, 6, addr, port);
        if (own) {
                set_user_ip6(ctx, own->service);
                ctx->user_port = (__u32)own->service_port;
                return;
        }
        struct revnat6_key rkey = {
                .cookie = bpf_get_socket_cookie(ctx),
                .addr   = { addr[0], addr[1], addr[2], addr[3] },
                .port   = port,
        };
        struct revnat6_value *rval = bpfp_revnat6.lookup(&rkey);
        if (!rval)
                return;
        set_user_ip6(ctx, rval->addr);
        ctx->user_port = (__u32)rval->port;
}

/* --- entry points ------------------------------------------------------------------- */

/* connect and sendmsg send the socket to a backend (balance); recvmsg and getpeername show
 * the service's address in place of the backend's (reverse_translate). The IPv4 sendmsg
 * hook also sees an AF_INET6 socket's unconnected send to ::ffff:a.b.c.d (udpv6_sendmsg
 * hands it to udp_sendmsg, which runs the IPv4 hook), so the IPv6 one sees IPv6
 * destinations only. agent/datapath/programs.py attaches these functions by name. */
#define BALANCE_HOOK(name, balance)                                     \
        int name(struct bpf_sock_addr *ctx)                             \
        {                                                               \
                return balance(ctx);                                    \
        }
#define REVERSE_HOOK(name, reverse_translate)                           \
        int name(struct bpf_sock_addr *ctx)                             \
        {                                                               \
                reverse_translate(ctx);                                 \
                return SOCK_ALLOW;                                      \
        }

BALANCE_HOOK(bpfp_connect4, balance4)
BALANCE_HOOK(bpfp_sendmsg4, balance4)
REVERSE_HOOK(bpfp_recvmsg4, reverse_translate4)
REVERSE_HOOK(bpfp_getpeername4, reverse_translate4)

BALANCE_HOOK(bpfp_connect6, balance6)
BALANCE_HOOK(bpfp_sendmsg6, balance6)
REVERSE_HOOK(bpfp_recvmsg6, reverse_translate6)
REVERSE_HOOK(bpfp_getpeername6, reverse_translate6)

/* cgroup sock_release: the socket's entries leave the shared maps with it, so a pod that
 * opens and closes sockets in a loop never fills them (and never pushes out other pods'). */
int bpfp_sock_release(struct bpf_sock *ctx)
{
        if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP &&
            ctx->protocol != IPPROTO_SCTP)
                return SOCK_ALLOW;
        __u64 cookie = bpf_get_socket_cookie(ctx);
        struct sock_revnats *own = bpfp_sock_revnat.sk_storage_get(ctx, 0, 0);
        if (own) {
                /* the list, not the peer: SOCK_DESTROY (the agent's stale socket sweep) clears
                 * a connected UDP socket's peer before this runs, and an unconnected one has
                 * several entries */
                for (int i = 0; i < BPFP_SOCK_REVNATS; i++) {
                        struct sock_revnat *e = &own->entry[i];
                        forget_shared(cookie, e->family, e->backend, e->backend_port);
                }
                return SOCK_ALLOW;
        }
        /* balanced by an older build's programs, which kept no list: its peer's entry */
        __be32 peer[4] = {};
        __be16 port = (__be16)ctx->dst_port;
        if (ctx->family == BPFP_AF_INET) {
                peer[0] = ctx->dst_ip4;
                forget_shared(cookie, 4, peer, port);
                return SOCK_ALLOW;
        }
        peer[0] = ctx->dst_ip6[0];
        peer[1] = ctx->dst_ip6[1];
        peer[2] = ctx->dst_ip6[2];
        peer[3] = ctx->dst_ip6[3];
        if (is_v4_mapped(peer)) {
                peer[0] = peer[3];
                forget_shared(cookie, 4, peer, port);
        } else {
                forget_shared(cookie, 6, peer, port);
        }
        return SOCK_ALLOW;
}
