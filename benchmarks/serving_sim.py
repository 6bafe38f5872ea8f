"""The serving benchmark's closed loop through the engine's real scheduler on a simulated clock.

``vllm bench serve --max-concurrency 16`` (and ``epdserve bench``) keep 16 requests in flight:
each finished request starts the next one. With fixed-length requests (random 128 in / 64 out,
ignore_eos) the engine's admission decides whether requests run in waves (16 start together,
decode together, end together) or staggered, and so where the prompts' compute lands: in the
arriving requests' TTFT, or in the running requests' TPOT and inter-token latency.

This plays that loop through ``Scheduler`` with a step that costs ``fixed_ms + token_ms *
tokens`` (no model), for several token budgets, and prints throughput, TTFT p50, TPOT p50,
ITL p99 and the steps in which running decodes waited behind prompt tokens. The default costs
are the embedded model's on the 2-core CPU with the worker's PASSIVE OpenMP threads (a
16-sequence decode step ~60 ms, a 1,024-token prefill ~0.95 s: benchmarks/RESULTS.md).
Deterministic for a seed; recorded, not asserted; not in CI.

    python benchmarks/serving_sim.py [--budgets 256,512,1024,2048] [--concurrency 16]
        [--num-prompts 640] [--fixed-ms 45] [--token-ms 0.9] [--turnaround-ms 10]
        [--caps 0,32,64] [--jitter-ms 0]

``--caps``: ``max_prefill_tokens_while_decoding`` values (a row per budget and cap);
``--jitter-ms``: each successor reaches the engine up to this much later again, at random
(a loaded router or client: the waves fall out of step).
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.sim_step import end_step, quantile_ms, step_seconds  # noqa: E402
from services.engine.block_manager import BlockManager  # noqa: E402
from services.engine.config import EngineConfig  # noqa: E402
from services.engine.sampling_params import SamplingParams  # noqa: E402
from services.engine.scheduler import Scheduler  # noqa: E402
from services.engine.sequence import Sequence  # noqa: E402


@dataclass
class Row:
    tok_s: float
    ttft_p50_ms: float
    tpot_p50_ms: float
    itl_p99_ms: float
    steps: int
    stalled_steps: int  # steps computing running decodes together with prompt tokens
    stalled_decodes: float  # share of all decode rows computed in such steps


def run(a: argparse.Namespace, budget: int, cap: int = 0) -> Row:
    """Play ``a.num_prompts`` requests, ``a.concurrency`` in flight, through one scheduler.
    A finished request's successor reaches the engine ``turnaround_ms`` (+ up to as much
    again at random) later: the client, gateway and router between them."""
    now = 0.0
    sched = Scheduler(BlockManager(a.num_blocks, 16, True), a.max_num_seqs, budget, 8192,
                      clock=lambda: now, max_prefill_tokens_while_decoding=cap)  # fmt: skip
    rng = random.Random(a.seed)
    turn = a.turnaround_ms / 1000
    arrivals: list[tuple[float, int]] = [(rng.uniform(0, turn), i) for i in range(a.concurrency)]
    heapq.heapify(arrivals)
    sent, done, steps, stalled, decodes, stalled_rows = a.concurrency, 0, 0, 0, 0, 0
    ttft: list[float] = []
    tpot: list[float] = []
    itl: list[float] = []
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    while done < a.num_prompts:
        while arrivals and arrivals[0][0] <= now:
            at, i = heapq.heappop(arrivals)
            prompt = [(i * 7919 + j) % 30000 + 100 for j in range(a.input_len)]
            params = SamplingParams(max_tokens=a.output_len, ignore_eos=True)
            sched.add(Sequence(f"r{i}", prompt, params, arrival_time=at))
        out = sched.schedule()
        if out.is_empty:
            now = arrivals[0][0]
            continue
        rows = sum(1 for s in out.scheduled if s.seq.num_output_tokens and s.num_new_tokens == 1)
        prompt_tokens = out.num_batched_tokens - rows
        steps += 1
        decodes += rows
        if rows and prompt_tokens:
            stalled += 1
            stalled_rows += rows
        now += step_seconds(out, a.fixed_ms, a.token_ms)
        for seq in end_step(sched, out):
            if seq.num_output_tokens == 1:
                ttft.append(now - seq.arrival_time)
                first[seq.seq_id] = now
            else:
                itl.append(now - last[seq.seq_id])
            last[seq.seq_id] = now
            if seq.num_output_tokens < a.output_len:
                continue
            sched.finish(seq, "length")
            done += 1
            tpot.append((now - first[seq.seq_id]) / (a.output_len - 1))
            if sent < a.num_prompts:
                late = turn + rng.uniform(0, turn) + rng.uniform(0, a.jitter_ms / 1000)
                heapq.heappush(arrivals, (now + late, sent))
                sent += 1
    return Row(done * a.output_len / now, quantile_ms(ttft, 50), quantile_ms(tpot, 50),
               quantile_ms(itl, 99), steps, stalled,
               stalled_rows / max(decodes, 1))  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--budgets", default="256,512,1024,2048,4096")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=640)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--fixed-ms", type=float, default=45.0, help="cost of a step of no tokens")
    p.add_argument("--token-ms", type=float, default=0.9, help="cost of each token of a step")
    p.add_argument("--turnaround-ms", type=float, default=10.0,
                   help="a finished request's successor reaches the engine this much later")  # fmt: skip
    p.add_argument("--caps", default="0", help="max_prefill_tokens_while_decoding values")
    p.add_argument("--jitter-ms", type=float, default=0.0,
                   help="a successor comes up to this much later again, at random")  # fmt: skip
    p.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    p.add_argument("--num-blocks", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print("| budget | prefill cap | output tok/s | TTFT p50 | TPOT p50 | ITL p99 | steps | "
          "steps with decodes and prompt tokens | decode rows in them |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    caps = [int(c) for c in a.caps.split(",")]
    for budget, cap in ((int(b), c) for b in a.budgets.split(",") for c in caps):
        r = run(a, budget, cap)
        print(f"| {budget} | {cap} | {r.tok_s:.1f} | {r.ttft_p50_ms:.0f} ms | "
              f"{r.tpot_p50_ms:.1f} ms | {r.itl_p99_ms:.0f} ms | {r.steps} | {r.stalled_steps} | "
              f"{r.stalled_decodes:.1%} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
