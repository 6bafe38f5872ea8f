"""Online and offline work on one cluster (issue 18): online requests arrive as a Poisson
stream at about half of the measured capacity, with TTFT / TPOT SLOs; an offline load
(closed loop, enough clients to saturate the rest) runs beside them. Three runs in one go:

1. online alone;
2. online + offline as plain requests (service tier default: first come, first served);
3. online + offline as service tier flex (the router's offline queue, the engine's tiers),
   run before 2. (the engine's pace reads its recent online requests: FCFS's are all online).

Prints online TTFT / TPOT P50 / P99 and SLO attainment, and offline output tokens/s against
the capacity online work leaves (capacity measured first, in the same run). Recorded, not
asserted.

    python benchmarks/colocation.py [--model PATH|GGUF] [--seconds 60] [--slo-ttft-ms 2000]
        [--slo-tpot-ms 200] [--offline-clients 16] [--max-offline-batched-tokens N]
        [--offline-step-share 0.08] [--offline-tpot-quantile Q (off)] [--workers 1]
        [--cpu-threads N] [--rebalance-policy P] [--watch] [--rounds 1] [--no-fcfs]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from services.cli.cluster_spec import ClusterSpec  # noqa: E402
from services.cli.launcher import LocalCluster  # noqa: E402
from services.engine.config import EngineConfig  # noqa: E402
from services.router.config import RouterConfig  # noqa: E402

ONLINE_TOKENS = 32  # output tokens of an online request
OFFLINE_TOKENS = 64


def prompt(i: int, words: int) -> str:
    rng = random.Random(i)
    return " ".join(rng.choice(["city", "river", "blue", "seven", "paper", "lamp", "north"])
                    for _ in range(words))  # fmt: skip


def online_request(c: httpx.Client, model: str, i: int) -> tuple[float, float] | None:
    """Stream one online completion: (TTFT s, TPOT s), None if it failed (counted)."""
    try:
        return _online_request(c, model, i)
    except httpx.HTTPError as e:  # e.g. a kept-alive connection the server closed meanwhile
        print(f"online request {i} failed: {e!r}", file=sys.stderr)
        return None


def _online_request(c: httpx.Client, model: str, i: int) -> tuple[float, float] | None:
    body = {"model": model, "prompt": prompt(i, 48), "max_tokens": ONLINE_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    t0 = time.perf_counter()
    first = None
    n = 0
    with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return None
        for line in r.iter_lines():
            if line.startswith("data: {") and '"text": ""' not in line:
                n += 1
                first = first or time.perf_counter()
    if first is None:
        return None
    end = time.perf_counter()
    return first - t0, (end - first) / max(1, n - 1)


def offline_loop(url: str, model: str, tier: str, stop: threading.Event, out: list[int]) -> None:
    with httpx.Client(base_url=url, timeout=900) as c:
        i = 10**6
        while not stop.is_set():
            i += 1
            body = {"model": model, "prompt": prompt(i, 96), "max_tokens": OFFLINE_TOKENS,
                    "temperature": 0, "ignore_eos": True, "service_tier": tier}  # fmt: skip
            try:
                r = c.post("/v1/completions", json=body)
            except httpx.HTTPError:
                continue
            if r.status_code == 200 and not stop.is_set():
                out.append(r.json()["usage"]["completion_tokens"])


def capacity(url: str, model: str, seconds: float, clients: int) -> tuple[float, float]:
    """Closed loop of ``clients`` online requests: (requests/s, output tokens/s)."""
    done: list[int] = []
    stop = threading.Event()

    def loop(k: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            i = k * 10**5
            while not stop.is_set():
                i += 1
                if online_request(c, model, i) is not None and not stop.is_set():
                    done.append(ONLINE_TOKENS)

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return len(done) / seconds, sum(done) / seconds


class GateWatch:
    """Samples the router's /admin/status once a second while a run lasts: per worker, its
    own online TTFT/TPOT means (what the router's offline gate reads), its offline requests
    running and waiting, and whether the gate was open for it then (offline.has_room's test,
    from the same numbers); and the rebalancer's decisions."""

    def __init__(self, url: str, token: str, router: dict, on: bool = True) -> None:
        self.url, self.headers, self.router = url, {"Authorization": f"Bearer {token}"}, router
        self.on = on
        self.samples: list[dict] = []
        self.rebalancer: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> GateWatch:
        if self.on:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.on:
            self._thread.join()

    def _loop(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10, headers=self.headers) as c:
            while not self._stop.wait(1.0):
                try:
                    status = c.get("/admin/status").json()
                except (httpx.HTTPError, ValueError):
                    continue
                self.samples.extend(w for w in status["workers"] if w["running"] is not None)
                self.rebalancer = status.get("rebalancer") or {}

    def open(self, w: dict) -> bool:
        r = self.router
        slo = not ((r["slo_ttft_ms"] and w["online_ttft_ms"] > r["slo_ttft_ms"])
                   or (r["slo_tpot_ms"] and w["online_tpot_ms"] > r["slo_tpot_ms"]))  # fmt: skip
        return (slo and w["waiting_prompt_tokens"] <= r["offline_headroom_tokens"]
                and w["kv_utilization"] <= r["offline_headroom_kv"])  # fmt: skip

    def summary(self) -> dict:
        """Per worker: samples, the gate's open share, mean online TPOT / TTFT (its own
        window), mean offline running / waiting; the rebalancer's decisions."""
        out: dict = {}
        for wid in sorted({w["id"] for w in self.samples}):
            mine = [w for w in self.samples if w["id"] == wid]
            n = len(mine)
            out[wid] = {
                "samples": n, "gate_open": sum(map(self.open, mine)) / n,
                "online_tpot_ms": statistics.fmean(w["online_tpot_ms"] for w in mine),
                "online_ttft_ms": statistics.fmean(w["online_ttft_ms"] for w in mine),
                "offline_running": statistics.fmean(w["offline_running"] for w in mine),
                "offline_waiting": statistics.fmean(w["offline_waiting"] for w in mine),
                "running": statistics.fmean(w["running"] for w in mine),
            }  # fmt: skip
        decisions = self.rebalancer.get("decisions") or []
        return {"workers": out, "rebalance_policy": self.rebalancer.get("policy"),
                "rebalance_decisions": len(decisions)}  # fmt: skip


def rounded(x: object) -> object:
    """``x`` with its floats to 3 decimals (for printing)."""
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    return round(x, 3) if isinstance(x, float) else x


def run(url: str, model: str, rate: float, seconds: float, offline: str | None,
        clients: int, seed: int) -> dict:  # fmt: skip
    """One run: Poisson online arrivals at ``rate``/s for ``seconds``; with ``offline`` (a
    tier), ``clients`` offline closed loops beside them."""
    stop = threading.Event()
    offline_tokens: list[int] = []
    loops = [threading.Thread(target=offline_loop, args=(url, model, offline, stop, offline_tokens))
             for _ in range(clients if offline else 0)]  # fmt: skip
    for t in loops:
        t.start()
    if loops:
        time.sleep(5)  # the offline load builds up first
    offline_tokens.clear()
    rng = random.Random(seed)
    results: list[tuple[float, float] | None] = []
    with httpx.Client(base_url=url, timeout=600) as c, ThreadPoolExecutor(64) as pool:
        t0 = time.perf_counter()
        futures, i, at = [], 0, 0.0
        while at < seconds:
            at += rng.expovariate(rate)
            time.sleep(max(0.0, t0 + at - time.perf_counter()))
            futures.append(pool.submit(online_request, c, model, i))
            i += 1
        results = [f.result() for f in futures]
        elapsed = time.perf_counter() - t0
    offline_done = sum(offline_tokens)
    stop.set()
    for t in loops:
        t.join()
    ok = [r for r in results if r is not None]
    return {"online": ok, "failed": len(results) - len(ok), "elapsed": elapsed,
            "offline_tok_s": offline_done / elapsed}  # fmt: skip


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def pooled(report: dict, samples: dict, runs: dict, rounds: int) -> None:
    """With several rounds: each round's tiers / alone ratios, the spread of online alone
    across rounds, and the percentiles of all rounds' online requests pooled."""
    keys = ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")
    ratios = [{k: runs[f"tiers #{i}"][k] / runs[f"online alone #{i}"][k] for k in keys}
              for i in range(1, rounds + 1)]  # fmt: skip
    spread = {k: [runs[f"online alone #{i}"][k] for i in range(1, rounds + 1)] for k in keys}
    out: dict = {"ratios": ratios, "alone_spread": spread}
    for name in ("online alone", "tiers"):
        rs = [samples[f"{name} #{i}"] for i in range(1, rounds + 1)]
        ttft = [t for r in rs for t, _ in r["online"]]
        tpot = [t for r in rs for _, t in r["online"]]
        out[name] = {"requests": len(ttft),
                     "ttft_p50_ms": pct(ttft, 50) * 1000, "ttft_p99_ms": pct(ttft, 99) * 1000,
                     "tpot_p50_ms": pct(tpot, 50) * 1000, "tpot_p99_ms": pct(tpot, 99) * 1000,
                     "offline_tok_s": statistics.fmean(r["offline_tok_s"] for r in rs)}  # fmt: skip
    report["pooled"] = out
    for i, x in enumerate(ratios, 1):
        print(f"round {i} tiers / alone:", json.dumps(rounded(x)))
    print("online alone across rounds:", json.dumps(rounded(spread)))
    print("pooled:", json.dumps(rounded({k: out[k] for k in ("online alone", "tiers")})))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded model)")
    p.add_argument("--seconds", type=float, default=60.0, help="length of each run")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument("--capacity-clients", type=int, default=8)
    p.add_argument("--offline-clients", type=int, default=16)
    p.add_argument(
        "--max-offline-batched-tokens",
        type=int,
        default=None,
        help="the engine's cap on offline tokens per step (default: none)",
    )
    p.add_argument("--offline-step-share", type=float, default=EngineConfig.offline_step_share,
                   help="the engine's offline share of a step with online work; 0: off")  # fmt: skip
    p.add_argument("--offline-tpot-quantile", type=float,
                   default=EngineConfig.offline_tpot_quantile,
                   help="the engine's pace of offline work (with a share); 0: off")  # fmt: skip
    p.add_argument("--workers", type=int, default=1, help="mixed workers (the router spreads "
                   "both classes; --watch reports each one's offline gate)")  # fmt: skip
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="each worker's torch threads (default: the engine's; 1 with --workers > 1)",
    )
    p.add_argument("--rebalance-policy", default=None, help="the router's (default: its own)")
    p.add_argument(
        "--watch",
        action="store_true",
        default=None,
        help="sample /admin/status each second (default: with --workers > 1)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="alternate online alone and tiers this many times (then FCFS)",
    )
    p.add_argument("--no-fcfs", action="store_true", help="leave the FCFS run out")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    threads = a.cpu_threads if a.cpu_threads is not None else (1 if a.workers > 1 else None)
    watch = a.watch if a.watch is not None else a.workers > 1
    router = {"slo_ttft_ms": a.slo_ttft_ms, "slo_tpot_ms": a.slo_tpot_ms}
    if a.rebalance_policy:
        router["rebalance_policy"] = a.rebalance_policy
    spec = ClusterSpec(
        model=a.model, port=0, cluster="colocation", mixed=a.workers,
        engine_overrides={"max_num_seqs": 32,
                          "max_offline_batched_tokens": a.max_offline_batched_tokens,
                          "offline_step_share": a.offline_step_share or None,
                          "offline_tpot_quantile": a.offline_tpot_quantile or None,
                          **({"cpu_threads": threads} if threads else {})},
        router_overrides=router,
    )  # fmt: skip
    defaults = RouterConfig()
    router = {"offline_headroom_tokens": defaults.offline_headroom_tokens,
              "offline_headroom_kv": defaults.offline_headroom_kv, **router}  # fmt: skip
    cluster = LocalCluster(spec)
    cluster.start(timeout=600, progress=lambda m: print(m, file=sys.stderr))
    report: dict = {"slo_ttft_ms": a.slo_ttft_ms, "slo_tpot_ms": a.slo_tpot_ms}
    try:
        url = cluster.base_url
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        with httpx.Client(base_url=url, timeout=600) as c, ThreadPoolExecutor(8) as pool:
            # warm-up: every worker's first requests (weights packing) before the capacity
            list(pool.map(lambda i: online_request(c, model, i), range(4 * a.workers)))
        cap_rps, cap_tok = capacity(url, model, a.seconds / 2, a.capacity_clients)
        rate = cap_rps / 2
        report.update(capacity_rps=cap_rps, capacity_tok_s=cap_tok, online_rate=rate)
        print(f"capacity {cap_rps:.2f} req/s, {cap_tok:.1f} tok/s; online at {rate:.2f} req/s")
        runs, samples = {}, {}
        # NOTE: tiers before FCFS: FCFS's bulk requests are online work, and the engine's pace
        # of offline work reads the online requests of its last 30 s (tier_policy.py).
        # --rounds N alternates alone and tiers N times (the machine's load drifts: each pair
        # is compared in its own time, and all rounds' requests are pooled).
        plan = [(f"{name} #{k + 1}" if a.rounds > 1 else name, tier)
                for k in range(a.rounds) for name, tier in (("online alone", None),
                                                            ("tiers", "flex"))]  # fmt: skip
        if not a.no_fcfs:
            plan.append(("FCFS", "default"))
        for name, tier in plan:
            with GateWatch(url, cluster.admin_token, router, on=watch) as gates:
                r = run(url, model, rate, a.seconds, tier, a.offline_clients, seed=1)
            samples[name] = r
            if watch:
                report.setdefault("gates", {})[name] = g = gates.summary()
                print(name, "gates", json.dumps(rounded(g)), flush=True)
            ttft = [t for t, _ in r["online"]]
            tpot = [t for _, t in r["online"]]
            met = sum(t * 1000 <= a.slo_ttft_ms and s * 1000 <= a.slo_tpot_ms
                      for t, s in r["online"])  # fmt: skip
            runs[name] = {
                "online_requests": len(ttft), "failed": r["failed"],
                "ttft_p50_ms": pct(ttft, 50) * 1000, "ttft_p99_ms": pct(ttft, 99) * 1000,
                "tpot_p50_ms": pct(tpot, 50) * 1000, "tpot_p99_ms": pct(tpot, 99) * 1000,
                "slo_attainment": met / max(1, len(ttft)), "offline_tok_s": r["offline_tok_s"],
                "online_tok_s": len(ttft) * ONLINE_TOKENS / r["elapsed"],
            }  # fmt: skip
            print(name, json.dumps({k: round(v, 3) for k, v in runs[name].items()}), flush=True)
        if a.rounds > 1:
            pooled(report, samples, runs, a.rounds)
        alone = [x["online_tok_s"] for n, x in runs.items() if n.startswith("online alone")]
        left = cap_tok - statistics.fmean(alone)
        report.update(runs=runs, capacity_left_tok_s=left)
        print(f"\ncapacity online leaves: {left:.1f} tok/s")
        print("| run | TTFT P50 / P99 ms | TPOT P50 / P99 ms | SLO met | offline tok/s (of left) |")
        print("|---|---:|---:|---:|---:|")
        for name, x in runs.items():
            share = (
                f"{x['offline_tok_s']:.1f} ({x['offline_tok_s'] / left:.0%})" if left > 0 else "-"
            )
            print(f"| {name} | {x['ttft_p50_ms']:.0f} / {x['ttft_p99_ms']:.0f} | "
                  f"{x['tpot_p50_ms']:.0f} / {x['tpot_p99_ms']:.0f} | "
                  f"{x['slo_attainment']:.0%} | {share} |")  # fmt: skip
    finally:
        cluster.stop()
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
