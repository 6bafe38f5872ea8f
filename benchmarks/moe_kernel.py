"""GPU: the fused Triton MoE (``layers/triton_moe.py``) against the torch reference experts
(``layers/moe.experts_reference``) on one MoE layer's routed experts, and against the memory
floor of the experts a batch touches.

Random weights of one layer of the chosen shape (Qwen3-30B-A3B by default: 128 experts, top-8,
hidden 2048, expert intermediate 768), random router logits, for each ``--tokens``: the median
time of each path (CUDA events, after warm-up), the largest difference between them, and the
floor = bytes of the distinct experts the batch routes to / ``--bandwidth`` (the device's copy
bandwidth; gpu_decode.py measures it). Needs a CUDA device and triton.

    python benchmarks/moe_kernel.py [--tokens 1 8 64 256 1024] [--dtype bfloat16]
        [--experts 128 --top-k 8 --hidden 2048 --inter 768] [--bandwidth 3.0e12]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from services.engine.layers.moe import experts_reference, route


def median_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256, 1024])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s (H200: ~3.0e12)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    from services.engine.layers import triton_moe

    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    e, h, i = args.experts, args.hidden, args.inter
    w13 = (torch.randn(e, 2 * i, h, device="cuda", generator=g) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, i, device="cuda", generator=g) / i**0.5).to(dtype)
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, {e} experts top-{args.top_k}, "
          f"hidden {h}, intermediate {i}")  # fmt: skip
    print("tokens  experts hit  reference ms  fused ms  speed-up  floor ms  max |diff|")
    for t in args.tokens:
        x = torch.randn(t, h, device="cuda", generator=g).to(dtype)
        weights, ids = route(torch.randn(t, e, device="cuda", generator=g).to(dtype),
                             args.top_k, True)  # fmt: skip
        inputs = (x, w13, w2, weights, ids)
        ref_ms = median_ms(lambda a=inputs: experts_reference(*a))
        fused_ms = median_ms(lambda a=inputs: triton_moe.fused_experts(*a))
        diff = (triton_moe.fused_experts(*inputs).float()
                - experts_reference(*inputs).float()).abs().max().item()  # fmt: skip
        hit = int(ids.unique().numel())
        floor_ms = hit * expert_bytes / args.bandwidth * 1000
        print(f"{t:6d}  {hit:11d}  {ref_ms:12.3f}  {fused_ms:8.3f}  {ref_ms / fused_ms:7.2f}x"
              f"  {floor_ms:8.3f}  {diff:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
