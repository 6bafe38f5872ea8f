"""Added latency of the gateway + gRPC hop over calling the engine directly (max_tokens=1).

Starts a local cluster (etcd, one mixed worker, router) and, in this process, an engine with
the same settings; then times the same request four ways, one request at a time:
  engine   AsyncLLMEngine.generate in this process
  grpc     WorkerService.Generate on the worker (no HTTP, no tokenization)
  http     POST /v1/completions on the router (tokenize + route + gRPC + JSON), httpx client
  http_raw the same request from a bare keep-alive HTTP/1.1 client (asyncio streams), so the
           client library's own CPU (httpx: ~0.5-1 ms a request here) is not counted as the
           gateway's
The variants alternate request by request (each round runs one request of each, in an order
of its own: a fixed rotation always ran http_raw right after the httpx arm, whose client CPU
showed as ~0.5 ms on http_raw's p50 against the arm after it), so that other load on a shared
machine falls on all of them alike. Prints p50/p99 of each, the overhead over ``engine``, and
the CPU time the router and the worker processes spent per request of each variant (all their
threads, from /proc/PID/task/*/schedstat: less sensitive to other load than the latencies);
``router_net_cpu_ms`` less each router's background work (its CPU during the engine arm,
which uses no router: ``router_idle_cpu_pct``). The engine arm runs as the worker runs its
engine: on uvloop, with the workers' OpenMP wait policy. Recorded, not asserted.

    python benchmarks/gateway_overhead.py [--model PATH|GGUF] [--requests 50] [--json out.json]
        [--worker-mux default|on|off|ab]   (ab: adds http_raw_mux, a second router with it on)
        [--ab-tree DIR]   (adds http_raw_tree: a second router running DIR's code, e.g. a git
                           worktree of the commit before a router change, same worker)
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.common.grpc_io import use_poller_io  # noqa: E402

# The grpc arm's client runs gRPC's I/O as the router does (common/grpc_io.py).
use_poller_io()

import httpx  # noqa: E402

from benchmarks.http_client import Meter, RawClient, emit, pct, start_router  # noqa: E402
from services.cli.cluster_spec import ClusterSpec  # noqa: E402
from services.cli.launcher import WORKER_ENV_DEFAULTS, LocalCluster  # noqa: E402
from services.common import event_loop  # noqa: E402
from services.common.grpc_utils import insecure_channel  # noqa: E402
from services.common.proto import worker_pb2 as pb  # noqa: E402
from services.common.proto import worker_pb2_grpc as pb_grpc  # noqa: E402

# The in-process engine runs as the worker's does, or ``engine`` is no baseline: the worker's
# OpenMP threads sleep between parallel regions (launcher.py), this process's spun by default,
# and its step was faster than any worker's (1.87 ms here against 3.07 ms in the worker, load
# 12; 2.85 ms here with the workers' policy). Set before torch is imported; the workers
# inherit it as they would have got it.
os.environ.update(WORKER_ENV_DEFAULTS)
from services.engine import AsyncLLMEngine, SamplingParams  # noqa: E402

VARIANTS = ("engine", "grpc", "http", "http_raw")


async def run(args: argparse.Namespace, cluster: LocalCluster,
              extra: dict[str, tuple[str, int]]) -> dict[str, object]:  # fmt: skip
    """``extra``: more http_raw variants, each through a router of its own (URL, pid)."""
    cfg = cluster.engine_config()
    engine = AsyncLLMEngine(cfg)
    await engine.start()
    ids = list(engine.tokenizer.encode(args.prompt))
    address = cluster.workers[0].ready_field("address")
    body = {"model": engine.model_name, "prompt": args.prompt, "max_tokens": 1, "temperature": 0}
    pids = {"router": cluster.routers[0].proc.pid, "worker": cluster.workers[0].proc.pid}
    raw = RawClient(cluster.base_url, body)
    await raw.open()
    variants = list(VARIANTS)
    timed = dict.fromkeys(variants, pids)
    others: dict[str, RawClient] = {}
    # The engine arm uses no router: what each router spends in its windows is background
    # work (health, load reports, the rebalancer's leader): router_net_cpu_ms leaves it out.
    timed["engine"] = dict(pids)
    for name, (url, pid) in extra.items():  # http_raw through another router
        others[name] = RawClient(url, body)
        await others[name].open()
        variants.append(name)
        timed[name] = {"router": pid, "worker": pids["worker"]}
        timed["engine"][f"router_{name}"] = pid
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
        calls.update({name: other.one for name, other in others.items()})
        meter = Meter(timed)
        warm = max(3, args.requests // 10)
        order = random.Random(0)  # the same orders every run
        for i in range(warm + args.requests):
            for name in order.sample(variants, len(variants)):
                await meter.run(name, calls[name], keep=i >= warm)
    for client in (raw, *others.values()):
        client.close()
    await engine.shutdown()
    lat = meter.wall
    base50, base99 = pct(lat["engine"], 0.5), pct(lat["engine"], 0.99)
    report: dict[str, object] = {"model": engine.model_name, "prompt_tokens": len(ids),
                                 "requests": args.requests, "worker_mux": args.worker_mux,
                                 "load_average": round(os.getloadavg()[0], 2)}  # fmt: skip
    idle = {k: v / sum(lat["engine"]) for k, v in meter.cpu["engine"].items()}  # CPU s a s
    report["router_idle_cpu_pct"] = {k: round(v * 100, 2) for k, v in idle.items() if k != "worker"}
    for name, vals in lat.items():
        p50, p99 = pct(vals, 0.5), pct(vals, 0.99)
        router = "router" if name in VARIANTS else f"router_{name}"
        busy = meter.cpu[name].get("router", 0.0) - idle[router] * sum(vals)
        report[name] = {
            "p50_ms": round(p50 * 1000, 2), "p99_ms": round(p99 * 1000, 2),
            "mean_ms": round(statistics.mean(vals) * 1000, 2),
            "added_p50_ms": round((p50 - base50) * 1000, 2),
            "added_p99_ms": round((p99 - base99) * 1000, 2),
            **meter.cpu_ms(name, len(vals)),
            "router_net_cpu_ms": round(busy * 1e3 / len(vals), 3),
        }  # fmt: skip
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded model)")
    p.add_argument("--requests", type=int, default=50, help="requests of each variant")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.add_argument("--worker-mux", choices=("default", "on", "off", "ab"), default="default",
                   help="the router's RouterConfig.worker_mux; ab: the router with it off, "
                   "and http_raw_mux through a second router with it on, alternated")  # fmt: skip
    p.add_argument("--ab-tree", default=None, help="a checkout (git worktree) whose router "
                   "code http_raw_tree runs, alternated with this tree's (http_raw)")  # fmt: skip
    args = p.parse_args()
    overrides = {} if args.worker_mux in ("default",) else {"worker_mux": args.worker_mux == "on"}
    cluster = LocalCluster(ClusterSpec(model=args.model, mixed=1, port=0, device=args.device,
                                       cluster="bench", router_overrides=overrides))  # fmt: skip
    routers: dict[str, subprocess.Popen] = {}
    try:
        cluster.start(progress=lambda m: print(m, file=sys.stderr))
        env = dict(os.environ, **cluster.etcd.access.to_env())
        urls: dict[str, str] = {}
        if args.worker_mux == "ab":
            urls["http_raw_mux"], routers["http_raw_mux"] = start_router(
                cluster.router_argv(1), "--worker-mux", env
            )
        if args.ab_tree:
            flag = {"on": "--worker-mux", "off": "--no-worker-mux"}.get(args.worker_mux, "")
            urls["http_raw_tree"], routers["http_raw_tree"] = start_router(
                cluster.router_argv(2), flag, env, tree=str(Path(args.ab_tree).resolve())
            )
        if routers:
            time.sleep(3)  # they see the worker
        extra = {name: (urls[name], proc.pid) for name, proc in routers.items()}
        report = event_loop.run(run(args, cluster, extra))  # uvloop, as the worker's
    finally:
        for proc in routers.values():
            proc.terminate()
            proc.wait(30)
        cluster.stop()
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
