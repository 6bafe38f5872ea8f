"""Soak: a local cluster at a fraction of its measured capacity for a long time; counts errors
and watches every process's resident memory.

1. Starts a local cluster (PD by default: 1 prefill + 1 decode, the embedded model).
2. Measures capacity: a closed loop of ``--concurrency`` clients, requests per second.
3. Sends Poisson arrivals at ``--fraction`` of that rate for ``--duration-s`` seconds while
   sampling the RSS of each process (workers, router, etcd) every ``--sample-s`` seconds.
4. Prints errors and RSS growth from the end of the warm-up (``--warmup-s``) to the end;
   passes with zero errors and growth under ``--max-growth`` (5 %).

    .venv/bin/python benchmarks/soak.py --duration-s 1200         # the 20-minute soak
    .venv/bin/python benchmarks/soak.py --duration-s 120 --warmup-s 30   # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.bench.config import BenchConfig  # noqa: E402
from services.bench.runner import load_tokenizer, run_benchmark  # noqa: E402
from services.cli.cluster_spec import ClusterSpec  # noqa: E402
from services.cli.launcher import LocalCluster  # noqa: E402


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def processes(cluster: LocalCluster) -> dict[str, int]:
    procs = {p.name: p.proc.pid for p in [*cluster.workers, *cluster.routers]}
    if cluster.etcd.proc is not None:
        procs["etcd"] = cluster.etcd.proc.pid
    return procs


class MemorySampler(threading.Thread):
    def __init__(self, pids: dict[str, int], every_s: float) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.every_s = every_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._done = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self._done.is_set():
            self.samples.append(
                (time.monotonic() - t0, {n: rss_bytes(p) for n, p in self.pids.items()})
            )
            self._done.wait(self.every_s)

    def stop(self) -> None:
        self._done.set()
        self.join()


def bench(url: str, tokenizer, args, num_prompts: int, rate: float, concurrency: int | None):
    cfg = BenchConfig(
        base_url=url, num_prompts=num_prompts, request_rate=rate, max_concurrency=concurrency,
        input_len=args.input_len, output_len=args.output_len, seed=args.seed,
        progress=False, timeout_s=600.0,
    )  # fmt: skip
    return asyncio.run(run_benchmark(cfg, tokenizer))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: embedded)")
    ap.add_argument("--mixed", type=int, default=0, help="co-located workers instead of PD")
    ap.add_argument("--prefill", type=int, default=1)
    ap.add_argument("--decode", type=int, default=1)
    ap.add_argument("--duration-s", type=float, default=1200.0)
    ap.add_argument("--warmup-s", type=float, default=120.0, help="RSS baseline is taken here")
    ap.add_argument("--fraction", type=float, default=0.7, help="of the measured capacity")
    ap.add_argument("--concurrency", type=int, default=4, help="clients of the capacity probe")
    ap.add_argument("--capacity-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--max-growth", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args()

    pd = not args.mixed
    spec = ClusterSpec(
        model=args.model, mixed=args.mixed, prefill=args.prefill if pd else 0,
        decode=args.decode if pd else 0, port=0, cluster="soak",
    )  # fmt: skip
    cluster = LocalCluster(spec)
    try:
        url = cluster.start(progress=lambda m: print(m, file=sys.stderr))
        tokenizer = load_tokenizer(cluster.spec.model)
        probe = bench(url, tokenizer, args, args.capacity_prompts, float("inf"), args.concurrency)
        capacity = probe.metrics.completed / probe.metrics.duration_s
        rate = args.fraction * capacity
        n = max(1, int(rate * args.duration_s))
        print(f"capacity {capacity:.3f} req/s ({args.concurrency} clients); soaking at "
              f"{rate:.3f} req/s for {args.duration_s:.0f} s ({n} requests)", file=sys.stderr)  # fmt: skip
        sampler = MemorySampler(processes(cluster), args.sample_s)
        sampler.start()
        run = bench(url, tokenizer, args, n, rate, None)
        sampler.stop()
    finally:
        cluster.stop()

    base = next((s for t, s in sampler.samples if t >= args.warmup_s), sampler.samples[0][1])
    end = sampler.samples[-1][1]
    growth = {
        name: (end[name] - base[name]) / base[name] for name in base if base[name] and end[name]
    }
    errors = [r.error for r in run.results if not r.success]
    result = {
        "capacity_rps": capacity,
        "rate_rps": rate,
        "requests": len(run.results),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "duration_s": run.metrics.duration_s,
        "ttft_p90_ms": run.metrics.ttft_ms.p90,
        "tpot_p90_ms": run.metrics.tpot_ms.p90,
        "rss_baseline_mb": {k: v / 2**20 for k, v in base.items()},
        "rss_end_mb": {k: v / 2**20 for k, v in end.items()},
        "rss_growth": growth,
        "max_growth": max(growth.values(), default=0.0),
    }
    ok = not errors and result["max_growth"] < args.max_growth
    result["pass"] = ok
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
