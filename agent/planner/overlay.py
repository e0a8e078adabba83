"""A mapping read through to a base and written locally: an incremental plan changes
only what changed, and the record takes its changes once the kernel holds them. Pure."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from agent.planner.kernel import Plan

_GONE = object()


class Overlay(Mapping):
    """A mapping read through to a base and written locally: an incremental plan's
    result costs what changed. commit() writes the changes into the base, in place."""

    def __init__(self, base: Mapping) -> None:
        self.base = base.base if isinstance(base, Overlay) else base
        self.changes: dict = dict(base.changes) if isinstance(base, Overlay) else {}

    def __getitem__(self, key):
        value = self.changes.get(key, self.base.get(key, _GONE)) if key in self.changes \
            else self.base[key]
        if value is _GONE:
            raise KeyError(key)
        return value

    def __contains__(self, key) -> bool:
        if key in self.changes:
            return self.changes[key] is not _GONE
        return key in self.base

    def __iter__(self):
        yield from (k for k in self.base if k not in self.changes)
        yield from (k for k, v in self.changes.items() if v is not _GONE)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __setitem__(self, key, value) -> None:
        self.changes[key] = value

    def __delitem__(self, key) -> None:
        if key not in self:
            raise KeyError(key)
        self.changes[key] = _GONE

    def pop(self, key, default=None):
        if key not in self:
            return default
        value = self[key]
        self.changes[key] = _GONE
        return value

    def setdefault(self, key, default):
        if key not in self:
            self[key] = default
        return self[key]

    def commit(self) -> dict:
        for key, value in self.changes.items():
            if value is _GONE:
                self.base.pop(key, None)
            else:
                self.base[key] = value
        self.changes = {}
        return self.base


def commit(p: Plan) -> Plan:
    """The plan with its overlays written into their bases (after the kernel took it)."""
    flat = [x.commit() if isinstance(x, Overlay) else x for x in (p.result, p.ids, p.owners)]
    return replace(p, result=flat[0], ids=flat[1], owners=flat[2])

