"""The serving path's own cost: `epdserve up`'s cluster against the same engine in this process,
same requests, same concurrency, alternated round by round.

A ``LocalCluster`` (etcd, one mixed worker, a router: what `epdserve up` starts) and an
``AsyncLLMEngine`` of the same ``EngineConfig`` in this process (OpenMP threads PASSIVE in both,
as `epdserve up` gives its workers) get the same random prompts (token ids, 128 in / 64 out,
ignore_eos, greedy), ``--concurrency`` in flight (a finished request's successor starts at once:
the closed loop of ``vllm bench serve --max-concurrency``). The served side is a bare HTTP client
streaming ``/v1/completions``; the engine side calls ``generate`` directly. Each round runs both,
the order swapped every round, so that a shared machine's load falls on both alike.

Both engines write a step log (``EPDSERVE_STEP_LOG``); for each side it prints output tok/s,
TTFT p50, TPOT p50, ITL p99, and from the steps inside that side's windows: the step count, rows
and tokens a step, step wall and step-thread CPU (medians), and the gap between one step's end and
the next one's start (the time the step thread spends outside steps while work is waiting: the
hand-off of requests and outputs). The ratio served / engine is the serving path's cost
(issue 17: at concurrency 1 the served TPOT within 1.1x of the engine's step).

    .venv/bin/python benchmarks/served_vs_engine.py [--concurrency 16] [--num-prompts 32]
        [--rounds 2] [--engine-arg max_num_batched_tokens=2048 ...] [--keep-logs DIR]

Recorded, not asserted; not in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: as the workers run
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.cli.cluster_spec import ClusterSpec  # noqa: E402
from services.cli.launcher import LocalCluster  # noqa: E402
from services.engine import AsyncLLMEngine, SamplingParams  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=32, help="a round's requests, each side")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--engine-arg", action="append", default=[], metavar="FIELD=VALUE",
                   help="an EngineConfig field for both sides (repeatable)")  # fmt: skip
    p.add_argument("--keep-logs", type=Path, default=None, help="copy the step logs here")
    p.add_argument("--rt", type=int, default=0, metavar="PRIORITY",
                   help="run each timed side with every thread of this process, the router and "
                        "the worker in SCHED_FIFO at this priority (needs CAP_SYS_NICE; keep "
                        "--num-prompts small: it holds the cores for the side's seconds)")  # fmt: skip
    p.add_argument(
        "--pause",
        type=float,
        default=0.0,
        help="seconds between timed sides (with --rt: the machine's other work runs)",
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not 0 <= a.rt <= 99:
        p.error("--rt must be 0-99")
    for name in ("concurrency", "num_prompts", "rounds", "input_len", "output_len"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


def engine_overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# ------------------------------------------------------------------------------- the clients


async def served_one(url: str, model: str, ids: list[int], out_len: int) -> list[float]:
    """Arrival times of each streamed token of one completion (bare HTTP/1.1, no proxy)."""
    p = urlsplit(url)
    body = json.dumps({"model": model, "prompt": ids, "max_tokens": out_len, "temperature": 0,
                       "stream": True, "ignore_eos": True})  # fmt: skip
    t0 = time.perf_counter()
    r, w = await asyncio.wait_for(asyncio.open_connection(p.hostname, p.port), 30)
    w.write((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}").encode())  # fmt: skip
    times = [t0]
    try:
        while True:
            chunk = await asyncio.wait_for(r.read(65536), 120)
            if not chunk:
                break
            now = time.perf_counter()
            times += [now] * min(1, chunk.count(b'"text"'))  # an arrival (see summarize)
    finally:
        w.close()
    return times


async def engine_one(engine: AsyncLLMEngine, rid: str, ids: list[int], out_len: int):
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    times = [time.perf_counter()]
    async for out in engine.generate(rid, ids, params):
        if out.outputs[0].token_ids:
            times.append(time.perf_counter())
    return times


async def closed_loop(make, prompts: list[list[int]], concurrency: int) -> list[list[float]]:
    """Every prompt through ``make(i, ids)``, ``concurrency`` at a time."""
    queue = list(enumerate(prompts))
    results: list[list[float]] = [[] for _ in prompts]

    async def lane() -> None:
        while queue:
            i, ids = queue.pop(0)
            results[i] = await make(i, ids)

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return results


def summarize(results: list[list[float]], wall: float, out_len: int) -> dict[str, float]:
    """As ``vllm bench serve`` counts: ``out_len`` tokens a request (ignore_eos), TPOT from
    the first to the last arrival, ITL between arrivals (an SSE event can carry several
    tokens: the detokenizer holds back an incomplete character)."""
    tokens = out_len * sum(len(t) > 1 for t in results)
    ttft = [t[1] - t[0] for t in results if len(t) > 1]
    tpot = [(t[-1] - t[1]) / (out_len - 1) for t in results if len(t) > 2]
    itl = sorted(b - a for t in results for a, b in zip(t[1:], t[2:], strict=False) if b > a)
    p99 = itl[min(len(itl) - 1, int(0.99 * len(itl)))] if itl else float("nan")
    return {"tok_s": tokens / wall, "ttft_p50_ms": 1e3 * statistics.median(ttft),
            "tpot_p50_ms": 1e3 * statistics.median(tpot), "itl_p99_ms": 1e3 * p99,
            "tokens": tokens}  # fmt: skip


# ------------------------------------------------------------------------------- the step logs


def steps_in(log: Path, windows: list[tuple[float, float]]) -> dict[str, float]:
    """Step-log figures of the steps that ended inside ``windows`` (monotonic clock)."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if any(a <= r["t"] <= b for a, b in windows)]
    if not rows:
        return {}
    gaps = [b["t"] - b["s"] - a["t"] for a, b in zip(rows, rows[1:], strict=False)
            if any(w0 <= a["t"] and b["t"] <= w1 for w0, w1 in windows)]  # fmt: skip
    decode = [r for r in rows if r["on_tokens"] == r["on_decodes"] and r["on_decodes"] > 0]
    full = [r for r in decode if r["on_decodes"] == max(x["on_decodes"] for x in decode)]
    return {
        "steps": len(rows),
        "rows_mean": statistics.mean(r["on_rows"] for r in rows),
        "prefill_steps": sum(r["on_tokens"] > r["on_decodes"] for r in rows),
        "wall_p50_ms": 1e3 * statistics.median(r["s"] for r in rows),
        "cpu_p50_ms": 1e3 * statistics.median(r["cpu"] for r in rows),
        "wall_sum_s": sum(r["s"] for r in rows),
        "cpu_sum_s": sum(r["cpu"] for r in rows),
        "full_decode_wall_p50_ms": 1e3 * statistics.median(r["s"] for r in full) if full else 0,
        "full_decode_cpu_p50_ms": 1e3 * statistics.median(r["cpu"] for r in full) if full else 0,
        "gap_p50_ms": 1e3 * statistics.median(gaps) if gaps else 0.0,
        "gap_sum_s": sum(g for g in gaps if g > 0),
    }


def set_policy(pids: list[int], priority: int) -> None:
    """Every thread of ``pids`` in SCHED_FIFO at ``priority`` (0: back to SCHED_OTHER)."""
    policy = os.SCHED_FIFO if priority else os.SCHED_OTHER
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setscheduler(int(tid), policy, os.sched_param(priority))
            except (ProcessLookupError, PermissionError):
                pass  # a thread that ended; without CAP_SYS_NICE the run is unchanged


def proc_cpu(pid: int) -> float:
    """CPU seconds of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of ``pid``'s threads by name (threads of one name added up)."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # a thread that ended
        name = "main" if tid == str(pid) else stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


async def run(a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    overrides = engine_overrides(a.engine_arg)
    served_log, engine_log = tmp / "served.jsonl", tmp / "engine.jsonl"
    os.environ["EPDSERVE_STEP_LOG"] = str(served_log)  # the worker inherits it
    spec = ClusterSpec(mixed=1, port=0, cluster=f"sve{os.getpid()}", engine_overrides=overrides)
    cluster = LocalCluster(spec)
    cluster.start(progress=lambda m: None)
    os.environ["EPDSERVE_STEP_LOG"] = str(engine_log)
    engine = AsyncLLMEngine(cluster.engine_config())
    try:
        await engine.start()
        model, url = engine.model_name, cluster.base_url
        router, worker = cluster.routers[0].proc.pid, cluster.workers[0].proc.pid
        rng = random.Random(a.seed)

        def fresh(n: int) -> list[list[int]]:
            # NOTE: new prompts for every round: a repeated one would hit the prefix cache.
            return [[rng.randrange(100, 40000) for _ in range(a.input_len)] for _ in range(n)]

        n = [0]

        async def on_engine(i: int, ids: list[int]) -> list[float]:
            n[0] += 1
            return await engine_one(engine, f"e{n[0]}", ids, a.output_len)

        async def on_served(i: int, ids: list[int]) -> list[float]:
            return await served_one(url, model, ids, a.output_len)

        sides = {"served": on_served, "engine": on_engine}
        # Warm-up: one concurrent wave each (the first steps of a fresh engine are slow).
        warm = fresh(a.concurrency)
        for make in sides.values():
            await closed_loop(make, warm, a.concurrency)
        res: dict[str, Any] = {k: {"rounds": [], "windows": [], "cpu": []} for k in sides}
        for r in range(a.rounds):
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]
            prompts = fresh(a.num_prompts)  # the same for both sides (separate caches)
            for side in order:
                await asyncio.sleep(a.pause)
                load = os.getloadavg()[0]
                set_policy([os.getpid(), router, worker], a.rt)
                cpu0 = (proc_cpu(router), proc_cpu(worker), time.process_time())
                threads0 = thread_cpu(worker)
                t0 = time.monotonic()
                got = await closed_loop(sides[side], prompts, a.concurrency)
                t1 = time.monotonic()
                cpu1 = (proc_cpu(router), proc_cpu(worker), time.process_time())
                set_policy([os.getpid(), router, worker], 0)
                threads1 = thread_cpu(worker)
                row: dict[str, Any] = summarize(got, t1 - t0, a.output_len) | {"load": load}
                row["worker_threads"] = {k: v - threads0.get(k, 0.0) for k, v in threads1.items()}
                row["cpu_router_s"], row["cpu_worker_s"], row["cpu_self_s"] = (
                    y - x for x, y in zip(cpu0, cpu1, strict=True)
                )
                res[side]["rounds"].append(row)
                res[side]["windows"].append((t0, t1))
                print(f"round {r} {side}: {row}", file=sys.stderr, flush=True)
        await asyncio.sleep(0.5)  # the last step-log lines
        res["served"]["steps"] = steps_in(served_log, res["served"]["windows"])
        res["engine"]["steps"] = steps_in(engine_log, res["engine"]["windows"])
        return res
    finally:
        set_policy([os.getpid()], 0)
        await engine.shutdown()
        cluster.stop()
        if a.keep_logs is not None:
            a.keep_logs.mkdir(parents=True, exist_ok=True)
            for log in (served_log, engine_log):
                if log.exists():
                    (a.keep_logs / log.name).write_bytes(log.read_bytes())


def report(res: dict[str, Any], a: argparse.Namespace) -> None:
    print(f"\nconcurrency {a.concurrency}, {a.num_prompts} x {a.input_len}/{a.output_len} a side "
          f"a round, {a.rounds} rounds, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"SCHED_FIFO {a.rt or 'off'}")  # fmt: skip
    keys = ["tok_s", "ttft_p50_ms", "tpot_p50_ms", "itl_p99_ms"]
    print("| round | side | output tok/s | TTFT p50 ms | TPOT p50 ms | ITL p99 ms | load |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in range(a.rounds):
        for side in ("served", "engine"):
            row = res[side]["rounds"][r]
            print(f"| {r} | {side} | " + " | ".join(f"{row[k]:.1f}" for k in keys)
                  + f" | {row['load']:.1f} |")  # fmt: skip
    for r in range(a.rounds):
        s, e = res["served"]["rounds"][r], res["engine"]["rounds"][r]
        print(f"round {r} served / engine: " + ", ".join(f"{k} {s[k] / e[k]:.3f}" for k in keys))
    print("\n| step log | " + " | ".join(res["served"]["steps"]) + " |")
    print("|---|" + "---:|" * len(res["served"]["steps"]))
    for side in ("served", "engine"):
        st = res[side]["steps"]
        print(f"| {side} | " + " | ".join(f"{v:.2f}" for v in st.values()) + " |")
    served = res["served"]["rounds"]
    tokens = sum(r["tokens"] for r in served)
    router, worker, client = (1e3 * sum(r[k] for r in served) / tokens
                              for k in ("cpu_router_s", "cpu_worker_s", "cpu_self_s"))  # fmt: skip
    print(f"\nserved side, CPU a token: router {router:.3f} ms, worker (all threads) "
          f"{worker:.3f} ms, client (this process) {client:.3f} ms")  # fmt: skip
    by_thread: dict[str, float] = {}
    for r in served:
        for k, v in r["worker_threads"].items():
            by_thread[k] = by_thread.get(k, 0.0) + v
    print("worker threads, CPU a token: " + ", ".join(
        f"{k} {1e3 * v / tokens:.3f} ms" for k, v in sorted(by_thread.items(), key=lambda x: -x[1])
        if v > 0))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="served-vs-engine-") as tmp:
        res = asyncio.run(run(a, Path(tmp)))
    report(res, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
