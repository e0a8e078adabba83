"""Named network namespaces through iproute2 (`ip netns add` so they appear in /run/netns).
Every name must carry the bpfp prefix; commands raise with ip's stderr when they fail."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

NETNS_DIR = Path("/run/netns")
PREFIX = "bpfp-"


def ip(*args: str, netns: str | None = None, timeout: float = 10.0) -> str:
    """Run `ip [-n netns] args...` and return its stdout."""
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def path(name: str) -> Path:
    return NETNS_DIR / name


def add(name: str) -> None:
    _check_prefix(name)
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", netns=name)


def delete(name: str) -> None:
    """Delete the namespace; its interfaces (and the veth peers of them) go with it."""
    _check_prefix(name)
    if path(name).exists():
        ip("netns", "delete", name)


def names() -> list[str]:
    return sorted(entry.name for entry in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []


def sysctl(name: str, settings: dict[str, str | int]) -> None:
    """Set net sysctls inside the namespace: /proc/sys/net is per namespace of the writer."""
    assignments = [f"{key}={value}" for key, value in settings.items()]
    argv = [nsenter(), f"--net={path(name)}", "--", "sysctl", "-qw", *assignments]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"sysctl in netns {name}: {done.stderr.strip()}")


# In the namespace: ETHTOOL_STXCSUM (0x17) = argv[2] through SIOCETHTOOL (no ethtool binary
# here), then, with argv[3] "1", an XDP program that passes every packet, in driver mode
# (libbpf's bpf_prog_load and bpf_xdp_attach; a netlink attachment outlives this process)
_PREPARE = """
import ctypes, ctypes.util, fcntl, socket, struct, sys
name, tx_checksum, xdp_pass = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
value = ctypes.create_string_buffer(struct.pack("II", 0x17, tx_checksum))
fcntl.ioctl(socket.socket(), 0x8946, struct.pack("16sP", name.encode(), ctypes.addressof(value)))
if xdp_pass:
    bpf = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
    insns = bytes.fromhex("b700000002000000" "9500000000000000")   # r0 = XDP_PASS; exit
    fd = bpf.bpf_prog_load(6, b"bpfp_lab_pass", b"GPL", insns, 2, None)   # BPF_PROG_TYPE_XDP
    if fd < 0 or bpf.bpf_xdp_attach(socket.if_nametoindex(name), fd, 4, None) < 0:
        sys.exit(f"XDP on {name}: {ctypes.get_errno()}")
"""


def prepare_for_xdp(name: str, ifname: str, xdp_pass: bool = False) -> None:
    """A veth of the lab where XDP programs forward packets. Its transmit checksum offload
    goes: a veth hands a packet over with the checksum only begun (a real NIC would finish
    it on the wire), and an XDP program that sends it on passes it unfinished, so the
    receiver drops it. With xdp_pass it gets a program that passes everything: XDP_TX or
    XDP_REDIRECT into a veth needs one on the receiving end (its NAPI ring)."""
    argv = [nsenter(), f"--net={path(name)}", "--", "python3", "-c", _PREPARE, ifname, "0",
            "1" if xdp_pass else "0"]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"preparing {ifname} in netns {name} for XDP: "
                           f"{done.stderr.strip()}")


def nsenter() -> str:
    found = shutil.which("nsenter")
    if not found:
        raise RuntimeError("nsenter not found; install util-linux")
    return found


def _check_prefix(name: str) -> None:
    # The lab only ever touches what it named; refusing anything else keeps a bug harmless.
    if not name.startswith(PREFIX):
        raise ValueError(f"netns {name!r}: lab namespaces must start with {PREFIX!r}")
