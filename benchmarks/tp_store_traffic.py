"""The pipe traffic of KV store writes under tensor parallelism: per engine step, the bytes the
other ranks send the driver so that it can write whole blocks to the store (write-through:
``RankTiers.whole``; blocks the host pool pushes out: the step's moves), and the time the
driver waits for them.

The store is an in-memory dict (the traffic between the ranks does not depend on it); the same
workload runs without a store for the wall-clock difference. SmolLM2-135M (the default model)
needs a size that divides its 3 KV heads: 3.

    PYTHONPATH=. .venv/bin/python benchmarks/tp_store_traffic.py [--tp 3] [--requests 8]
        [--input-len 128] [--output-len 32] [--host-pool-bytes 0]
"""

from __future__ import annotations

import argparse
import collections
import os
import time
from typing import Any

import torch

from services.engine import LLM, SamplingParams
from services.engine.llm_engine import LLMEngine
from services.engine.tp_ranks import RankProcesses
from tests.conftest import DictStore


def tensor_bytes(x: Any) -> int:
    """The tensor data in ``x`` (a tensor, a list/tuple of them, a dataclass of them)."""
    if isinstance(x, torch.Tensor):
        return x.nbytes
    if isinstance(x, list | tuple):
        return sum(tensor_bytes(v) for v in x)
    if hasattr(x, "__dataclass_fields__"):
        return sum(tensor_bytes(getattr(x, f)) for f in x.__dataclass_fields__)
    return 0


class Meter:
    """Counts the driver's rank calls (seconds, tensor bytes out and back) and engine steps."""

    def __init__(self) -> None:
        # name -> [calls, seconds, bytes sent, bytes back, largest bytes back, its seconds]
        self.calls: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0, 0, 0, 0.0])
        self.steps = 0
        self.step_seconds = 0.0
        call, step = RankProcesses.call, LLMEngine.step
        meter = self

        def timed_call(ranks, fn, *args, timeout, background=False):
            start = time.perf_counter()
            out = call(ranks, fn, *args, timeout=timeout, background=background)
            c = meter.calls[fn.__name__]
            c[0] += 1
            c[1] += time.perf_counter() - start
            c[2] += tensor_bytes(args)
            back = tensor_bytes(out)
            c[3] += back
            if back > c[4]:
                c[4], c[5] = back, time.perf_counter() - start
            return out

        def timed_step(engine):
            start = time.perf_counter()
            out = step(engine)
            meter.steps += 1
            meter.step_seconds += time.perf_counter() - start
            return out

        RankProcesses.call = timed_call  # type: ignore[method-assign]
        LLMEngine.step = timed_step  # type: ignore[method-assign]

    def reset(self) -> None:
        self.calls.clear()
        self.steps, self.step_seconds = 0, 0.0


def run(args, prompts: list[list[int]], store: bool, meter: Meter) -> dict:
    llm = LLM(None, device="cpu", dtype="float32", tensor_parallel_size=args.tp,
              max_num_seqs=len(prompts), kv_host_pool_bytes=args.host_pool_bytes)  # fmt: skip
    engine = llm.engine
    if store:
        engine.attach_kv_store(DictStore())
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    meter.reset()
    start = time.perf_counter()
    llm.generate(prompts, params)
    wall = time.perf_counter() - start
    if engine.tiers is not None:
        engine.tiers.flush()
    stats = engine.stats()
    engine.close()
    return {"wall": wall, "steps": meter.steps, "step_s": meter.step_seconds,
            "calls": dict(meter.calls), "put_blocks": stats.kv_store_put_blocks}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--host-pool-bytes", type=int, default=0)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 49000, (args.input_len,), generator=g).tolist()
               for _ in range(args.requests)]  # fmt: skip
    meter = Meter()
    print(f"TP={args.tp}, {args.requests} x {args.input_len} in / {args.output_len} out, greedy, "
          f"fp32, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    for store in (False, True):
        r = run(args, prompts, store, meter)
        print(f"store {'on ' if store else 'off'}: wall {r['wall']:.2f} s, {r['steps']} steps, "
              f"{1000 * r['step_s'] / max(1, r['steps']):.1f} ms a step, "
              f"{r['put_blocks']} blocks stored")  # fmt: skip
        for name, (n, secs, out, back, top, top_s) in sorted(r["calls"].items()):
            print(f"  {name}: {n} calls, {back / 1e6:.1f} MB back ({back / max(1, n) / 1e6:.2f} "
                  f"MB a call, {back / max(1, r['steps']) / 1e6:.2f} MB a step), "
                  f"{out / 1e6:.1f} MB sent, {1000 * secs / max(1, n):.1f} ms a call, "
                  f"{100 * secs / r['step_s']:.1f} % of the step time; the largest "
                  f"{top / 1e6:.1f} MB in {1000 * top_s:.0f} ms")  # fmt: skip
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
