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
  served      (``--bench-runs N``) N runs of `epdserve bench` (random 128-token prompts,
              --max-tokens out, --concurrency, default 16) at each router, alternated:
              output tok/s, TPOT p50, ITL p99
Router and worker CPU a request are from /proc/<pid>/task/*/schedstat (ns, all threads): less
sensitive to other load than the latencies. Recorded, not asserted.

    python benchmarks/worker_mux.py --model DIR [--requests 300] [--max-tokens 1]
    python benchmarks/worker_mux.py --model DIR --concurrency 16 --rounds 24 --max-tokens 16
    python benchmarks/worker_mux.py --bench-runs 3 --max-tokens 64   (epdserve bench, c16)
    python benchmarks/worker_mux.py --model DIR --pd ...    (a prefill and a decode worker)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.http_client import Meter, RawClient, pct, start_router  # noqa: E402
from services.cli.cluster_spec import ClusterSpec, served_name_of  # noqa: E402
from services.cli.launcher import LocalCluster  # noqa: E402
from services.common.grpc_utils import insecure_channel  # noqa: E402
from services.common.proto import worker_pb2 as pb  # noqa: E402
from services.common.proto import worker_pb2_grpc as pb_grpc  # noqa: E402

VARIANTS = (("call", "--no-worker-mux"), ("mux", "--worker-mux"))
PROMPT = "The capital of France is"


def start_routers(cluster: LocalCluster) -> tuple[dict[str, str], dict[str, subprocess.Popen]]:
    """The two routers, as the cluster starts its own but for the --worker-mux setting."""
    env = dict(os.environ, **cluster.etcd.access.to_env())
    urls, procs = {}, {}
    for name, flag in VARIANTS:
        urls[name], procs[name] = start_router(cluster.router_argv(1), flag, env)
    return urls, procs


def client(url: str, model: str, max_tokens: int, stream: bool) -> RawClient:
    return RawClient(url, {"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                           "temperature": 0, "ignore_eos": True, "stream": stream})  # fmt: skip


def report(meter: Meter, per: int, head: dict[str, object],
           load: list[float]) -> dict[str, object]:  # fmt: skip
    """Each variant's row (``head``'s, with its CPU a request of router and worker), and mux
    over call."""
    out: dict[str, object] = {**head, "load_average": [round(x, 2) for x in load]}
    for k in meter.pids:
        out[k] = {**head.get(k, {}), **meter.cpu_ms(k, per)}  # type: ignore[dict-item]
    for proc in ("router", "worker"):
        out[f"mux_over_call_{proc}_cpu"] = round(
            meter.cpu["mux"][proc] / meter.cpu["call"][proc], 3
        )
    return out


async def serial(args: argparse.Namespace, cluster: LocalCluster, urls: dict[str, str],
                 pids: dict[str, int], wpid: int) -> dict[str, object]:  # fmt: skip
    model = served_name_of(cluster.spec)
    clients = {k: client(u, model, args.max_tokens, args.max_tokens > 1) for k, u in urls.items()}
    for c in clients.values():
        await c.open()
    channel = insecure_channel(cluster.workers[0].ready_field("address"))  # unused with --pd
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

    calls = {"call": clients["call"].one, "mux": clients["mux"].one}
    if not args.pd:
        calls["grpc"] = grpc_call
    names = list(calls)
    # the bare gRPC call (the floor) has no router
    meter = Meter({k: {"worker": wpid, **({"router": pids[k]} if k in pids else {})}
                   for k in names})  # fmt: skip
    for _ in range(30):  # warm-up
        for k, f in calls.items():
            await meter.run(k, f, keep=False)
    load = [os.getloadavg()[0]]
    for r in range(args.requests):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            await meter.run(k, calls[k])
    load.append(os.getloadavg()[0])
    for c in clients.values():
        c.close()
    await channel.close()
    rows: dict[str, dict[str, float]] = {}
    for k in names:
        v = meter.wall[k]
        rows[k] = {"p50_ms": round(pct(v, 0.5) * 1e3, 2), "p99_ms": round(pct(v, 0.99) * 1e3, 2)}
    for k in ("call", "mux") if not args.pd else ():
        rows[k]["added_p50_ms"] = round(rows[k]["p50_ms"] - rows["grpc"]["p50_ms"], 2)
        rows[k]["added_p99_ms"] = round(rows[k]["p99_ms"] - rows["grpc"]["p99_ms"], 2)
    head = {"mode": "serial", "requests": args.requests, "max_tokens": args.max_tokens, **rows}
    return report(meter, args.requests, head, load)


async def concurrent(args: argparse.Namespace, cluster: LocalCluster, urls: dict[str, str],
                     pids: dict[str, int], wpid: int) -> dict[str, object]:  # fmt: skip
    model = served_name_of(cluster.spec)
    clients = {k: [client(u, model, args.max_tokens, True) for _ in range(args.concurrency)]
               for k, u in urls.items()}  # fmt: skip
    for group in clients.values():
        for c in group:
            await c.open()
    rounds = {k: (lambda k=k: asyncio.gather(*(c.one() for c in clients[k]))) for k in clients}
    meter = Meter({k: {"router": pids[k], "worker": wpid} for k in clients})
    for _ in range(2):  # warm-up
        for k in clients:
            await meter.run(k, rounds[k], keep=False)
    names = list(clients)
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            await meter.run(k, rounds[k])
    load.append(os.getloadavg()[0])
    for group in clients.values():
        for c in group:
            c.close()
    rows = {k: {"round_p50_ms": round(pct(meter.wall[k], 0.5) * 1e3, 1)} for k in names}
    head = {"mode": "concurrent", "rounds": args.rounds, "concurrency": args.concurrency,
            "max_tokens": args.max_tokens, **rows}  # fmt: skip
    return report(meter, args.rounds * args.concurrency, head, load)


def served(args: argparse.Namespace, cluster: LocalCluster, urls: dict[str, str],
           pids: dict[str, int], wpid: int) -> dict[str, object]:  # fmt: skip
    """``epdserve bench`` (random 128/64 prompts, --max-concurrency C) against each router,
    alternated run by run: output tok/s, TPOT p50, ITL p99, and CPU a request."""
    names = list(urls)
    meter = Meter({k: {"router": pids[k], "worker": wpid} for k in names})
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in names}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.bench_runs):
            for k in names if r % 2 == 0 else names[::-1]:
                out = Path(tmp) / f"{k}{r}.json"
                argv = [sys.executable, "-m", "services.cli.main", "bench", "--base-url",
                        urls[k], "--num-prompts", str(args.bench_prompts), "--max-concurrency",
                        str(args.concurrency or 16), "--input-len", "128", "--output-len",
                        str(args.max_tokens), "--ignore-eos", "--seed", str(r),
                        "--no-progress", "--result-json", str(out)]  # fmt: skip

                async def one(argv: list[str] = argv) -> None:
                    proc = await asyncio.create_subprocess_exec(
                        *argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                    )
                    await proc.wait()

                asyncio.run(meter.run(k, one))
                got = json.loads(out.read_text())
                rows[k].append({"tok_s": round(got["output_throughput"], 1),
                                "tpot_p50_ms": round(got["median_tpot_ms"], 1),
                                "itl_p99_ms": round(got["p99_itl_ms"], 1),
                                "failed": got["failed"]})  # fmt: skip
    load.append(os.getloadavg()[0])
    per = args.bench_runs * args.bench_prompts
    head: dict[str, object] = {"mode": "served", "runs": args.bench_runs,
                               "prompts": args.bench_prompts,
                               "concurrency": args.concurrency or 16, "max_tokens": args.max_tokens}  # fmt: skip
    for k in names:
        tok = [row["tok_s"] for row in rows[k]]
        head[k] = {"runs": rows[k], "tok_s_mean": round(sum(tok) / len(tok), 1)}
    return report(meter, per, head, load)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded model)")
    p.add_argument("--requests", type=int, default=300, help="serial: requests of each variant")
    p.add_argument("--max-tokens", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=0, help="> 0: concurrent rounds")
    p.add_argument("--rounds", type=int, default=24, help="concurrent: rounds of each variant")
    p.add_argument("--bench-runs", type=int, default=0, help="> 0: this many `epdserve bench` "
                   "runs against each router, alternated (--concurrency, default 16)")  # fmt: skip
    p.add_argument("--bench-prompts", type=int, default=64, help="--bench-runs: prompts a run")
    p.add_argument(
        "--pd",
        action="store_true",
        help="a prefill and a decode worker (the mux "
        "carries Decode; CPU is the decode worker's; serial: no bare gRPC floor)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args()
    roles = {"mixed": 0, "prefill": 1, "decode": 1} if args.pd else {"mixed": 1}
    spec = ClusterSpec(model=args.model, port=0, cluster="worker-mux", **roles)  # type: ignore[arg-type]
    cluster = LocalCluster(spec)
    cluster.start(progress=print)
    procs: dict[str, subprocess.Popen] = {}
    try:
        urls, procs = start_routers(cluster)
        pids = {k: proc.pid for k, proc in procs.items()}
        timed = cluster.worker_roles().index("decode" if args.pd else "mixed")
        wpid = cluster.workers[timed].proc.pid
        time.sleep(3)  # the routers see the worker
        if args.bench_runs > 0:
            result = served(args, cluster, urls, pids, wpid)
        else:
            run = concurrent if args.concurrency > 0 else serial
            result = asyncio.run(run(args, cluster, urls, pids, wpid))
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(30)
        cluster.stop()
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
