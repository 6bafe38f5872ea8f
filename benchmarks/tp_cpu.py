"""Tensor parallelism on the CPU: the default model at TP=1 and TP=N (N processes, gloo),
offline greedy, and the share of the driver's time spent in the collectives.

Not expected to win on a 2-core machine (the ranks split the same cores); it shows what the
communication costs per step. SmolLM2-135M has 9 query and 3 KV heads, so N must divide 9
and 3 (or be a multiple of 3): N = 3 is the smallest size it allows (2 is refused).

    .venv/bin/python benchmarks/tp_cpu.py [--tp 3] [--requests 16] [--input-len 128] [--output-len 64]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from services.engine import LLM, SamplingParams


def run(tp: int, prompts: list[list[int]], output_len: int) -> dict:
    llm = LLM(None, device="cpu", dtype="float32", tensor_parallel_size=tp,
              max_num_seqs=len(prompts))  # fmt: skip
    threads = torch.get_num_threads()  # per rank (the ranks split the cores)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    group = llm.engine.runner.tp
    group.comm_seconds = 0.0
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    result = {
        "tp": tp,
        "threads": threads,
        "load": os.getloadavg()[0],
        "tok_s": len(prompts) * output_len / wall,
        "wall_s": wall,
        "comm_share": group.comm_seconds / wall,
        "tokens": [o.outputs[0].token_ids for o in outs],
    }
    llm.engine.close()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 49000, (args.input_len,), generator=g).tolist()
               for _ in range(args.requests)]  # fmt: skip
    results = [run(1, prompts, args.output_len), run(args.tp, prompts, args.output_len)]
    same = sum(a == b for a, b in zip(results[0]["tokens"], results[1]["tokens"], strict=True))
    print(f"{args.requests} x {args.input_len} in / {args.output_len} out, greedy, fp32, "
          f"{os.cpu_count()} cores")  # fmt: skip
    for r in results:
        print(f"TP={r['tp']} ({r['threads']} threads per rank): {r['tok_s']:.1f} output tok/s, "
              f"wall {r['wall_s']:.1f} s, collectives {100 * r['comm_share']:.1f}% of the "
              f"driver's wall time, load average after {r['load']:.1f}")  # fmt: skip
    print(f"identical greedy outputs: {same}/{args.requests}")


if __name__ == "__main__":
    main()
