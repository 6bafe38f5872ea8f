"""CPU matmul backends on the default model's shapes, against this machine's fp32 GEMM peak
measured in the same run.

Backends: ``F.linear`` (MKL's sgemm), oneDNN with a packed weight (what the engine runs:
``services/engine/layers/cpu_linear.py``), MKL's packed sgemm
(``torch.ops.mkl._mkl_reorder_linear_weight`` + ``_mkl_linear``: inductor's weight freezing
for fp32 CPU linears) and ``torch.mm`` against a transposed, contiguous weight. Per thread
count and row count (decode batches, prefill chunks) it prints GFLOP/s of each and the best
one's share of the peak (a 2048^3 GEMM through oneDNN, measured here first).

``--cold`` also runs the decoder's linears layer after layer with 30 layers' distinct weights,
as a real step does (the weights come from memory, not from the cache), next to the same
calls on one layer's weights (hot).

Timing: one thread is timed by its CPU time (``time.thread_time``: barely moved by other
processes on a shared machine); more threads by the best wall time.

    .venv/bin/python benchmarks/cpu_linear.py [--rows 16 64 256 2048] [--threads 1 2] [--cold]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
from torch import nn

from services.engine.layers.cpu_linear import OneDNNLinear, onednn_available

# (in, out) of SmolLM2-135M's linears as the engine has them: fused qkv, o, fused gate+up,
# down, lm_head.
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]
LAYERS = 30


def seconds_per_call(fn: Callable[[], object], threads: int, budget: float = 0.3) -> float:
    """Median CPU time of a call on one thread, best wall time on more."""
    fn()
    fn()
    clock = time.thread_time if threads == 1 else time.perf_counter
    times: list[float] = []
    end = time.perf_counter() + budget
    while time.perf_counter() < end or len(times) < 3:
        t = clock()
        fn()
        times.append(clock() - t)
    times.sort()
    return times[len(times) // 2] if threads == 1 else times[0]


def mkl_packed() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def backends(w: torch.Tensor, rows: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "F.linear": lambda x: nn.functional.linear(x, w),
        "oneDNN packed": OneDNNLinear(w, None),
    }
    if mkl_packed():
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
        out["MKL packed"] = lambda x: torch.ops.mkl._mkl_linear(x, packed, w, None, rows)
    wt = w.t().contiguous()
    out["mm(x, W^T)"] = lambda x: torch.mm(x, wt)
    return out


def peak(threads: int) -> float:
    x, w = torch.randn(2048, 2048), torch.randn(2048, 2048)
    packed = OneDNNLinear(w, None)
    return 2.0 * 2048**3 / seconds_per_call(lambda: packed(x), threads, 1.0) / 1e9


def shape_table(rows: list[int], threads: int, top: float) -> None:
    names = list(backends(torch.randn(8, 8), 1))
    print(f"| threads | rows | in x out | {' | '.join(names)} | best | best / peak |")
    print("|---:|---:|---|" + "---:|" * (len(names) + 2))
    for m in rows:
        for k, n in SHAPES:
            if n == SHAPES[-1][1] and m > 256:
                continue  # the lm_head: the engines take logits of the sampled rows only
            w, x = torch.randn(n, k) * k**-0.5, torch.randn(m, k)
            ref = nn.functional.linear(x, w)
            rates = {}
            for name, fn in backends(w, m).items():
                torch.testing.assert_close(fn(x), ref, rtol=1e-4, atol=1e-4)
                rates[name] = (
                    2.0 * m * k * n / seconds_per_call(lambda f=fn, x=x: f(x), threads) / 1e9
                )
            best = max(rates, key=rates.__getitem__)
            cells = " | ".join(f"{rates[name]:.0f}" for name in names)
            print(f"| {threads} | {m} | {k} x {n} | {cells} | {best} | "
                  f"{rates[best] / top:.0%} |")  # fmt: skip


def cold_table(rows: list[int], threads: int, top: float) -> None:
    """The four decoder linears of 30 layers in a row (oneDNN, packed), distinct weights per
    layer (cold) or one layer's weights each time (hot)."""
    decoder = SHAPES[:4]
    weights = [[OneDNNLinear(torch.randn(n, k), None) for k, n in decoder] for _ in range(LAYERS)]
    print("\n| threads | rows | 30 layers' linears | GFLOP/s | share of peak |")
    print("|---:|---:|---|---:|---:|")
    for m in rows:
        xs = {k: torch.randn(m, k) for k, _ in decoder}
        flops = 2.0 * m * LAYERS * sum(k * n for k, n in decoder)
        hot = [weights[0]] * LAYERS
        for label, per_layer in (("cold (distinct weights)", weights), ("hot (one layer's)", hot)):

            def step(layers=per_layer, xs=xs) -> None:
                for layer in layers:
                    for fn, (k, _) in zip(layer, decoder, strict=True):
                        fn(xs[k])

            rate = flops / seconds_per_call(step, threads, 1.0) / 1e9
            print(f"| {threads} | {m} | {label} | {rate:.0f} | {rate / top:.0%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256, 2048])
    p.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    p.add_argument("--cold", action="store_true", help="also the 30-layer cold/hot comparison")
    args = p.parse_args()
    if not onednn_available():
        raise SystemExit("torch has no oneDNN here")
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"MKL packed sgemm: {'yes' if mkl_packed() else 'no'}")  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        for th in args.threads:
            torch.set_num_threads(th)
            top = peak(th)
            print(f"\npeak ({th} threads): 2048^3 fp32 GEMM through oneDNN: {top:.0f} GFLOP/s\n")
            shape_table(args.rows, th, top)
            if args.cold:
                cold_table([m for m in args.rows if m <= 256], th, top)


if __name__ == "__main__":
    main()
