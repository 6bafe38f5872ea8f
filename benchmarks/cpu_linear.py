"""CPU matmul backends on the default model's shapes: F.linear (MKL) against oneDNN with a
packed weight (``services/engine/layers/cpu_linear.py``), per thread count and batch rows.

Prints GFLOP/s of each and their ratio; the last line is this machine's best fp32 GEMM rate
measured here (a large square oneDNN GEMM), the peak that the engines' shares are taken of.

    .venv/bin/python benchmarks/cpu_linear.py [--rows 1 16 128] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch import nn

from services.engine.layers.cpu_linear import OneDNNLinear, onednn_available

# (in, out) of SmolLM2-135M's linears: qkv, o, gate+up, down, lm_head.
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]


def gflops(fn, flops: float, seconds: float = 0.3) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return flops * n / (time.perf_counter() - t0) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 128])
    p.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    args = p.parse_args()
    if not onednn_available():
        raise SystemExit("torch has no oneDNN here")
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print("| threads | rows | in x out | F.linear GFLOP/s | oneDNN GFLOP/s | ratio |")
    print("|---:|---:|---|---:|---:|---:|")
    torch.manual_seed(0)
    with torch.no_grad():
        for th in args.threads:
            torch.set_num_threads(th)
            for m in args.rows:
                for k, n in SHAPES:
                    lin = nn.Linear(k, n, bias=False)
                    x = torch.randn(m, k)
                    packed = OneDNNLinear(lin.weight, None)
                    flops = 2.0 * m * k * n
                    a = gflops(lambda: nn.functional.linear(x, lin.weight), flops)  # noqa: B023
                    b = gflops(lambda: packed(x), flops)  # noqa: B023
                    print(f"| {th} | {m} | {k} x {n} | {a:.0f} | {b:.0f} | {b / a:.2f}x |")
            big = nn.Linear(2048, 2048, bias=False)
            x = torch.randn(2048, 2048)
            packed = OneDNNLinear(big.weight, None)
            peak = gflops(lambda: packed(x), 2.0 * 2048**3, 1.0)  # noqa: B023
            print(f"peak ({th} threads): 2048^3 fp32 GEMM through oneDNN: {peak:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
