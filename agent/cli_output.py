"""How the command line prints API answers: tables for people (readable at a glance),
JSON and YAML for scripts. Pure: plain dicts in, text out.

Table layouts may change between releases; -o json|yaml is the stable interface."""
from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import yaml

NO_BACKENDS = "(none: connections refused)"


def dump(data, output: str) -> str:
    if output == "json":
        return json.dumps(data, indent=2)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip("\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is never padded."""
    cells = [list(headers)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers) - 1)]
    return "\n".join("  ".join([c.ljust(w) for c, w in zip(r, widths, strict=False)]
                               + [r[-1]]).rstrip() for r in cells)


def human_count(n: int) -> str:
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def _when(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") \
        if unix else "never"


def _service(e: dict) -> str:
    if e.get("held_back") and not e["name"]:
        return "(adopted, owner unknown)"
    return f"{e['namespace']}/{e['name']}"


# ---- status ----------------------------------------------------------------------------

def status_text(s: dict) -> str:
    """The first line is the one scripts grep (synced: / not synced:)."""
    head = (f"synced: {s['service_ports']} service ports, {s['frontends']} frontends, "
            f"{s['backends']} backend slots in the kernel (node {s['node_name']}, "
            f"{s['source']})" if s["synced"] else
            f"not synced: agent running, first sync not yet in the kernel "
            f"(node {s['node_name']}, {s['source']})")
    src = s["source_state"]
    lines = [head, "",
             f"version      {s['version']}",
             f"source       {src['kind']} {src['location']}"
             f"{'' if src['complete'] else '  (INCOMPLETE: some input unreadable)'}"
             f"{'  (STALLED: ' + src['stalled'] + ')' if src.get('stalled') else ''}",
             f"last sync    {_when(s['last_sync_unix'])}, took {s['last_sync_seconds']:.3f}s; "
             f"change to kernel {s['last_event_to_kernel_seconds']:.3f}s",
             f"syncs        {s['syncs']} ({s['full_syncs']} full, {s['change_syncs']} "
             f"with changes), {s['sync_errors']} failed"]
    for held in src.get("held_back", []):
        objects = ", ".join(held["objects"]) or ("content unknown: what the kernel held "
                                                 "at start is kept" if held["unknown"]
                                                 else "no objects")
        lines.append(f"held back    {held['origin']}: {held['reason']} ({objects})")
    for problem in s.get("admission_problems", []):
        lines.append(f"not admitted {problem['namespace']}/{problem['name']}: "
                     f"{problem['reason']}")
    errors = {k: v for k, v in s["errors"].items() if v}
    lines.append("errors       " + (", ".join(f"{k}={v}" for k, v in errors.items())
                                    or "none"))
    counted = {k: v for k, v in (s.get("datapath_events") or {}).items() if v}
    if counted:
        lines.append("datapath     " + ", ".join(f"{k}={v}" for k, v in sorted(counted.items())))
    flows = s.get("flows") or {}
    if flows.get("snat_port_range"):        # swept at least once: a TC path is attached
        events = {k: v for k, v in flows["events"].items() if v}
        lines.append(f"flows        {flows['flows']} from outside ({flows['entries']} entries); "
                     f"SNAT ports {flows['snat_ports_in_use']} in use, busiest backend "
                     f"{flows['snat_ports_busiest']} of {flows['snat_port_range']}"
                     + ("; " + ", ".join(f"{k}={v}" for k, v in sorted(events.items()))
                        if events else ""))
    if s["programs"]:
        lines += ["", table(["PROGRAM", "HOOK", "ATTACHED TO", "STATE"], [
            (p["name"] or "-", p["hook"], p["target"], _program_state(p))
            for p in s["programs"]])]
    if s["maps"]:
        memory = sum(int(m.get("memory_bytes") or 0) for m in s["maps"])
        lines += ["", table(["MAP", "TYPE", "ENTRIES", "CAPACITY", "USED", "MEMORY"], [
            (m["name"], m["type"], str(m["entries"]), str(m["max_entries"]),
             f"{100 * m['entries'] / m['max_entries']:.1f}%" if m["max_entries"] else "-",
             human_bytes(int(m.get("memory_bytes") or 0))) for m in s["maps"]]),
                  f"maps hold {human_bytes(memory)} of kernel memory"]
    return "\n".join(lines)


def _program_state(p: dict) -> str:
    if p["attached"]:
        return f"attached (id {p['program_id']})"
    if p.get("state") == "fallback":        # on purpose: say what serves instead, and why
        return f"not attached: {p['detail']}"
    return "MISSING"


# ---- services, backends, stats ---------------------------------------------------------

def _port_key(e: dict) -> tuple:
    return (e["namespace"], e["name"], e["port_name"], e["protocol"])


def services_table(ports: Sequence[dict], stats: dict[tuple, dict] | None) -> str:
    """ports: ServicePort as plain dicts; stats: counters by _port_key (None: unknown)."""
    rows = []
    for p in ports:
        c = (stats or {}).get(_port_key(p))
        backends = ", ".join(f"{b['address']}:{b['port']}"
                             + ("" if b["state"] == "ready" else f" ({b['state']})")
                             for b in p["backends"]) or NO_BACKENDS
        rows.append((_service(p), p["port_name"] or "-", p["protocol"],
                     p.get("type", "ClusterIP"),
                     ", ".join(f"{f['address']}:{f['port']}" + (
                         "*" if f.get("allocated") else "") + (
                         "" if f["kind"] == "ClusterIP" else f" ({f['kind']})")
                               for f in p["frontends"]) or "-",
                     human_count(c["connections"]) if c else "-",
                     human_count(c["refused"]) if c else "-",
                     backends))
    text = table(["SERVICE", "PORT", "PROTO", "TYPE", "FRONTENDS", "CONNS", "REFUSED",
                  "BACKENDS"], rows)
    if any(f.get("allocated") for p in ports for f in p["frontends"]):
        text += "\n* allocated by the agent: the manifest gave none (as an API server would)"
    return text


def backends_table(rows: Sequence[dict]) -> str:
    return table(["SERVICE", "PORT", "PROTO", "BACKEND", "STATE", "CONNS"], [
        (_service(r), r["port_name"] or "-", r["protocol"],
         f"{r['address']}:{r['port']}" if r["family"] == 4 else
         f"[{r['address']}]:{r['port']}", r["state"],
         human_count(r["counters"]["connections"]) if r.get("counters") else "-")
        for r in rows])


def stats_table(services: Sequence[dict]) -> str:
    """One row per service port, then one indented row per backend."""
    rows = []
    for s in services:
        c = s["counters"]
        rows.append((f"{_service(s)}{':' + s['port_name'] if s['port_name'] else ''}"
                     f"/{s['protocol']}", f"IPv{s['family']}", human_count(c["connections"]),
                     human_count(c["packets"]), human_bytes(c["bytes"]),
                     human_count(c["refused"]), human_count(c["dropped"])))
        for b in s["backends"]:
            bc = b["counters"]
            rows.append((f"  -> {b['address']}:{b['port']} ({b['state']})", "",
                         human_count(bc["connections"]), human_count(bc["packets"]),
                         human_bytes(bc["bytes"]), "", ""))
    return table(["SERVICE PORT / BACKEND", "FAMILY", "CONNS", "PACKETS", "BYTES",
                  "REFUSED", "DROPPED"], rows)


# ---- events ----------------------------------------------------------------------------

def event_line(e: dict) -> str:
    when = datetime.fromtimestamp(e["time_unix"], UTC).strftime("%H:%M:%S.%f")[:-3]
    missed = f" (missed {e['dropped_before']} before)" if e["dropped_before"] else ""
    if e["kind"] == "sync":
        latency = (f", change to kernel {e['event_to_kernel_seconds']:.3f}s"
                   if e["event_to_kernel_seconds"] else "")
        return (f"{when}  sync{' (full)' if e['full'] else ''}: {e['operations']} map ops "
                f"in {e['duration_seconds']:.3f}s, {e['service_ports']} service ports"
                f"{latency}{missed}")
    return f"{when}  {e['kind']}: {e['message']}{missed}"


def event_record(e: dict, output: str) -> str:
    if output == "json":
        return json.dumps(e)                       # JSON lines: one event per line
    if output == "yaml":
        return "---\n" + dump(e, "yaml")
    return event_line(e)
