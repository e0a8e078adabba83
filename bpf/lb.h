/* bpf/lb.h: backend selection shared by the socket LB (socklb.c) and the TC path
 * (nodeport.c): a service port's slot to its backend, and ClientIP session affinity that
 * finds its backend again after the slot moved. Each program keeps what is its own: how it
 * picks a fresh slot, and whom its affinity map keys (a netns cookie, a source address). */
#ifndef BPFP_LB_H
#define BPFP_LB_H

#include "maps.h"

#define NSEC 1000000000ULL
#define AFFINITY_SCAN 32        /* slots searched for a backend that moved; then re-pick */

/* A backend of either family, copied out of its slot: IPv4 in addr[0], the rest zero. */
struct lb_backend {
        __be32 addr[4];
        __be16 port;
        __u16  flags;           /* BPFP_BE_* of its slot */
};

/* Slot `slot` of the service port in the slot map of `family`; 0 when it is missing. */
static __always_inline int lb_slot_backend(__u8 family, __u32 svc_id, __u32 slot,
                                           struct lb_backend *out)
{
        struct slot_key key = { .svc_id = svc_id, .slot = slot };
        if (family == 4) {
                struct backend4 *b = bpfp_slot4.lookup(&key);
                if (!b)
                        return 0;
                out->addr[0] = b->addr;
                out->port = b->port;
                out->flags = b->flags;
                return 1;
        }
        struct backend6 *b = bpfp_slot6.lookup(&key);
        if (!b)
                return 0;
        __builtin_memcpy(out->addr, b->addr, 16);
        out->port = b->port;
        out->flags = b->flags;
        return 1;
}

/* An affinity entry lasts affinity_sec from its client's last connection: kube-proxy's
 * `recent` match behaves the same, its clock restarting with every new connection. */
static __always_inline int lb_affinity_alive(const struct affinity_value *aff,
                                             const struct svc_value *svc, __u64 now)
{
        return now - aff->last_ns <= (__u64)svc->affinity_sec * NSEC;
}

/* The client's affinity backend, while it is still a backend of the service port: at its
 * remembered slot, else in the first AFFINITY_SCAN slots (a changed backend list moves it).
 * Found: *out is it, and the entry is refreshed (time and slot). 0: pick anew. out must
 * start zeroed (an IPv4 backend leaves addr[1..3] alone). */
static __always_inline int lb_affinity_refind(__u8 family, const struct svc_value *svc,
                                              struct affinity_value *aff, __u64 now,
                                              struct lb_backend *out)
{
        __u32 slot = aff->slot;
        for (__u32 i = 0; i <= AFFINITY_SCAN; i++) {
                if (slot < svc->count &&
                    lb_slot_backend(family, svc->svc_id, slot, out) &&
                    out->port == aff->port && out->addr[0] == aff->addr[0] &&
                    out->addr[1] == aff->addr[1] && out->addr[2] == aff->addr[2] &&
                    out->addr[3] == aff->addr[3]) {
                        aff->last_ns = now;
                        aff->slot = slot;
                        return 1;
                }
                if (i >= svc->count)
                        break;
                slot = i;
        }
        return 0;
}

/* The affinity entry for a backend just picked at `slot`. */
static __always_inline void lb_affinity_set(struct affinity_value *value, __u64 now,
                                            __u32 slot, const struct lb_backend *backend)
{
        value->last_ns = now;
        value->slot = slot;
        value->port = backend->port;
        __builtin_memcpy(value->addr, backend->addr, 16);
}

#endif /* BPFP_LB_H */
