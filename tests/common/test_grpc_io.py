"""The serving processes run gRPC's I/O on grpc.aio's poller thread, not on the EventEngine's
threads (services/common/grpc_io.py): the setting takes effect with this grpcio, each
service's entry point makes it before anything imports grpc, and an operator's own stands."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from services.common.grpc_io import ENV, POLLER_IO, use_poller_io

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = ["router", "worker", "prefill", "decode", "encoder", "kvstore"]

# A grpc.aio echo server and client in one process, after use_poller_io(): how many times the
# EventEngine's threads went to sleep per call (~6 with the EventEngine doing the I/O).
ECHO = """
import asyncio, os, sys
from services.common.grpc_io import use_poller_io
assert use_poller_io()
import grpc

def switches():
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            if open(f"/proc/self/task/{tid}/comm").read().strip() != "event_engine":
                continue
            status = open(f"/proc/self/task/{tid}/status").read()
        except OSError:
            continue
        n += int(status.split("\\nvoluntary_ctxt_switches:")[1].split()[0])
    return n

async def main():
    async def echo(request, context):
        return request
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "t.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/t.Echo/Echo")
        for _ in range(20):
            await call(b"x", timeout=10)
        before = switches()
        for _ in range(200):
            await call(b"x", timeout=10)
        print((switches() - before) / 200)
    await server.stop(None)

asyncio.run(main())
"""


def test_grpc_io_runs_on_the_aio_poller_thread() -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", ECHO], env=env, capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    per_call = float(out.stdout.split()[-1])
    assert per_call < 1.0, f"the EventEngine's threads woke {per_call} times a call"


def test_an_operators_setting_stands() -> None:
    env = {ENV: "-event_engine_dns"}
    assert not use_poller_io(env)
    assert env == {ENV: "-event_engine_dns"}
    env = {}
    use_poller_io(env)
    assert env == {ENV: POLLER_IO}


def test_each_entry_point_sets_it_before_importing_anything_else() -> None:
    for name in ENTRY_POINTS:
        tree = ast.parse((ROOT / "services" / name / "__main__.py").read_text())
        body = [n for n in tree.body if not isinstance(n, ast.Expr) or not isinstance(
            n.value, ast.Constant)]  # fmt: skip
        imports = [n for n in body if isinstance(n, ast.ImportFrom | ast.Import)]
        first_services = next(n for n in imports if getattr(n, "module", "") != "__future__"
                              and any(a.name != "sys" for a in n.names))  # fmt: skip
        assert getattr(first_services, "module", "") == "services.common.grpc_io", name
        call = body[body.index(first_services) + 1]
        assert isinstance(call, ast.Expr) and ast.unparse(call) == "use_poller_io()", name
