"""The agent's configuration file (`bpfproxy agent --config FILE`): YAML in the spirit of
kube-proxy's KubeProxyConfiguration, every field validated, unknown fields refused.

The file only supplies defaults for the agent's flags, so a flag given on the command line
wins. Errors name the field: `config: conntrack.udpTimeout: must be a positive number of
seconds, got "x"`."""
from __future__ import annotations

import argparse
import ipaddress
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from agent import maglev
from agent.datapath.config import ACCELERATIONS, LB_ALGORITHMS, NODEPORT_MODES
from agent.datapath.sizing import SIZE_FLAGS

API_VERSION = "bpfproxy.io/v1alpha1"
KIND = "BpfProxyConfiguration"
MAX_FILE_BYTES = 1024 * 1024


class ConfigError(ValueError):
    """Names the field and says what is wrong; the agent exits 2 with it."""


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(field: str, problem: str, value: Any) -> ConfigError:
    return ConfigError(f"config: {field}: {problem}, got {_show(value)}")


# --- field converters: (field name, raw value) -> the flag's value --------------------

def _string(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(field, "must be a string", value)
    return value


def _path(field: str, value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise _fail(field, "must be a non-empty path", value)
    return Path(value)


def _list(field: str, value: Any) -> list[str]:
    """A YAML list of strings, or one comma-separated string (as the flag takes)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(field, "must be a list of strings", value)
    return value


def _ips(field: str, value: Any) -> str:
    addresses = _list(field, value)
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise _fail(field, "must be IP addresses", value) from None
    families = [ipaddress.ip_address(a).version for a in addresses]
    if len(families) != len(set(families)):
        raise _fail(field, "at most one address per family", value)
    return ",".join(addresses)


def _cidrs(field: str, value: Any) -> str:
    cidrs = _list(field, value)
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise _fail(field, "must be CIDRs like 10.0.0.0/8", value) from None
    return ",".join(cidrs)


def _names(field: str, value: Any) -> str:
    names = _list(field, value)
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_.@:-]{1,15}", name):
            raise _fail(field, "must be interface names", value)
    return ",".join(names)


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                 "h": 3600.0}


def _seconds(field: str, value: Any, allow_zero: bool = False) -> float:
    """Seconds as a number, or a Go duration as KubeProxyConfiguration writes them
    ("30s", "1m30s", "500ms")."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value and re.fullmatch(f"(?:{_DURATION.pattern})+", value):
        seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION.findall(value))
    if seconds is None or seconds != seconds or seconds == float("inf") \
            or seconds < 0 or (seconds == 0 and not allow_zero):
        qualifier = "non-negative" if allow_zero else "positive"
        raise _fail(field, f"must be a {qualifier} number of seconds", value)
    return seconds


def _positive_seconds(field: str, value: Any) -> float:
    return _seconds(field, value)


def _non_negative_seconds(field: str, value: Any) -> float:
    return _seconds(field, value, allow_zero=True)


def _positive_int(field: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _fail(field, "must be a positive whole number", value)
    return value


def _fraction(field: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or \
            not 0 < value <= 0.5:
        raise _fail(field, "must be a fraction above 0 and at most 0.5", value)
    return float(value)


def _prime(field: str, value: Any) -> int:
    number = _positive_int(field, value)
    if not maglev.is_prime(number) or not maglev.M_MIN <= number <= maglev.M_MAX:
        raise _fail(field, f"must be a prime between {maglev.M_MIN} and {maglev.M_MAX} "
                           f"(Maglev needs one)", value)
    return number


Converter = Callable[[str, Any], Any]


def _one_of(choices: tuple[str, ...]) -> Converter:
    """The converter of a field that takes one of choices (its flag's argparse choices)."""
    def convert(field: str, value: Any) -> str:
        if value not in choices:
            raise _fail(field, f"must be one of {', '.join(choices)}", value)
        return value
    return convert

# file field -> (agent flag dest, converter)
FIELDS: dict[str, tuple[str, Converter]] = {
    "nodeName": ("node_name", _string),
    "nodeIP": ("node_ip", _ips),
    "nodePortAddresses": ("nodeport_addresses", _cidrs),
    "interfaces": ("interfaces", _names),
    "cgroup": ("cgroup", _path),
    "bpffs": ("bpffs", _path),
    "api": ("api", _string),
    "metrics": ("metrics", _string),
    "healthz": ("healthz", _string),
    "minSyncPeriod": ("min_sync_period", _non_negative_seconds),
    "syncPeriod": ("sync_period", _positive_seconds),
    "lbAlgorithm": ("lb_algorithm", _one_of(LB_ALGORITHMS)),
    "acceleration": ("acceleration", _one_of(ACCELERATIONS)),
    "nodeportMode": ("nodeport_mode", _one_of(NODEPORT_MODES)),
    "maglevTableSize": ("maglev_table_size", _prime),
    "kubeconfig": ("kubeconfig", _path),
    "manifests": ("manifests", _path),
    "serviceClusterIPRange": ("service_cluster_ip_range", _cidrs),
    "serviceNodePortRange": ("service_node_port_range", _string),
}
# map sizes (the agent's --max-* flags)
MAPS_FIELDS: dict[str, tuple[str, Converter]] = {
    **{size.key: (size.dest, _positive_int) for size in SIZE_FLAGS},
    "memoryRatio": ("map_memory_ratio", _fraction),
}
CONNTRACK_FIELDS: dict[str, tuple[str, Converter]] = {
    "maxEntries": ("conntrack_max", _positive_int),
    "tcpTimeout": ("conntrack_tcp_timeout", _positive_seconds),
    "tcpCloseTimeout": ("conntrack_tcp_close_timeout", _positive_seconds),
    "udpTimeout": ("conntrack_udp_timeout", _positive_seconds),
    "snatPortRange": ("snat_port_range", _string),
}


def parse(document: Any) -> dict[str, Any]:
    """A loaded YAML document -> {flag dest: value}, only for the fields it sets."""
    if not isinstance(document, dict):
        raise _fail("(top level)", "must be a mapping", "a list" if isinstance(
            document, list) else document)
    if document.get("apiVersion") != API_VERSION:
        raise _fail("apiVersion", f"must be {API_VERSION}", document.get("apiVersion"))
    if document.get("kind") != KIND:
        raise _fail("kind", f"must be {KIND}", document.get("kind"))
    sections = {"conntrack": CONNTRACK_FIELDS, "maps": MAPS_FIELDS}
    values = _fields(document, FIELDS, "", skip=("apiVersion", "kind", *sections))
    for section, known in sections.items():
        mapping = document.get(section)
        if mapping is None:
            continue
        if not isinstance(mapping, dict):
            raise _fail(section, "must be a mapping", "a list" if isinstance(
                mapping, list) else mapping)
        values.update(_fields(mapping, known, f"{section}."))
    if "manifests" in values and "kubeconfig" in values:
        raise ConfigError("config: manifests, kubeconfig: give one source, not both")
    return values


def _fields(mapping: dict, known: dict[str, tuple[str, Converter]], prefix: str,
            skip: tuple[str, ...] = ()) -> dict[str, Any]:
    values = {}
    for name, value in mapping.items():
        if name in skip:
            continue
        if name not in known:
            raise ConfigError(f"config: {prefix}{name}: unknown field (known: "
                              f"{', '.join(prefix + k for k in known)})")
        if value is None:
            continue          # `field:` with nothing after it: the flag's default
        dest, convert = known[name]
        values[dest] = convert(prefix + name, value)
    return values


def load(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"config: {path}: cannot read: {error.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"config: {path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        document = yaml.safe_load(data.decode("utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"config: {path}: not valid YAML: "
                          f"{' '.join(str(error).split())}") from None
    return parse(document)


def apply(parser: argparse.ArgumentParser, argv: list[str] | None,
          args: argparse.Namespace) -> argparse.Namespace:
    """Parse argv again with the file's values as the agent flags' defaults: whatever the
    command line gives explicitly wins."""
    values = load(args.config)
    agent = _subparser(parser, "agent")
    known = {action.dest for action in agent._actions}
    missing = {dest for dest in values} - known
    if missing:                           # a field for a flag this build does not have
        raise ConfigError(f"config: fields for flags this agent lacks: {sorted(missing)}")
    agent.set_defaults(**values)
    reparsed = parser.parse_args(argv)
    # --manifests and --kubeconfig exclude each other; the command line's one wins
    if reparsed.manifests is not None and reparsed.kubeconfig is not None:
        for dest in ("manifests", "kubeconfig"):
            if values.get(dest) is not None and getattr(reparsed, dest) == values[dest]:
                setattr(reparsed, dest, None)
    return reparsed


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    # argparse offers no public way back to a subparser; its _actions are stable since 3.2
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise LookupError(f"no {name} subcommand")
