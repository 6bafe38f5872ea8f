"""Added latency of the gateway + gRPC hop over calling the engine directly (max_tokens=1).

Starts a local cluster (etcd, one mixed worker, router) and, in this process, an engine with
the same settings; then times the same request four ways, one request at a time:
  engine   AsyncLLMEngine.generate in this process
  grpc     WorkerService.Generate on the worker (no HTTP, no tokenization)
  http     POST /v1/completions on the router (tokenize + route + gRPC + JSON), httpx client
  http_raw the same request from a bare keep-alive HTTP/1.1 client (asyncio streams), so the
           client library's own CPU (httpx: ~0.5-1 ms a request here) is not counted as the
           gateway's
The variants alternate request by request (each round runs one request of each, starting
from a different variant), so that other load on a shared machine falls on all of them
alike. Prints p50/p99 of each, the overhead over ``engine``, and the CPU time the router and
the worker processes spent per request of each variant (all their threads, from
/proc/PID/stat: less sensitive to other load than the latencies). Recorded, not asserted.

    python benchmarks/gateway_overhead.py [--model PATH|GGUF] [--requests 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from services.cli.launcher import ClusterSpec, LocalCluster  # noqa: E402
from services.common.grpc_utils import insecure_channel  # noqa: E402
from services.common.proto import worker_pb2 as pb  # noqa: E402
from services.common.proto import worker_pb2_grpc as pb_grpc  # noqa: E402
from services.engine import AsyncLLMEngine, SamplingParams  # noqa: E402

VARIANTS = ("engine", "grpc", "http", "http_raw")
TICK = os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class RawClient:
    """POST /v1/completions over one keep-alive connection, written and read by hand."""

    def __init__(self, url: str, model: str, prompt: str) -> None:
        self.parts = urlsplit(url)
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0})
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {self.parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.wire = head.encode() + body.encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        host, port = self.parts.hostname, self.parts.port
        self.reader, self.writer = await asyncio.open_connection(host, port)

    async def one(self) -> None:
        assert self.reader is not None and self.writer is not None
        self.writer.write(self.wire)
        status = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await self.reader.readexactly(length)
        if b" 200 " not in status:
            raise RuntimeError(f"HTTP {status!r}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def run(args: argparse.Namespace, cluster: LocalCluster) -> dict[str, object]:
    cfg = cluster.engine_config()
    engine = AsyncLLMEngine(cfg)
    await engine.start()
    ids = list(engine.tokenizer.encode(args.prompt))
    address = cluster.workers[0].ready_field("address")
    body = {"model": engine.model_name, "prompt": args.prompt, "max_tokens": 1, "temperature": 0}
    pids = {"router": cluster.routers[0].proc.pid, "worker": cluster.workers[0].proc.pid}
    raw = RawClient(cluster.base_url, engine.model_name, args.prompt)
    await raw.open()
    counter = iter(range(10**9))

    async def direct() -> None:
        params = SamplingParams(temperature=0, max_tokens=1)
        async for _ in engine.generate(f"direct-{next(counter)}", ids, params):
            pass

    async with (
        insecure_channel(address) as channel,
        httpx.AsyncClient(base_url=cluster.base_url, timeout=60) as client,
    ):
        stub = pb_grpc.WorkerServiceStub(channel)
        params = pb.SamplingParams(temperature=0, max_tokens=1)

        async def grpc_call() -> None:
            req = pb.GenerateRequest(
                request_id=f"grpc-{next(counter)}", prompt_token_ids=ids, params=params
            )
            async for _ in stub.Generate(req, timeout=60):
                pass

        async def http() -> None:
            (await client.post("/v1/completions", json=body)).raise_for_status()

        calls: dict[str, Callable[[], Awaitable[None]]] = {
            "engine": direct, "grpc": grpc_call, "http": http, "http_raw": raw.one,
        }  # fmt: skip
        lat: dict[str, list[float]] = {k: [] for k in VARIANTS}
        cpu = {k: dict.fromkeys(pids, 0.0) for k in VARIANTS}
        warm = max(3, args.requests // 10)
        for i in range(warm + args.requests):
            for j in range(len(VARIANTS)):
                name = VARIANTS[(i + j) % len(VARIANTS)]
                before = {p: cpu_s(pid) for p, pid in pids.items()}
                t = time.perf_counter()
                await calls[name]()
                elapsed = time.perf_counter() - t
                if i >= warm:
                    lat[name].append(elapsed)
                    for p, pid in pids.items():
                        cpu[name][p] += cpu_s(pid) - before[p]
    raw.close()
    await engine.shutdown()
    base50, base99 = pct(lat["engine"], 0.5), pct(lat["engine"], 0.99)
    report: dict[str, object] = {"model": engine.model_name, "prompt_tokens": len(ids),
                                 "requests": args.requests,
                                 "load_average": round(os.getloadavg()[0], 2)}  # fmt: skip
    for name, vals in lat.items():
        p50, p99 = pct(vals, 0.5), pct(vals, 0.99)
        report[name] = {
            "p50_ms": round(p50 * 1000, 2), "p99_ms": round(p99 * 1000, 2),
            "mean_ms": round(statistics.mean(vals) * 1000, 2),
            "added_p50_ms": round((p50 - base50) * 1000, 2),
            "added_p99_ms": round((p99 - base99) * 1000, 2),
            **{f"{p}_cpu_ms": round(s * 1000 / len(vals), 3) for p, s in cpu[name].items()},
        }  # fmt: skip
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded model)")
    p.add_argument("--requests", type=int, default=50, help="requests of each variant")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args()
    cluster = LocalCluster(ClusterSpec(model=args.model, mixed=1, port=0, device=args.device,
                                       cluster="bench"))  # fmt: skip
    try:
        cluster.start(progress=lambda m: print(m, file=sys.stderr))
        report = asyncio.run(run(args, cluster))
    finally:
        cluster.stop()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
