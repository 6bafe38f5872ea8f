"""Causal prefill attention on the CPU: the C kernel (``csrc/prefill_attn.c``, what the engine
runs for fresh prompts) against torch's SDPA (what it ran before, and runs with
``EPDSERVE_CPU_PREFILL_ATTN=0``), alternated in one process.

Each row: P prompts of N tokens side by side (a prefill step), q/k/v as views into one fused
qkv output as the layer has them. SDPA is called as the engine called it (one causal call over
the run of equal-length prompts, ``enable_gqa``). Prints the median wall and CPU time a call
per side, GFLOP/s of the causal work (4 * D * N(N+1)/2 per head and prompt), the ratio and the
largest difference between the two outputs.

    .venv/bin/python benchmarks/prefill_attn.py [--prompts 16] [--tokens 128 512]
        [--heads 9 --kv-heads 3 --head-dim 64] [--threads 1 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from services.engine.layers import prefill_kernel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 512])
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    kernel = prefill_kernel.prefill_attention()
    if kernel is None:
        raise SystemExit("the prefill attention kernel is not built here (no compiler, or off)")
    h, hkv, d, m = args.heads, args.kv_heads, args.head_dim, args.prompts
    print("| threads | prompts x tokens | SDPA wall | C wall | SDPA CPU | C CPU | GFLOP/s SDPA | C "
          "| C / SDPA | max diff |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for n in args.tokens:
            t = m * n
            qkv = torch.randn(t, (h + 2 * hkv) * d, generator=torch.Generator().manual_seed(n))
            q = qkv[:, : h * d].view(t, h, d)
            k = qkv[:, h * d : (h + hkv) * d].view(t, hkv, d)
            v = qkv[:, (h + hkv) * d :].view(t, hkv, d)
            segs = [(i * n, n) for i in range(m)]
            out = torch.empty(t, h, d)

            def sdpa() -> torch.Tensor:
                qq, kk, vv = (x.unflatten(0, (m, n)).transpose(1, 2) for x in (q, k, v))  # noqa: B023
                o = F.scaled_dot_product_attention(
                    qq, kk, vv, is_causal=True, scale=d**-0.5, enable_gqa=True
                )
                return o.transpose(1, 2).flatten(0, 1)

            def c() -> torch.Tensor:
                kernel(q, k, v, segs, d**-0.5, out)  # noqa: B023
                return out  # noqa: B023

            sides: dict[str, list[tuple[float, float]]] = {"sdpa": [], "c": []}
            calls = max(3, int(1e9 / (4 * d * n * n / 2 * h * m)))  # ~1 GFLOP a side and round
            for r in range(args.rounds):
                for name, fn in (("sdpa", sdpa), ("c", c))[:: 1 if r % 2 == 0 else -1]:
                    fn()
                    w0, c0 = time.perf_counter(), time.process_time()
                    for _ in range(calls):
                        fn()
                    sides[name].append(((time.perf_counter() - w0) / calls,
                                        (time.process_time() - c0) / calls))  # fmt: skip
            med = {
                k: [statistics.median(x[i] for x in v) for i in (0, 1)] for k, v in sides.items()
            }
            flop = 4 * d * n * (n + 1) / 2 * h * m
            diff = float((sdpa() - c()).abs().max())
            (sw, sc), (cw, cc) = med["sdpa"], med["c"]
            print(f"| {threads} | {m} x {n} | {sw * 1e3:.2f} ms | {cw * 1e3:.2f} ms | "
                  f"{sc * 1e3:.2f} ms | {cc * 1e3:.2f} ms | {flop / sw / 1e9:.0f} | "
                  f"{flop / cw / 1e9:.0f} | {sw / cw:.2f}x | {diff:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
