"""Compiles bpf/*.c with BCC, pins the maps, and attaches the socket programs to a cgroup.

Attachments are pinned bpf_links: they outlive the agent, and a new agent swaps its
programs in atomically (bpf_link_update), so traffic never sees a moment without one."""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from agent.datapath import bpfsys, btf, layout, migrate
from agent.datapath.bpfsys import AttachType
from agent.datapath.config import DatapathConfig
from agent.datapath.programs import PROGRAM_FILES, SOCKET_PROGRAMS, TC_PROGRAMS, XDP_PROGRAM

log = logging.getLogger(__name__)

BPF_DIR = Path(os.environ.get("BPFPROXY_BPF_DIR", Path(__file__).resolve().parents[2] / "bpf"))

# Pinned maps (file names carry the layout version) by BCC table name.
PINNED_MAPS = {spec.table: spec.pin for spec in (*layout.MAPS.values(), layout.SOCKET_STORAGE)}

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


RESULT = "bpfp-loader-result "   # the child's one stdout line: what the agent must know


class DatapathError(RuntimeError):
    """The kernel refused something; the message says what and what to do."""


def inline_headers(path: Path, seen: frozenset[Path] = frozenset()) -> str:
    """BCC resolves map access only in the text it compiles, so local headers are pasted
    in; #line markers keep compiler and verifier messages pointing at the real file."""
    out = [f'#line 1 "{path.name}"']
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = _INCLUDE.match(line)
        if match:
            header = (path.parent / match.group(1)).resolve()
            if header not in seen:
                out.append(inline_headers(header, seen | {path.resolve()}))
            out.append(f'#line {number + 1} "{path.name}"')
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def ensure_bpffs(pin_dir: Path) -> None:
    """bpffs is not mounted at boot on every machine; pins need it."""
    mounts = Path("/proc/mounts").read_text().split("\n")
    mounted = any(m.split(" ")[1:3] == ["/sys/fs/bpf", "bpf"] for m in mounts if m)
    if not mounted and subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"],
                                      check=False).returncode != 0:
        raise DatapathError("bpffs is not mounted at /sys/fs/bpf and mounting it failed; "
                            "run: mount -t bpf bpf /sys/fs/bpf")
    pin_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (pin_dir / "links").mkdir(mode=0o700, exist_ok=True)


def restrict_pins(pin_dir: Path) -> None:
    """Pins hand out the maps and links to whoever can open them: the agent's user only
    (the kernel's 0600 default for pins depends on the umask; directories do not have it)."""
    for directory in (pin_dir, pin_dir / "links"):
        os.chmod(directory, 0o700)
        for pin in directory.iterdir():
            if not pin.is_dir():
                os.chmod(pin, 0o600)


def check_kernel_headers() -> None:
    release = os.uname().release
    kdir = Path("/lib/modules") / release
    if any((kdir / d / "include/linux/kconfig.h").exists() for d in ("build", "source")) \
            or Path("/sys/kernel/kheaders.tar.xz").exists():
        return
    raise DatapathError(f"no kernel headers for {release} under {kdir}: BCC cannot compile "
                        f"the programs; run `make install` (it links Debian's headers)")


@dataclass
class LoadedDatapath:
    bpf: object                    # bcc.BPF: owns the program fds and the map tables
    config: DatapathConfig


def compile_programs(config: DatapathConfig) -> LoadedDatapath:
    """Compile the programs this configuration loads; the maps are created and pinned, or
    adopted when already pinned."""
    from bcc import BPF  # only here: importing bcc is slow and needs root-ish setup

    check_kernel_headers()
    ensure_bpffs(config.pin_dir)
    # one object: the programs share the maps (maps.h's include guard keeps one copy)
    files = program_files(config)
    text = "".join(inline_headers(BPF_DIR / name) for name in files)
    try:
        bpf = BPF(text=text.encode(), cflags=config.cflags())
    except Exception as exc:
        raise DatapathError(f"compiling {', '.join(files)} failed: {exc}") from exc
    _check_pinned_layouts(bpf, config)
    _check_socket_storage(config)
    return LoadedDatapath(bpf, config)


def program_files(config: DatapathConfig) -> tuple[str, ...]:
    """The files this configuration loads programs from: every file costs its compile at
    each start (xdp.c alone 1.5 s), and maps.h declares every map whichever are compiled."""
    wanted = {"socklb.c"}
    if config.interfaces:
        wanted.add("nodeport.c")
        if config.acceleration != "disabled":
            wanted.add("xdp.c")
    return tuple(name for name in PROGRAM_FILES if name in wanted)


def compile_carrying_maps(config: DatapathConfig) -> LoadedDatapath:
    """compile_programs after a layout version change too: old maps whose layout this build
    keeps are adopted as they are; the others are made anew, for migrate.fill."""
    shared = migrate.share_unchanged(config.pin_dir)
    loaded = compile_programs(config)
    types = {table: loaded.bpf[table.encode()].ttype for table in shared}
    if migrate.unshare_retyped(config.pin_dir, shared, types):
        loaded = compile_programs(config)       # those maps are now made anew
    return loaded


def _check_pinned_layouts(bpf, config: DatapathConfig) -> None:
    """BCC silently adopts a pinned map even when its layout differs: refuse instead. And
    the agent writes with layout.py's structs: they must be what BCC compiled."""
    for table_name, spec in layout.MAPS.items():
        table = bpf[table_name.encode()]
        info = bpfsys.map_info(table.map_fd)
        leaf = getattr(table, "sLeaf", table.Leaf)    # per-CPU tables: one CPU's value
        if info["key_size"] != ctypes.sizeof(table.Key) or \
                info["value_size"] != ctypes.sizeof(leaf):
            raise DatapathError(
                f"pinned map {config.pin_dir / spec.pin} has another layout "
                f"(key {info['key_size']} B, value {info['value_size']} B); "
                f"run `bpfproxy cleanup` and start again")
        for compiled, mirrored in ((table.Key, spec.key), (leaf, spec.value)):
            if layout.struct_fields(compiled) != layout.struct_fields(mirrored):
                raise DatapathError(f"agent/datapath/layout.py {mirrored.__name__} "
                                    f"{layout.struct_fields(mirrored)} differs from bpf/maps.h "
                                    f"{layout.struct_fields(compiled)}")
        expected_max = spec.max_entries(config)
        if info["max_entries"] != expected_max:
            log.warning("event=pinned_map_size map=%s pinned_max=%d configured_max=%d "
                        "action=keeping_pinned", spec.pin, info["max_entries"], expected_max)


def _check_socket_storage(config: DatapathConfig) -> None:
    """bpfp_sock_revnat as _check_pinned_layouts checks the others, from the kernel's view
    of the pinned map (BCC has no table class for socket-local storage)."""
    spec = layout.SOCKET_STORAGE
    fd = bpfsys.obj_get(str(config.pin_dir / spec.pin))
    try:
        shape = btf.map_shape(fd)
    finally:
        os.close(fd)
    if shape.value_size != ctypes.sizeof(spec.value) or \
            (shape.value is not None and tuple(shape.value) != layout.struct_fields(spec.value)):
        raise DatapathError(f"pinned map {config.pin_dir / spec.pin} has another layout "
                            f"(value {shape.value_size} B, {shape.value}); run `bpfproxy "
                            f"cleanup` and start again")


def _load_socket_program(loaded: LoadedDatapath, func_name: str, attach_type: AttachType):
    """sock_release is a cgroup sock program (its context is the socket); the other hooks
    are sock_addr programs."""
    from bcc import BPF

    prog_type = BPF.CGROUP_SOCK if attach_type is AttachType.CGROUP_INET_SOCK_RELEASE \
        else BPF.CGROUP_SOCK_ADDR
    return loaded.bpf.load_func(func_name.encode(), prog_type, attach_type=int(attach_type))


def attach_socket_programs(loaded: LoadedDatapath, cgroup_dir: Path) -> None:
    """Attach (or atomically replace) each socket hook through a pinned bpf_link."""
    cgroup_id = bpfsys.cgroup_id(str(cgroup_dir))
    cgroup_fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for func_name, attach_type in SOCKET_PROGRAMS:
            fn = _load_socket_program(loaded, func_name, attach_type)
            link_path = str(loaded.config.pin_dir / "links" / func_name)
            if os.path.exists(link_path):
                link_fd = bpfsys.obj_get(link_path)
                try:
                    if bpfsys.link_cgroup_id(link_fd) == cgroup_id:
                        bpfsys.link_update(link_fd, fn.fd)
                        log.info("event=program_replaced hook=%s", attach_type.name)
                        continue
                finally:
                    os.close(link_fd)
                # attached to another cgroup by an earlier run: unpinning detaches it
                os.unlink(link_path)
            link_fd = bpfsys.link_create(fn.fd, cgroup_fd, attach_type)
            try:
                bpfsys.obj_pin(link_fd, link_path)
            finally:
                os.close(link_fd)
            log.info("event=program_attached hook=%s cgroup=%s", attach_type.name, cgroup_dir)
    finally:
        os.close(cgroup_fd)


def load_all_programs(loaded: LoadedDatapath, interfaces: tuple[str, ...]) -> None:
    """Load (verify) every program and check the interfaces; BCC keeps the loaded
    functions, so the attach steps below only swap."""
    from bcc import BPF

    for ifname in interfaces:
        try:
            socket.if_nametoindex(ifname)
        except OSError as exc:
            raise DatapathError(f"--interfaces {ifname}: no such interface here") from exc
    for func_name, attach_type in SOCKET_PROGRAMS:
        _load_socket_program(loaded, func_name, attach_type)
    if interfaces:
        for func_name, _ in TC_PROGRAMS:
            loaded.bpf.load_func(func_name.encode(), BPF.SCHED_CLS)
        if loaded.config.acceleration != "disabled":
            loaded.bpf.load_func(XDP_PROGRAM.encode(), BPF.XDP)


def attach_tc_programs(loaded: LoadedDatapath, interfaces: tuple[str, ...]) -> None:
    """Attach (or atomically replace) the NodePort programs on each interface with tcx
    links pinned as links/tc-<ifname>-<hook>; links of interfaces no longer listed go."""
    from bcc import BPF

    links = loaded.config.pin_dir / "links"
    wanted = set()
    for ifname in interfaces:
        try:
            ifindex = socket.if_nametoindex(ifname)
        except OSError as exc:
            raise DatapathError(f"--interfaces {ifname}: no such interface here") from exc
        for func_name, attach_type in TC_PROGRAMS:
            fn = loaded.bpf.load_func(func_name.encode(), BPF.SCHED_CLS)
            hook = "ingress" if attach_type is AttachType.TCX_INGRESS else "egress"
            link_path = links / f"tc-{ifname}-{hook}"
            wanted.add(link_path.name)
            if link_path.exists():
                link_fd = bpfsys.obj_get(str(link_path))
                try:
                    if bpfsys.link_ifindex(link_fd) == ifindex:
                        bpfsys.link_update(link_fd, fn.fd)
                        log.info("event=program_replaced hook=tcx_%s interface=%s", hook,
                                 ifname)
                        continue
                finally:
                    os.close(link_fd)
                link_path.unlink()      # the device was re-created: a new link
            try:
                link_fd = bpfsys.link_create(fn.fd, ifindex, attach_type)
            except OSError as exc:
                raise DatapathError(f"attaching to {ifname} ({hook}) failed: {exc}; tcx "
                                    f"needs Linux 6.6 or later") from exc
            try:
                bpfsys.obj_pin(link_fd, str(link_path))
            finally:
                os.close(link_fd)
            log.info("event=program_attached hook=tcx_%s interface=%s", hook, ifname)
    for link in links.glob("tc-*"):
        if link.name not in wanted:
            link.unlink()               # unpinning the last reference detaches it
            log.info("event=program_detached link=%s", link.name)


def attach_xdp_programs(loaded: LoadedDatapath, interfaces: tuple[str, ...]
                        ) -> dict[str, str]:
    """--acceleration: the XDP program on each interface, in the driver (native XDP; the
    generic kind runs after the stack's own work and would only slow the TC path down),
    through a pinned link links/xdp-<ifname> swapped atomically by a new agent. Where the
    driver has none: native stops here, best-effort leaves that interface to the TC
    programs and says so. Links no longer wanted (acceleration disabled, an interface
    gone from the list) go. Returns the interfaces left to TC alone, each with why."""
    from bcc import BPF

    mode = loaded.config.acceleration
    links = loaded.config.pin_dir / "links"
    wanted, fallback = set(), {}
    if mode != "disabled" and interfaces:
        fn = loaded.bpf.load_func(XDP_PROGRAM.encode(), BPF.XDP)
        for ifname in interfaces:
            ifindex = socket.if_nametoindex(ifname)
            link_path = links / f"xdp-{ifname}"
            if link_path.exists():
                link_fd = bpfsys.obj_get(str(link_path))
                try:
                    if bpfsys.link_ifindex(link_fd) == ifindex:
                        bpfsys.link_update(link_fd, fn.fd)
                        wanted.add(link_path.name)
                        log.info("event=program_replaced hook=xdp interface=%s", ifname)
                        continue
                finally:
                    os.close(link_fd)
                link_path.unlink()      # the device was re-created: a new link
            try:
                link_fd = bpfsys.link_create(fn.fd, ifindex, AttachType.XDP,
                                             bpfsys.XDP_FLAGS_DRV_MODE)
            except OSError as exc:
                if mode == "native":
                    raise DatapathError(
                        f"--acceleration native: {ifname} takes no native XDP program "
                        f"({exc}); its driver may have no XDP support: use "
                        f"--acceleration best-effort or disabled") from exc
                fallback[ifname] = f"no native XDP on {ifname}: {exc}"
                log.warning("event=xdp_fallback interface=%s error=%r path=tc", ifname,
                            str(exc))
                continue
            try:
                bpfsys.obj_pin(link_fd, str(link_path))
            finally:
                os.close(link_fd)
            wanted.add(link_path.name)
            log.info("event=program_attached hook=xdp interface=%s mode=native", ifname)
    for link in links.glob("xdp-*"):
        if link.name not in wanted:
            link.unlink()               # unpinning the last reference detaches it
            log.info("event=program_detached link=%s", link.name)
    return fallback


def cleanup(pin_dir: Path) -> list[str]:
    """Remove every pin the agent made: unpinning a link detaches its program, unpinning
    a map frees it once no program uses it. Returns what was removed."""
    removed = []
    links = pin_dir / "links"
    if links.is_dir():
        for link in sorted(links.iterdir()):
            link.unlink()
            removed.append(str(link))
        links.rmdir()
    if pin_dir.is_dir():
        for pin in sorted(pin_dir.iterdir()):
            if pin.name.startswith("bpfp_"):
                pin.unlink()
                removed.append(str(pin))
        try:
            pin_dir.rmdir()
        except OSError as exc:
            log.warning("event=cleanup_left_dir dir=%s error=%s", pin_dir, exc)
    return removed


def attached_programs(cgroup_dir: Path) -> list[str]:
    """Our programs (by function name) attached to the cgroup at their hooks."""
    names = []
    for func, hook in SOCKET_PROGRAMS:
        for prog_id in bpfsys.cgroup_program_ids(str(cgroup_dir), hook):
            # the kernel keeps 15 characters of a program's name
            if bpfsys.program_name(prog_id) == func[:15]:
                names.append(func)
    return names


def wait_detached(cgroup_dir: Path, timeout: float) -> list[str]:
    """The kernel releases an unpinned link asynchronously; wait for it, return leftovers."""
    deadline = time.monotonic() + timeout
    while (left := attached_programs(cgroup_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# --- the compiler process -------------------------------------------------------------
# BCC brings LLVM and clang into the process that compiles (~100 MB that stay). The agent
# runs the compile and attach in a child that exits; what it made is pinned, so the agent
# works on the pins alone and stays small.

class LoaderChild:
    """The compile-and-attach child, started now and waited for later: the agent reads its
    source meanwhile (agent/main.py). Started with this process's capabilities (before the
    agent drops them), it keeps them after the parent's drop: capabilities are per task."""

    def __init__(self, config: DatapathConfig, cgroup_dir: Path, timeout: float = 300.0
                 ) -> None:
        argv = [sys.executable, "-m", "agent.datapath.loader", "--cgroup", str(cgroup_dir),
                "--config", config.to_json()]
        self._deadline = time.monotonic() + timeout
        self._timeout = timeout
        self._process = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)

    def wait(self) -> dict[str, str]:
        """Until the child is done (blocks: call it from a thread); raises DatapathError
        when it failed or took longer than the timeout (then it is killed). Returns the
        interfaces --acceleration best-effort left to the TC programs, each with why
        (logged here, once)."""
        try:
            stdout, stderr = self._process.communicate(
                timeout=max(0.0, self._deadline - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise DatapathError(f"compiling and attaching took over {self._timeout:.0f}s"
                                ) from exc
        for line in stderr.splitlines():
            if line.strip() and not line.startswith("event=xdp_fallback "):   # said below
                log.info("event=loader_output line=%r", line)
        if self._process.returncode != 0:
            last = stderr.strip().splitlines()[-1:] or [
                f"exit code {self._process.returncode}"]
            raise DatapathError(f"loading the BPF programs failed: {last[0]}")
        results = [json.loads(line[len(RESULT):]) for line in stdout.splitlines()
                   if line.startswith(RESULT)]
        fallback = results[-1]["xdp_fallback"] if results else {}
        for ifname, why in sorted(fallback.items()):
            log.warning("event=xdp_fallback interface=%s xdp=not_attached traffic=tc "
                        "acceleration=best-effort reason=%r", ifname, why)
        return fallback

    def kill(self) -> None:
        """Stop a child still running (the agent gave up) and reap it."""
        if self._process.poll() is None:
            self._process.kill()
        self._process.communicate()


def load_in_child(config: DatapathConfig, cgroup_dir: Path, timeout: float = 300.0
                  ) -> dict[str, str]:
    return LoaderChild(config, cgroup_dir, timeout).wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compile, pin and attach (agent-internal)")
    parser.add_argument("--cgroup", type=Path, required=True)
    parser.add_argument("--config", required=True, help="DatapathConfig as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    config = DatapathConfig.from_json(args.config)
    try:
        loaded = compile_carrying_maps(config)
        # Every program verified and every interface found before the first hook is
        # swapped: the swaps then follow each other at once, and a missing interface
        # stops us with every hook still on the old programs.
        load_all_programs(loaded, config.interfaces)
        carried = migrate.fill(config.pin_dir)      # before any new program runs
        attach_socket_programs(loaded, args.cgroup)
        attach_tc_programs(loaded, config.interfaces)
        fallback = attach_xdp_programs(loaded, config.interfaces)
        migrate.finish(config.pin_dir, carried)     # every hook runs the new programs
        restrict_pins(config.pin_dir)
        print(RESULT + json.dumps({"xdp_fallback": fallback}), flush=True)
    except (DatapathError, migrate.MigrationError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
