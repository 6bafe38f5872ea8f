"""Expert load balancing (EPLB) on a skewed workload: max / mean tokens per rank of each
sparse layer under contiguous experts and after a re-placement, offline, expert parallelism
over 2 ranks (gloo, CPU).

A random Qwen3-MoE-shaped model (small, float32, saved with transformers) is served with
``--tensor-parallel-size 2 --enable-expert-parallel``. The workload is skewed: prompts drawn
from a handful of token ids, so that a few experts of each layer take most tokens. Pass 1
records the load and runs; ``Executor.rebalance_experts`` re-places the experts (``--slots``
physical experts per layer: more than the experts replicates the hottest); pass 2 runs the
same requests on the new placement (prefix caching off: it computes what pass 1 did), its own
load recorded from zero. Printed per pass: the
imbalance the recorded tokens give under the placement that served them, the output tok/s
(on 2 shared cores: noise, not a claim), and whether the greedy outputs are identical.

    .venv/bin/python benchmarks/eplb_skew.py [--experts 16] [--slots 20] [--layers 4]
        [--requests 16] [--input-len 64] [--output-len 16] [--vocab-used 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.random_model import save_random  # noqa: E402
from services.engine import LLM, SamplingParams  # noqa: E402
from services.engine.eplb import imbalance  # noqa: E402
from services.engine.expert_balance import expert_tokens, placements  # noqa: E402


def build_model(out: Path, experts: int, layers: int) -> None:
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=49152, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=experts, num_experts_per_tok=2, norm_topk_prob=True,
        max_position_embeddings=1024, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    save_random(transformers.Qwen3MoeForCausalLM(cfg), out)


def per_layer_imbalance(llm: LLM) -> list[float]:
    """Max / mean tokens per rank of each sparse layer for the load recorded so far, under
    the placement the engine holds now."""
    model = llm.engine.runner.model
    loads = expert_tokens(model)
    return [
        imbalance(p.rank_loads(layer)) for p, layer in zip(placements(model), loads, strict=True)
    ]


def reset_load(llm: LLM) -> None:
    for block in llm.engine.runner.model.moe_blocks:
        block.expert_tokens = None


def timed(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[list, float]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return [o.outputs[0].token_ids for o in outs], time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--slots", type=int, default=20, help="physical experts per layer after")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--vocab-used", type=int, default=8, help="distinct prompt token ids")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    vocab = torch.randint(100, 40000, (args.vocab_used,), generator=g)
    prompts = [vocab[torch.randint(0, args.vocab_used, (args.input_len,), generator=g)].tolist()
               for _ in range(args.requests)]  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp) / "model", args.experts, args.layers)
        llm = LLM(
            str(Path(tmp) / "model"),
            device="cpu",
            dtype="float32",
            tensor_parallel_size=2,
            enable_expert_parallel=True,
            max_num_seqs=args.requests,
            enable_prefix_caching=False,  # pass 2 computes what pass 1 did
        )
        try:
            llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=2))  # warm-up
            reset_load(llm)
            before_tokens, before_s = timed(llm, prompts, params)
            before = per_layer_imbalance(llm)
            start = time.perf_counter()
            report = llm.engine.executor.rebalance_experts(num_slots=args.slots)
            place_s = time.perf_counter() - start
            reset_load(llm)
            after_tokens, after_s = timed(llm, prompts, params)
            after = per_layer_imbalance(llm)
        finally:
            llm.engine.close()
    out_tokens = args.requests * args.output_len
    print(f"{args.requests} requests x {args.input_len} prompt tokens from {args.vocab_used} "
          f"ids / {args.output_len} out, {args.layers} sparse layers x {args.experts} experts, "
          f"top-2, EP over 2 ranks, load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"contiguous ({args.experts // 2} per rank): max/mean tokens per rank by layer "
          f"{[round(x, 3) for x in before]} (mean {sum(before) / len(before):.3f}), "
          f"{out_tokens / before_s:.1f} out tok/s")  # fmt: skip
    print(f"predicted by EPLB from pass 1: {[round(x, 3) for x in report.after]} "
          f"(mean {report.mean_after:.3f}); re-placement took {place_s * 1000:.0f} ms")  # fmt: skip
    print(f"after ({args.slots // 2} slots per rank), pass 2's own load: "
          f"{[round(x, 3) for x in after]} (mean {sum(after) / len(after):.3f}), "
          f"{out_tokens / after_s:.1f} out tok/s")  # fmt: skip
    print(f"greedy outputs identical: {before_tokens == after_tokens}")


if __name__ == "__main__":
    main()
