"""The bench's C load generator and server (loadgen.c), built here with the machine's gcc.
build() compiles it once (again only when the source is newer); parse_result() reads a run."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "loadgen.c"
DEFAULT_OUT = SOURCE.parent / "build"
CLIENT_MODES = ("tcp_crr", "tcp_rr", "udp_rr", "udp_crr", "tcp_stream", "udp_flood")
# Every client result has these; tcp_stream has bytes/bits_per_second (and its connections'
# retransmitted segments) instead of the rest,
# udp_flood (one-way, the receiver counts arrivals) what it sent.
COMMON_FIELDS = ("mode", "threads", "errors", "seconds")
RR_FIELDS = ("transactions", "rate", "p50_us", "p90_us", "p99_us", "max_us")
STREAM_FIELDS = ("bytes", "bits_per_second", "retransmits")
FLOOD_FIELDS = ("packets", "rate", "flows")
MODE_FIELDS = {"tcp_stream": STREAM_FIELDS, "udp_flood": FLOOD_FIELDS}


def build(out_dir: Path | None = None) -> Path:
    """Path of the compiled loadgen in out_dir (default bench/loadgen/build/)."""
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_OUT
    binary = out_dir / "loadgen"
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("loadgen: no gcc or cc on PATH; install gcc to build the bench client")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Compile to a private name and rename: concurrent builds never see half a binary.
    partial = out_dir / f".loadgen.{os.getpid()}"
    argv = [gcc, "-O2", "-Wall", "-Wextra", "-o", str(partial), str(SOURCE), "-lpthread"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"loadgen: {' '.join(argv)} failed:\n{done.stderr.strip()}")
    os.replace(partial, binary)
    return binary


def parse_result(stdout: str) -> dict:
    """The JSON result of a client run (its last non-empty stdout line), fields checked."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ValueError("loadgen: the client printed no result")
    result = json.loads(lines[-1])
    wanted = COMMON_FIELDS + MODE_FIELDS.get(result.get("mode"), RR_FIELDS)
    missing = [name for name in wanted if name not in result]
    if missing:
        raise ValueError(f"loadgen: result lacks {missing}: {lines[-1]}")
    return result


def wait_ready(server: subprocess.Popen, timeout: float = 10.0) -> bool:
    """True once a `loadgen server` started with stdout=PIPE (text) has printed "ready"."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([server.stdout], [], [], left)[0]:
            return False
        line = server.stdout.readline()
        if not line:
            return False  # it exited (a port in use: see its stderr)
        if line.strip() == "ready":
            return True
    return False
