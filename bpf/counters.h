/* bpf/counters.h: per-CPU counters per service port and per backend (bpfp_stats), read by
 * the agent for its API and metrics. Per-CPU values: plain adds, no atomics. */
#ifndef BPFP_COUNTERS_H
#define BPFP_COUNTERS_H

#include "maps.h"

struct bpfp_delta {
        __u64 connections, packets, bytes, refused, dropped;
};

/* addr NULL: the service port's own entry. words: 1 (IPv4) or 4 (IPv6). */
static __always_inline void bpfp_count(__u32 svc_id, __u8 family, const __be32 *addr,
                                       __be16 port, const struct bpfp_delta *d)
{
        struct stats_key key = { .svc_id = svc_id, .family = family };
        if (addr) {
                key.port = port;
                key.addr[0] = addr[0];
                if (family == 6) {
                        key.addr[1] = addr[1];
                        key.addr[2] = addr[2];
                        key.addr[3] = addr[3];
                }
        }
        struct stats_value *v = bpfp_stats.lookup(&key);
        if (!v) {
                struct stats_value zero = {};
                bpfp_stats.update(&key, &zero);
                v = bpfp_stats.lookup(&key);
                if (!v)
                        return;
        }
        v->connections += d->connections;
        v->packets += d->packets;
        v->bytes += d->bytes;
        v->refused += d->refused;
        v->dropped += d->dropped;
}

/* A connection (or flow) balanced to a backend: on the service port's entry and the
 * backend's; packets and bytes (TC path) on the backend's. */
static __always_inline void bpfp_count_connection(__u32 svc_id, __u8 family,
                                                  const __be32 *addr, __be16 port,
                                                  __u64 packets, __u64 bytes)
{
        struct bpfp_delta service = { .connections = 1 };
        struct bpfp_delta backend = { .connections = 1, .packets = packets, .bytes = bytes };
        bpfp_count(svc_id, family, NULL, 0, &service);
        bpfp_count(svc_id, family, addr, port, &backend);
}

/* A connection the service port refused: no usable backend. */
static __always_inline void bpfp_count_refused(__u32 svc_id, __u8 family)
{
        struct bpfp_delta refused = { .refused = 1 };
        bpfp_count(svc_id, family, NULL, 0, &refused);
}

#endif /* BPFP_COUNTERS_H */
