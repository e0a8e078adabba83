"""A process that talks gRPC and starts children through fork + preexec_fn (the lab's
Processes, so every test and the bench) must not have gRPC's fork handlers on: they restart
gRPC's poller in the child, which aborts it before exec (seen: 11 of 200 children)."""
from __future__ import annotations

import os
import subprocess
from concurrent import futures

import grpc

import lab.processes  # noqa: F401 -- sets the switch, as for every lab user


def test_children_forked_beside_a_live_grpc_channel_all_start():
    assert os.environ.get("GRPC_ENABLE_FORK_SUPPORT") == "0"
    server = grpc.server(futures.ThreadPoolExecutor(2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
        failed = [done.stderr[-200:] for done in (
            subprocess.run(["true"], preexec_fn=lambda: None, capture_output=True)  # noqa: PLW1509
            for _ in range(200)) if done.returncode != 0]
        assert failed == []
    finally:
        channel.close()
        server.stop(None)
