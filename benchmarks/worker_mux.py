"""Router <-> worker calls: a gRPC call per request (``--no-worker-mux``) against one shared
GenerateMux stream per worker (``--worker-mux``), two routers of this tree on one worker.

Starts a local cluster (etcd, one mixed worker, its router) and two more routers from the
same code, one with each setting, then times the same /v1/completions request through each
from a bare keep-alive HTTP/1.1 client, plus the bare gRPC Generate call to the worker as
the floor:
  serial      (default) one request at a time, variants alternated request by request from
              a rotating start; p50/p99 and the added latency over the bare call
  concurrent  (``--concurrency C``) rounds of C concurrent streamed requests, alternated
              round by round
Router and worker CPU a request are from /proc/<pid>/task/*/schedstat (ns, all threads): less
sensitive to other load than the latencies. Recorded, not asserted.

    python benchmarks/worker_mux.py --model DIR [--requests 300] [--max-tokens 1]
    python benchmarks/worker_mux.py --model DIR --concurrency 16 --rounds 24 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.cli.launcher import ClusterSpec, LocalCluster, served_name_of  # noqa: E402
from services.common.grpc_utils import insecure_channel  # noqa: E402
from services.common.proto import worker_pb2 as pb  # noqa: E402
from services.common.proto import worker_pb2_grpc as pb_grpc  # noqa: E402

VARIANTS = (("call", "--no-worker-mux"), ("mux", "--worker-mux"))
PROMPT = "The capital of France is"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def cpu_s(pid: int) -> float:
    """On-CPU seconds of every thread of ``pid`` so far (schedstat: ns precision)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:  # a thread that ended meanwhile
            pass
    return total / 1e9


class RawClient:
    """POST /v1/completions over one keep-alive connection, written and read by hand."""

    def __init__(self, url: str, model: str, max_tokens: int, stream: bool) -> None:
        self.parts = urlsplit(url)
        body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                           "temperature": 0, "ignore_eos": True, "stream": stream})  # fmt: skip
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {self.parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.wire = head.encode() + body.encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            self.parts.hostname, self.parts.port
        )

    async def one(self) -> None:
        assert self.reader is not None and self.writer is not None
        self.writer.write(self.wire)
        status = await asyncio.wait_for(self.reader.readline(), 60)
        length, chunked = None, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            if name.strip().lower() == b"transfer-encoding" and b"chunked" in value:
                chunked = True
        if length is not None:
            await self.reader.readexactly(length)
        elif chunked:
            while size := int((await self.reader.readline()).strip(), 16):
                await self.reader.readexactly(size + 2)
            await self.reader.readexactly(2)
        if b" 200 " not in status:
            raise RuntimeError(f"HTTP {status!r}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def start_routers(cluster: LocalCluster) -> tuple[dict[str, str], dict[str, subprocess.Popen]]:
    """The two routers, as the cluster starts its own but for the --worker-mux setting."""
    argv = cluster.router_argv(1)
    args = [a for a in argv[argv.index("-m") :] if a not in ("--worker-mux", "--no-worker-mux")]
    args[args.index("--port") + 1] = "0"
    env = dict(os.environ, **cluster.etcd.access.to_env())
    urls, procs = {}, {}
    for name, flag in VARIANTS:
        proc = subprocess.Popen([sys.executable, *args, flag], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=env)  # fmt: skip
        procs[name] = proc
        assert proc.stdout is not None
        while "READY" not in (line := proc.stdout.readline()):
            if not line:
                raise RuntimeError(f"router {name} ended before it was ready")
        urls[name] = line.split("url=")[1].strip()
    return urls, procs


async def serial(args: argparse.Namespace, cluster: LocalCluster, urls: dict[str, str],
                 pids: dict[str, int], wpid: int) -> dict[str, object]:  # fmt: skip
    model = served_name_of(cluster.spec)
    clients = {k: RawClient(u, model, args.max_tokens, args.max_tokens > 1)
               for k, u in urls.items()}  # fmt: skip
    for c in clients.values():
        await c.open()
    channel = insecure_channel(cluster.workers[0].ready_field("address"))
    stub = pb_grpc.WorkerServiceStub(channel)
    params = pb.SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    ids = list(range(500, 505))
    count = 0

    async def grpc_call() -> None:
        nonlocal count
        count += 1
        req = pb.GenerateRequest(request_id=f"g{count}", prompt_token_ids=ids, params=params)
        async for _ in stub.Generate(req, timeout=60):
            pass

    calls = {"call": clients["call"].one, "mux": clients["mux"].one, "grpc": grpc_call}
    for _ in range(30):  # warm-up
        for f in calls.values():
            await f()
    lat: dict[str, list[float]] = {k: [] for k in calls}
    rcpu = dict.fromkeys(calls, 0.0)
    wcpu = dict.fromkeys(calls, 0.0)
    names = list(calls)
    load = [os.getloadavg()[0]]
    for r in range(args.requests):
        for k in names[r % 3 :] + names[: r % 3]:
            r0 = cpu_s(pids[k]) if k in pids else 0.0
            w0 = cpu_s(wpid)
            t = time.perf_counter()
            await calls[k]()
            lat[k].append(time.perf_counter() - t)
            wcpu[k] += cpu_s(wpid) - w0
            if k in pids:
                rcpu[k] += cpu_s(pids[k]) - r0
    load.append(os.getloadavg()[0])
    for c in clients.values():
        c.close()
    await channel.close()
    n = args.requests
    out: dict[str, object] = {"mode": "serial", "requests": n, "max_tokens": args.max_tokens,
                              "load_average": [round(x, 2) for x in load]}  # fmt: skip
    for k, v in lat.items():
        row = {"p50_ms": round(pct(v, 0.5) * 1e3, 2), "p99_ms": round(pct(v, 0.99) * 1e3, 2),
               "worker_cpu_ms": round(wcpu[k] * 1e3 / n, 3)}  # fmt: skip
        if k in pids:
            row["router_cpu_ms"] = round(rcpu[k] * 1e3 / n, 3)
            row["added_p50_ms"] = round(row["p50_ms"] - pct(lat["grpc"], 0.5) * 1e3, 2)
            row["added_p99_ms"] = round(row["p99_ms"] - pct(lat["grpc"], 0.99) * 1e3, 2)
        out[k] = row
    out["mux_over_call_router_cpu"] = round(rcpu["mux"] / rcpu["call"], 3)
    out["mux_over_call_worker_cpu"] = round(wcpu["mux"] / wcpu["call"], 3)
    return out


async def concurrent(args: argparse.Namespace, cluster: LocalCluster, urls: dict[str, str],
                     pids: dict[str, int], wpid: int) -> dict[str, object]:  # fmt: skip
    model = served_name_of(cluster.spec)
    clients = {k: [RawClient(u, model, args.max_tokens, True)
                   for _ in range(args.concurrency)] for k, u in urls.items()}  # fmt: skip
    for group in clients.values():
        for c in group:
            await c.open()

    async def one_round(k: str) -> None:
        await asyncio.gather(*(c.one() for c in clients[k]))

    for _ in range(2):  # warm-up
        for k in clients:
            await one_round(k)
    wall: dict[str, list[float]] = {k: [] for k in clients}
    rcpu = dict.fromkeys(clients, 0.0)
    wcpu = dict.fromkeys(clients, 0.0)
    names = list(clients)
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            r0, w0 = cpu_s(pids[k]), cpu_s(wpid)
            t = time.perf_counter()
            await one_round(k)
            wall[k].append(time.perf_counter() - t)
            rcpu[k] += cpu_s(pids[k]) - r0
            wcpu[k] += cpu_s(wpid) - w0
    load.append(os.getloadavg()[0])
    for group in clients.values():
        for c in group:
            c.close()
    n = args.rounds * args.concurrency
    out: dict[str, object] = {"mode": "concurrent", "rounds": args.rounds,
                              "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                              "load_average": [round(x, 2) for x in load]}  # fmt: skip
    for k in names:
        out[k] = {"round_p50_ms": round(pct(wall[k], 0.5) * 1e3, 1),
                  "router_cpu_ms": round(rcpu[k] * 1e3 / n, 3),
                  "worker_cpu_ms": round(wcpu[k] * 1e3 / n, 3)}  # fmt: skip
    out["mux_over_call_router_cpu"] = round(rcpu["mux"] / rcpu["call"], 3)
    out["mux_over_call_worker_cpu"] = round(wcpu["mux"] / wcpu["call"], 3)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded model)")
    p.add_argument("--requests", type=int, default=300, help="serial: requests of each variant")
    p.add_argument("--max-tokens", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=0, help="> 0: concurrent rounds")
    p.add_argument("--rounds", type=int, default=24, help="concurrent: rounds of each variant")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args()
    cluster = LocalCluster(ClusterSpec(model=args.model, mixed=1, port=0, cluster="worker-mux"))
    cluster.start(progress=print)
    procs: dict[str, subprocess.Popen] = {}
    try:
        urls, procs = start_routers(cluster)
        pids = {k: proc.pid for k, proc in procs.items()}
        wpid = cluster.workers[0].proc.pid
        time.sleep(3)  # the routers see the worker
        run = concurrent if args.concurrency > 0 else serial
        report = asyncio.run(run(args, cluster, urls, pids, wpid))
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(30)
        cluster.stop()
    text = json.dumps(report, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
