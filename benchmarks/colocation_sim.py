"""Co-location without a model: the engine's real scheduler on a simulated clock (issue 18).

colocation.py's workload (online Poisson arrivals at half the measured capacity, a closed
loop of offline clients beside them) is run through ``Scheduler`` with a step that costs
``fixed_ms + token_ms * tokens`` instead of a forward pass, so each policy's effect on online
TTFT / TPOT is seen exactly and repeatably, free of the shared machine's noise. The default
costs are the embedded model's on this CPU (a 1-sequence decode step ~23 ms, a 16-sequence one
~37 ms; a prefill token costs about what a decode token does). Deterministic for a seed.

    python benchmarks/colocation_sim.py [--seconds 120] [--fixed-ms 22] [--token-ms 0.9]
        [--offline-clients 16] [--max-num-batched-tokens 1024] [--offline-step-share 0.08]
        [--offline-tpot-quantile Q (default off)] [--max-offline-batched-tokens N]
        [--offline-aging-s 60] [--online-rate R] [--online-prompt 60] [--offline-prompt 110]
        [--seed 1]

``--fixed-ms 37 --token-ms 1.3 --online-rate 2.13 --online-prompt 20 --offline-prompt 20``
is colocation.py on a quiet machine as its step log showed it (session 12's lead run: wall
step costs, 2.13 online requests/s, ~20 prompt tokens computed per request after the prefix
cache): compare its offline tok/s with that run's 64.5 the online work left.
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.sim_step import end_step, quantile_ms, step_seconds  # noqa: E402
from services.engine.block_manager import BlockManager  # noqa: E402
from services.engine.config import EngineConfig  # noqa: E402
from services.engine.sampling_params import SamplingParams  # noqa: E402
from services.engine.scheduler import Scheduler  # noqa: E402
from services.engine.sequence import Sequence  # noqa: E402


@dataclass
class Load:
    """The workload of a run; times in seconds."""

    seconds: float
    online_rate: float  # requests/s, Poisson; 0: none
    online_clients: int = 0  # closed-loop online clients instead (the capacity run)
    offline_clients: int = 0
    offline_tier: str = "flex"
    online_prompt: int = 60
    online_tokens: int = 32
    offline_prompt: int = 110
    offline_tokens: int = 64
    seed: int = 1


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    online_tokens: int = 0
    offline_tokens: int = 0
    preemptions: int = 0


class Sim:
    """One engine on a simulated clock; ``run`` plays a ``Load`` through it."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.now = 0.0
        self.sched = Scheduler(
            BlockManager(a.num_blocks, 16, True), a.max_num_seqs, a.max_num_batched_tokens,
            8192, offline_aging_s=a.offline_aging_s,
            max_offline_batched_tokens=a.max_offline_batched_tokens, clock=lambda: self.now,
            offline_step_share=a.offline_step_share or None,
            offline_tpot_quantile=a.offline_tpot_quantile or None,
        )  # fmt: skip
        self.ids = 0

    def add(self, tier: str, prompt: int, goal: int, online: bool, at: float) -> Sequence:
        """Queue a request that arrived at ``at`` (the engine sees it at the next step, but its
        TTFT counts from its arrival, as a client's does)."""
        self.ids += 1
        tokens = [(self.ids * 7919 + i) % 30000 + 100 for i in range(prompt)]
        seq = Sequence(f"r{self.ids}", tokens, SamplingParams(service_tier=tier, max_tokens=goal),
                       arrival_time=at)  # fmt: skip
        seq.online, seq.goal = online, goal  # type: ignore[attr-defined]
        self.sched.add(seq)
        return seq

    def run(self, load: Load) -> Result:
        rng = random.Random(load.seed)
        res = Result()
        arrivals: list[tuple[float, int, str]] = []  # (time, n, kind)
        t, n = 0.0, 0
        while load.online_rate and t < load.seconds:
            t += rng.expovariate(load.online_rate)
            heapq.heappush(arrivals, (t, n := n + 1, "online"))
        for _ in range(load.online_clients):
            heapq.heappush(arrivals, (0.0, n := n + 1, "online"))
        for _ in range(load.offline_clients):
            heapq.heappush(arrivals, (0.0, n := n + 1, "offline"))
        sched, a = self.sched, self.a
        while self.now < load.seconds:
            while arrivals and arrivals[0][0] <= self.now:
                at, _, kind = heapq.heappop(arrivals)
                if kind == "online":
                    self.add("default", load.online_prompt, load.online_tokens, True, at)
                else:
                    self.add(load.offline_tier, load.offline_prompt, load.offline_tokens, False, at)
            out = sched.schedule()
            sched.resolve_stall(out)
            if out.is_empty:
                if not arrivals:
                    break
                self.now = max(self.now, arrivals[0][0])
                continue
            self.now += step_seconds(out, a.fixed_ms, a.token_ms)
            for seq in end_step(sched, out):
                if seq.num_output_tokens == 1:
                    seq.first_token_time = self.now
                if seq.num_output_tokens < seq.goal:  # type: ignore[attr-defined]
                    continue
                sched.finish(seq, "length")
                if seq.online:  # type: ignore[attr-defined]
                    res.online_tokens += seq.num_output_tokens
                    if load.online_clients:
                        heapq.heappush(arrivals, (self.now, n := n + 1, "online"))
                    assert seq.first_token_time is not None
                    res.ttft.append(seq.first_token_time - seq.arrival_time)
                    res.tpot.append((self.now - seq.first_token_time) / (seq.goal - 1))  # type: ignore[attr-defined]
                else:
                    res.offline_tokens += seq.num_output_tokens
                    heapq.heappush(arrivals, (self.now, n := n + 1, "offline"))
        res.preemptions = sched.num_preemptions
        return res


RUNS = (("online alone", "flex", False), ("FCFS", "default", True), ("tiers", "flex", True))


def compare(a: argparse.Namespace, names: tuple[str, ...] = ("online alone", "FCFS", "tiers")
            ) -> tuple[float, float, dict[str, Result]]:  # fmt: skip
    """colocation.py's runs: the capacity first (``capacity_clients`` closed-loop online
    clients for half of ``seconds``), then online Poisson arrivals at half its rate, alone
    and beside ``offline_clients`` (``online_rate``, if given, instead of half the capacity):
    (capacity tok/s, online rate, each named run's Result)."""
    cap = Sim(a).run(Load(a.seconds / 2, 0.0, online_clients=a.capacity_clients,
                          online_prompt=a.online_prompt))  # fmt: skip
    rate = a.online_rate or len(cap.ttft) / (a.seconds / 2) / 2
    out = {}
    for name, tier, offline in RUNS:
        if name in names:
            load = Load(a.seconds, rate, offline_clients=a.offline_clients if offline else 0,
                        offline_tier=tier, seed=a.seed, online_prompt=a.online_prompt,
                        offline_prompt=a.offline_prompt)  # fmt: skip
            out[name] = Sim(a).run(load)
    return cap.online_tokens / (a.seconds / 2), rate, out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--fixed-ms", type=float, default=22.0, help="cost of a step of no tokens")
    p.add_argument("--token-ms", type=float, default=0.9, help="cost of each token of a step")
    p.add_argument("--capacity-clients", type=int, default=8)
    p.add_argument("--online-rate", type=float, default=0.0,
                   help="online requests/s; 0: half the simulated capacity")  # fmt: skip
    p.add_argument("--online-prompt", type=int, default=60, help="prompt tokens to compute")
    p.add_argument("--offline-prompt", type=int, default=110)
    p.add_argument("--offline-clients", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--num-blocks", type=int, default=4096)
    p.add_argument("--max-offline-batched-tokens", type=int, default=None)
    p.add_argument("--offline-step-share", type=float, default=EngineConfig.offline_step_share,
                   help="the engine's offline share of a step with online work; 0: off")  # fmt: skip
    p.add_argument("--offline-tpot-quantile", type=float,
                   default=EngineConfig.offline_tpot_quantile,
                   help="the engine's pace (with a share); 0: off (the default)")  # fmt: skip
    p.add_argument("--offline-aging-s", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=1)
    return p


def main() -> int:
    a = parser().parse_args()
    cap_tok, rate, runs = compare(a)
    print(f"capacity {cap_tok:.1f} tok/s; online at {rate:.2f} req/s")
    print("| run | TTFT P50 / P99 ms | TPOT P50 / P99 ms | offline tok/s (of left) | preempt |")
    print("|---|---:|---:|---:|---:|")
    left = cap_tok - runs["online alone"].online_tokens / a.seconds
    for name, r in runs.items():
        off = r.offline_tokens / a.seconds
        print(f"| {name} | {quantile_ms(r.ttft, 50):.0f} / {quantile_ms(r.ttft, 99):.0f} | "
              f"{quantile_ms(r.tpot, 50):.1f} / {quantile_ms(r.tpot, 99):.1f} | {off:.1f} ({off / left:.0%}) | "
              f"{r.preemptions} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
