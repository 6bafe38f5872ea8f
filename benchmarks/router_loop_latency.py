"""Latency the router's event loop adds to small streaming requests while costly requests
arrive: 1 MB prompts (tokenized by the real default tokenizer) and large JSON schemas (each
one new, so its grammar really compiles).

One process runs the router (a Gateway on uvicorn, the real tokenizer) and the clients; the
fake workers (FakeEngine, one token every --step-ms) run in a child process, so that their
work is not counted in the router's loop. Small clients loop over streaming chat requests
(a short message through the chat template, --tokens tokens each) and record the time to the
first token and every gap between two chunks; a fake worker sends a token every --step-ms,
so anything above that is latency added on the way. Each scenario runs --seconds:

  idle      small clients only
  prompts   plus one client sending 1 MB chat prompts back to back (max_tokens 1)
  grammars  plus one client sending chat requests with a new ~180 KB JSON schema each
  both      both heavy clients

Recorded, not asserted. Run the same script from another tree to compare (it imports the
``services`` package of the tree it lies in):

    python benchmarks/router_loop_latency.py [--seconds 20] [--inline-below N] [--json out]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import string
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "router"))

import httpx  # noqa: E402

MODEL = "fake-model"
SCENARIOS = ("idle", "prompts", "grammars", "both")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")


# -- Fake workers, in a child process ---------------------------------------------------------


async def serve_workers(etcd: str, cluster: str, count: int, step_ms: float) -> None:
    from router_fakes import FakeEngine, start_fake_worker

    workers = []
    for i in range(count):
        engine = FakeEngine(max_model_len=2_000_000, step_s=step_ms / 1000)
        workers.append(await start_fake_worker(etcd, cluster, f"w{i}", engine=engine))
    print("WORKERS_READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until closed
    for w in workers:
        await w.stop()


# -- Load ---------------------------------------------------------------------------------------


def big_text(chars: int, seed: int) -> str:
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(5000)]
    out, size = [], 0
    while size < chars:
        w = rng.choice(words)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


def big_schema(props: int, salt: str) -> dict[str, object]:
    """A JSON schema of ``props`` object properties, each with a pattern, bounds and an enum;
    ``salt`` makes its text (the grammar cache's key) new."""
    fields = {
        f"f_{salt}_{i}": {
            "type": "object",
            "properties": {
                "a": {"type": "string", "pattern": "^[a-z]{1,8}[0-9]{2,4}$"},
                "b": {"type": "integer", "minimum": 0, "maximum": 1000 + i},
                "c": {
                    "type": "array",
                    "items": {"type": "string", "enum": [f"v{i}_{k}" for k in range(10)]},
                },
            },
            "required": ["a", "b", "c"],
        }  # fmt: skip
        for i in range(props)
    }
    return {"type": "object", "properties": fields, "required": list(fields)}


async def small_client(
    c: httpx.AsyncClient, tokens: int, stop_at: float, ttft: list[float], gaps: list[float],
    errors: list[str],
) -> None:  # fmt: skip
    rng = random.Random(id(c))
    while time.perf_counter() < stop_at:
        text = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(40))
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}],
                "max_tokens": tokens, "stream": True}  # fmt: skip
        start = time.perf_counter()
        last = None
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                errors.append(f"small {r.status_code}")
                await r.aread()
                continue
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if '"content"' not in line or '"content":""' in line:
                    continue  # the role chunk, the final empty chunk
                now = time.perf_counter()
                if last is None:
                    ttft.append(now - start)
                else:
                    gaps.append(now - last)
                last = now


def heavy_body(kind: str, prompt: str) -> bytes:
    """A 1 MB prompt, or a short one with a new 500-property schema, encoded (in a thread:
    the client's own work is not the router's)."""
    body: dict[str, object] = {"model": MODEL, "max_tokens": 1,
                               "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
    if kind == "grammars":
        schema = big_schema(500, f"{os.getpid()}x{time.time_ns()}")
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "big", "schema": schema}}  # fmt: skip
    return json.dumps(body).encode()


async def heavy_client(
    c: httpx.AsyncClient, kind: str, prompt: str, stop_at: float, done: list[float],
    errors: list[str],
) -> None:  # fmt: skip
    headers = {"content-type": "application/json"}
    while time.perf_counter() < stop_at:
        content = await asyncio.to_thread(heavy_body, kind, prompt)
        start = time.perf_counter()
        r = await c.post("/v1/chat/completions", content=content, headers=headers)
        if r.status_code != 200:
            errors.append(f"{kind} {r.status_code}: {r.text[:200]}")
            await asyncio.sleep(0.5)
            continue
        done.append(time.perf_counter() - start)


async def run_scenario(
    url: str, scenario: str, args: argparse.Namespace, prompt: str
) -> dict[str, object]:
    ttft: list[float] = []
    gaps: list[float] = []
    errors: list[str] = []
    heavy: dict[str, list[float]] = {"prompts": [], "grammars": []}
    kinds = [k for k in ("prompts", "grammars") if scenario in (k, "both")]
    # NOTE: clients are made before the clock starts (each builds an SSL context: ~0.1 s).
    clients = [httpx.AsyncClient(base_url=url, timeout=300)
               for _ in range(args.small_clients + len(kinds))]  # fmt: skip
    stop_at = time.perf_counter() + args.seconds
    tasks = [
        asyncio.create_task(small_client(c, args.tokens, stop_at, ttft, gaps, errors))
        for c in clients[: args.small_clients]
    ]
    for c, kind in zip(clients[args.small_clients :], kinds, strict=True):
        text = prompt if kind == "prompts" else "Give the JSON."
        tasks.append(asyncio.create_task(heavy_client(c, kind, text, stop_at, heavy[kind], errors)))
    await asyncio.gather(*tasks)
    for c in clients:
        await c.aclose()
    step = args.step_ms / 1000
    ms = 1000.0
    return {
        "scenario": scenario,
        "small_requests": len(ttft),
        "ttft_p50_ms": pct(ttft, 0.5) * ms,
        "ttft_p99_ms": pct(ttft, 0.99) * ms,
        "gap_p50_ms": pct(gaps, 0.5) * ms,
        "gap_p99_ms": pct(gaps, 0.99) * ms,
        "gap_max_ms": max(gaps) * ms if gaps else float("nan"),
        "added_gap_p99_ms": (pct(gaps, 0.99) - step) * ms,
        "gaps": len(gaps),
        "big_prompts_done": len(heavy["prompts"]),
        "big_prompt_mean_s": statistics.mean(heavy["prompts"]) if heavy["prompts"] else None,
        "grammars_done": len(heavy["grammars"]),
        "grammar_mean_s": statistics.mean(heavy["grammars"]) if heavy["grammars"] else None,
        "errors": errors[:5],
        "error_count": len(errors),
    }


async def threshold_micro(rounds: int) -> list[dict[str, object]]:
    """Per call: the chat template / encode of inputs of a few sizes, inline on the loop vs
    through the preparation pool (what the inline threshold trades)."""
    from services.router.offload import Offload
    from services.router.tokenization import Tokenizer

    tokenizer = await asyncio.to_thread(Tokenizer.load, None)
    pool = Offload(4, inline_below=0)  # everything through the threads
    out = []
    for chars in (200, 1000, 4000, 16000):
        text = big_text(chars, 1)[:chars]
        msgs = [{"role": "user", "content": text}]
        for what, fn, arg in (("template", tokenizer.apply_chat_template, msgs),
                              ("encode", tokenizer.encode, text)):  # fmt: skip
            row: dict[str, object] = {"what": what, "chars": chars}
            for mode in ("inline", "pool"):
                times = []
                for _ in range(rounds):
                    t = time.perf_counter()
                    if mode == "inline":
                        fn(arg)
                    else:
                        await pool.run(None, fn, arg)
                    times.append(time.perf_counter() - t)
                row[f"{mode}_p50_us"] = pct(times, 0.5) * 1e6
                row[f"{mode}_p99_us"] = pct(times, 0.99) * 1e6
            print(json.dumps(row), flush=True)
            out.append(row)
    pool.close()
    return out


async def main_async(args: argparse.Namespace) -> list[dict[str, object]]:
    from router_fakes import start_gateway

    from services.common.etcd_server import EtcdServer
    from services.router.tokenization import Tokenizer

    tokenizer = await asyncio.to_thread(Tokenizer.load, None)
    with EtcdServer() as etcd:
        cluster = "loopbench"
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve-workers", etcd.endpoint, cluster,
             "--workers", str(args.workers), "--step-ms", str(args.step_ms)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert child.stdout is not None
            line = await asyncio.to_thread(child.stdout.readline)
            if "WORKERS_READY" not in line:
                raise RuntimeError(f"fake workers did not start: {line!r}")
            gw = await start_gateway(
                etcd.endpoint, cluster, tokenizer=tokenizer, policy="least_load",
                max_queued_tokens=10_000_000, request_timeout_s=300, load_stale_s=30.0,
                stall_timeout_s=300.0,
            )  # fmt: skip
            offload = getattr(gw.gateway, "offload", None)
            if offload is not None and args.inline_below is not None:
                offload.inline_below = args.inline_below
            async with httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
                for _ in range(400):
                    if (await c.get("/health")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
            # Warm-up: the chat template's compile and llguidance's first use.
            warm = argparse.Namespace(**{**vars(args), "seconds": 3})
            await run_scenario(gw.url, "grammars", warm, "")
            prompt = big_text(1_000_000, 0)
            results = []
            for scenario in args.scenarios:
                res = await run_scenario(gw.url, scenario, args, prompt)
                res["load_avg_1m"] = os.getloadavg()[0]
                print(json.dumps(res), flush=True)
                results.append(res)
            await gw.stop()
            return results
        finally:
            assert child.stdin is not None
            child.stdin.close()
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each scenario")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--small-clients", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=40, help="tokens of each small request")
    parser.add_argument("--step-ms", type=float, default=10.0, help="fake worker's token period")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--inline-below", type=int, default=None,
                        help="override the router's inline threshold (new code only)")  # fmt: skip
    parser.add_argument(
        "--threshold",
        action="store_true",
        help="only time small inputs inline vs on the pool (the inline threshold)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--serve-workers", nargs=2, metavar=("ETCD", "CLUSTER"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.serve_workers:
        asyncio.run(serve_workers(*args.serve_workers, args.workers, args.step_ms))
        return
    if args.threshold:
        rows = asyncio.run(threshold_micro(500))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return
    results = asyncio.run(main_async(args))
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "tree": str(ROOT), "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    print(f"\n{'scenario':9} {'reqs':>5} {'TTFT p50':>9} {'TTFT p99':>9} {'gap p50':>8} "
          f"{'gap p99':>8} {'gap max':>8} {'big done':>8} {'errors':>6}")  # fmt: skip
    for r in results:
        print(f"{r['scenario']:9} {r['small_requests']:>5} {r['ttft_p50_ms']:>9.1f} "
              f"{r['ttft_p99_ms']:>9.1f} {r['gap_p50_ms']:>8.1f} {r['gap_p99_ms']:>8.1f} "
              f"{r['gap_max_ms']:>8.1f} {r['big_prompts_done'] + r['grammars_done']:>8} "
              f"{r['error_count']:>6}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
