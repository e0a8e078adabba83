/* bpf/socklb.c: socket-level load balancing for cgroup v2 (connect4, sendmsg4,
 * recvmsg4, getpeername4). A connection to a service address is pointed at a backend
 * before it leaves the socket: no per-packet NAT, no conntrack entry. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include "maps.h"

#define SOCK_ALLOW  1
#define SOCK_REJECT 0
#define BPFP_ECONNREFUSED 111

static __always_inline struct svc_key4 svc_key_from_sock(struct bpf_sock_addr *ctx)
{
        struct svc_key4 key = {
                .addr  = ctx->user_ip4,
                .port  = (__be16)ctx->user_port,
                .proto = (__u8)ctx->protocol,
        };
        return key;
}

/* O(1) whatever the number of services or backends. TCP: a random slot per connection.
 * UDP: a slot from the socket cookie, so every datagram of one socket reaches the same
 * backend, as kube-proxy's conntrack entry keeps a UDP flow on one endpoint. */
static __always_inline struct backend4 *pick_backend(struct bpf_sock_addr *ctx,
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
        return bpfp_slot4.lookup(&slot);
}

/* Rewrite the destination to a backend; ECONNREFUSED when the service has none,
 * as kube-proxy's REJECT rule answers. */
static __always_inline int redirect_to_backend(struct bpf_sock_addr *ctx,
                                               struct svc_key4 *key, struct svc_value *svc)
{
        if (svc->count == 0) {
                bpf_set_retval(-BPFP_ECONNREFUSED);
                return SOCK_REJECT;
        }
        struct backend4 *backend = pick_backend(ctx, svc);
        if (!backend) {
                /* a slot is written before the count that covers it; only a map
                 * corrupted from outside gets here */
                bpf_set_retval(-BPFP_ECONNREFUSED);
                return SOCK_REJECT;
        }
        struct revnat4_key rkey = {
                .cookie = bpf_get_socket_cookie(ctx),
                .addr   = backend->addr,
                .port   = backend->port,
        };
        struct revnat4_value rval = { .addr = key->addr, .port = key->port };
        bpfp_revnat4.update(&rkey, &rval);

        ctx->user_ip4  = backend->addr;
        ctx->user_port = (__u32)backend->port;
        return SOCK_ALLOW;
}

static __always_inline int balance(struct bpf_sock_addr *ctx)
{
        if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
                return SOCK_ALLOW;
        struct svc_key4 key = svc_key_from_sock(ctx);
        struct svc_value *svc = bpfp_svc4.lookup(&key);
        if (!svc)
                return SOCK_ALLOW;              /* not a service address: untouched */
        return redirect_to_backend(ctx, &key, svc);
}

/* Replies and peer names show the service address the application connected to. */
static __always_inline void reverse_translate(struct bpf_sock_addr *ctx)
{
        struct revnat4_key rkey = {
                .cookie = bpf_get_socket_cookie(ctx),
                .addr   = ctx->user_ip4,
                .port   = (__be16)ctx->user_port,
        };
        struct revnat4_value *rval = bpfp_revnat4.lookup(&rkey);
        if (!rval)
                return;
        ctx->user_ip4  = rval->addr;
        ctx->user_port = (__u32)rval->port;
}

int bpfp_connect4(struct bpf_sock_addr *ctx)
{
        return balance(ctx);
}

int bpfp_sendmsg4(struct bpf_sock_addr *ctx)
{
        return balance(ctx);
}

int bpfp_recvmsg4(struct bpf_sock_addr *ctx)
{
        reverse_translate(ctx);
        return SOCK_ALLOW;
}

int bpfp_getpeername4(struct bpf_sock_addr *ctx)
{
        reverse_translate(ctx);
        return SOCK_ALLOW;
}
