"""The ordered map operations that turn what the kernel holds into a plan's result:
backend slots (and the ranges and Maglev tables frontends use) first, then frontends,
then removals of frontends, then of slots. Pure."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from agent import maglev
from agent.model.types import Protocol
from agent.planner.kernel import (
    BE_LOCAL,
    MAGLEV_ROW,
    NO_BACKENDS,
    SVC_F_MAGLEV,
    BackendAddr,
    DeleteFrontend,
    DeleteMaglev,
    DeleteRange,
    DeleteSlot,
    FrontendKey,
    KernelService,
    MapOp,
    PutFrontend,
    PutMaglev,
    PutRange,
    PutSlot,
)


def diff(applied: Mapping[int, KernelService], result: Mapping[int, KernelService],
         owners: Mapping[FrontendKey, int], svc_ids: Iterable[int], maglev_m: int = 0
         ) -> tuple[tuple[MapOp, ...], frozenset[BackendAddr]]:
    """The ordered operations that turn applied into result for the given service ids,
    and the backends UDP service ports lose."""
    put_slots: list[MapOp] = []        # with the ranges and Maglev tables frontends use
    put_frontends: list[MapOp] = []
    delete_frontends: list[MapOp] = []
    delete_slots: list[MapOp] = []
    released: set[FrontendKey] = set()
    removed: set[BackendAddr] = set()
    for svc_id in sorted(svc_ids):
        old, new = applied.get(svc_id), result.get(svc_id)
        old_slots = old.backends if old else ()
        if old is not None and any(f.protocol is Protocol.UDP for f in old.frontends) \
                and (new is None or new.backends is not old_slots):
            removed.update(set(old_slots) - set(new.backends if new else ()))
        if old is not None:
            released.update(f for f in old.frontends if f not in owners)
        old_ranges = set(old.source_ranges) if old else set()
        old_maglev = old is not None and old.flags & SVC_F_MAGLEV
        if old is not None and old.stray_maglev_rows and \
                not (new is not None and new.flags & SVC_F_MAGLEV):
            delete_slots.append(DeleteMaglev(svc_id, old.stray_maglev_rows * MAGLEV_ROW))
        if new is None:
            if old is not None:
                slots = sorted(set(range(len(old_slots))) | set(old.stray_slots))
                delete_slots.extend(DeleteSlot(old.family, svc_id, i) for i in slots)
                delete_slots.extend(DeleteRange(svc_id, n) for n in sorted(old_ranges, key=str))
                if old_maglev:
                    delete_slots.append(DeleteMaglev(svc_id, maglev_m or maglev.M_MAX))
            continue
        new_local, old_local = new.local, old.local if old else NO_BACKENDS
        if old is None:   # a new port (a whole first sync): every slot, as the loop below
            family = new.family
            put_slots.extend([PutSlot(family, svc_id, i, b, BE_LOCAL if b in new_local else 0)
                              for i, b in enumerate(new.backends)] if new_local else
                             [PutSlot(family, svc_id, i, b) for i, b in enumerate(new.backends)])
        flagged = new_local or old_local    # else no lookups: most ports have no local one
        # slots unchanged (the planner keeps the old tuple then) need no look unless flagged
        for i, backend in enumerate(() if old is None or (new.backends is old_slots
                                                         and not flagged)
                                    else new.backends):
            local = bool(new_local) and backend in new_local
            # a slot whose backend stays but whose BE_LOCAL is wrong (written by an agent
            # that knew no flags, or the node's name or IPs changed) is rewritten too
            if i >= len(old_slots) or old_slots[i] != backend or \
                    (flagged and local != (backend in old_local)):
                put_slots.append(PutSlot(new.family, svc_id, i, backend,
                                         BE_LOCAL if local else 0))
        put_slots.extend(PutRange(svc_id, n) for n in new.source_ranges if n not in old_ranges)
        if new.flags & SVC_F_MAGLEV and (not old_maglev or old_slots != new.backends):
            names = [f"{b.address}:{b.port}" for b in new.backends]
            put_slots.append(PutMaglev(svc_id, tuple(maglev.table(names, maglev_m))))
        rewrite = old is None or len(old_slots) != len(new.backends) \
            or old.name_hash != new.name_hash or old.affinity != new.affinity \
            or old.flags != new.flags
        had = old.frontends if old else ()
        stale = old.stale_frontends if old else frozenset()
        for fkey in new.frontends:            # in frontend_order
            if rewrite or fkey not in had or fkey in stale:
                put_frontends.append(PutFrontend(fkey, svc_id, len(new.backends),
                                                 new.name_hash, new.affinity, new.flags))
        delete_slots.extend(DeleteRange(svc_id, n) for n in
                            sorted(old_ranges - set(new.source_ranges), key=str))
        if old_maglev and not new.flags & SVC_F_MAGLEV:
            # after a switch to random the table's size is unknown: the largest one
            delete_slots.append(DeleteMaglev(svc_id, maglev_m or maglev.M_MAX))
        gone = set(range(len(new.backends), len(old_slots)))
        gone |= {i for i in (old.stray_slots if old else ()) if i >= len(new.backends)}
        delete_slots.extend(DeleteSlot(new.family, svc_id, i) for i in sorted(gone))
    delete_frontends.extend(DeleteFrontend(f) for f in sorted(released, key=_frontend_order))
    return (*put_slots, *put_frontends, *delete_frontends, *delete_slots), frozenset(removed)


def _frontend_order(f: FrontendKey) -> tuple:
    return (f.address.version, int(f.address), f.port, f.protocol.value)
