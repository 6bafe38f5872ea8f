"""Added latency of the gateway + gRPC hop over calling the engine directly (max_tokens=1).

Starts a local cluster (etcd, one mixed worker, router) and, in this process, an engine with
the same settings; then times the same requests three ways, one at a time:
  engine   AsyncLLMEngine.generate in this process
  grpc     WorkerService.Generate on the worker (no HTTP, no tokenization)
  http     POST /v1/completions on the router (tokenize + route + gRPC + JSON), httpx client
  http_raw the same request from a bare keep-alive HTTP/1.1 client (asyncio streams), so the
           client library's own CPU (httpx: ~0.5-1 ms a request here) is not counted as the
           gateway's
and prints p50/p99 of each and the overhead over ``engine``. Recorded, not asserted.

    python benchmarks/gateway_overhead.py [--model PATH|GGUF] [--requests 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from services.cli.launcher import ClusterSpec, LocalCluster  # noqa: E402
from services.common.grpc_utils import insecure_channel  # noqa: E402
from services.common.proto import worker_pb2 as pb  # noqa: E402
from services.common.proto import worker_pb2_grpc as pb_grpc  # noqa: E402
from services.engine import AsyncLLMEngine, SamplingParams  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def time_engine(engine: AsyncLLMEngine, ids: list[int], n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        async for _ in engine.generate(
            f"direct-{i}", ids, SamplingParams(temperature=0, max_tokens=1)
        ):
            pass
        out.append(time.perf_counter() - t)
    return out


async def time_grpc(address: str, ids: list[int], n: int) -> list[float]:
    out = []
    async with insecure_channel(address) as ch:
        stub = pb_grpc.WorkerServiceStub(ch)
        params = pb.SamplingParams(temperature=0, max_tokens=1)
        for i in range(n):
            t = time.perf_counter()
            req = pb.GenerateRequest(request_id=f"grpc-{i}", prompt_token_ids=ids, params=params)
            async for _ in stub.Generate(req, timeout=60):
                pass
            out.append(time.perf_counter() - t)
    return out


async def time_http(url: str, model: str, prompt: str, n: int) -> list[float]:
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
        for _ in range(n):
            t = time.perf_counter()
            r = await c.post("/v1/completions", json=body)
            r.raise_for_status()
            out.append(time.perf_counter() - t)
    return out


async def time_http_raw(url: str, model: str, prompt: str, n: int) -> list[float]:
    """POST /v1/completions over one keep-alive connection, written and read by hand."""
    parts = urlsplit(url)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0})
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    wire = head.encode() + body.encode()
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    out = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            writer.write(wire)
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            out.append(time.perf_counter() - t)
            if b" 200 " not in status:
                raise RuntimeError(f"HTTP {status!r}")
    finally:
        writer.close()
    return out


async def run(args: argparse.Namespace, cluster: LocalCluster) -> dict[str, object]:
    cfg = cluster.engine_config()
    engine = AsyncLLMEngine(cfg)
    await engine.start()
    ids = list(engine.tokenizer.encode(args.prompt))
    address = cluster.workers[0].ready_field("address")
    warm = max(3, args.requests // 10)
    await time_engine(engine, ids, warm)
    await time_grpc(address, ids, warm)
    await time_http(cluster.base_url, engine.model_name, args.prompt, warm)
    await time_http_raw(cluster.base_url, engine.model_name, args.prompt, warm)
    res = {
        "engine": await time_engine(engine, ids, args.requests),
        "grpc": await time_grpc(address, ids, args.requests),
        "http": await time_http(cluster.base_url, engine.model_name, args.prompt, args.requests),
        "http_raw": await time_http_raw(
            cluster.base_url, engine.model_name, args.prompt, args.requests
        ),
    }
    await engine.shutdown()
    base50, base99 = pct(res["engine"], 0.5), pct(res["engine"], 0.99)
    report: dict[str, object] = {"model": engine.model_name, "prompt_tokens": len(ids),
                                 "requests": args.requests}  # fmt: skip
    for name, vals in res.items():
        p50, p99 = pct(vals, 0.5), pct(vals, 0.99)
        report[name] = {
            "p50_ms": round(p50 * 1000, 2), "p99_ms": round(p99 * 1000, 2),
            "mean_ms": round(statistics.mean(vals) * 1000, 2),
            "added_p50_ms": round((p50 - base50) * 1000, 2),
            "added_p99_ms": round((p99 - base99) * 1000, 2),
        }  # fmt: skip
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded model)")
    p.add_argument("--requests", type=int, default=50)
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
