"""Generates the gRPC stubs from api/*.proto into agent/api/generated (never hand-written).

Run by `make install`/`make proto`; idempotent, regenerates only when a .proto changed."""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "api"
OUT = Path(__file__).resolve().parent / "generated"


def generate() -> int:
    import grpc_tools
    from grpc_tools import protoc  # imported here: only needed at build time

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    stamp = OUT / ".stamp"
    newest = max(p.stat().st_mtime for p in protos)
    if stamp.exists() and stamp.stat().st_mtime >= newest:
        return 0
    OUT.mkdir(exist_ok=True)
    (OUT / "__init__.py").write_text('"""Generated gRPC stubs; see api/*.proto."""\n')
    include = Path(grpc_tools.__file__).parent / "_proto"
    dirs = sorted({p.parent for p in protos})
    args = ["protoc", *(f"-I{d}" for d in dirs), f"-I{include}", f"--python_out={OUT}",
            f"--grpc_python_out={OUT}", f"--pyi_out={OUT}"] + [str(p) for p in protos]
    rc = protoc.main(args)
    if rc != 0:
        return rc
    # protoc writes top-level imports ("import status_pb2"); make them package-relative.
    for py in OUT.glob("*_pb2*.py"):
        text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", py.read_text(),
                      flags=re.MULTILINE)
        py.write_text(text)
    stamp.touch()
    return 0


if __name__ == "__main__":
    sys.exit(generate())
