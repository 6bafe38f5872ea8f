"""Batched LoRA on the CPU: the same requests run by the base model alone and as a batch mixing
8 adapters, in output tokens/s; and the two ways of applying a mixed batch's deltas to one
layer (``services/engine/layers/lora.py``: grouped per adapter, or each row's factors gathered
for a bmm).

The adapters are random PEFT folders (all seven target modules) written here for the default
model (SmolLM2-135M) or ``--model``; nothing is downloaded.

    .venv/bin/python benchmarks/lora.py [--requests 32] [--prompt 128] [--output 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from services.engine import LLM, SamplingParams
from services.engine.layers.lora import LoRABatch, LoRALinear, gathered_delta
from services.engine.model_loader import load_hf_config, resolve_model

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(folder: Path, cfg, rank: int, seed: int) -> None:
    """A random PEFT LoRA adapter of the model with config ``cfg``."""
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv = (cfg.num_key_value_heads or heads) * head_dim
    h, inter = cfg.hidden_size, cfg.intermediate_size
    shapes = {"q_proj": (h, heads * head_dim), "k_proj": (h, kv), "v_proj": (h, kv),
              "o_proj": (heads * head_dim, h), "gate_proj": (h, inter), "up_proj": (h, inter),
              "down_proj": (inter, h)}  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for name, (d_in, d_out) in shapes.items():
            part = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.02
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": list(TARGETS), "bias": "none"}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))


def throughput(llm: LLM, prompts, params, loras) -> tuple[float, float]:
    """(output tokens/s, seconds) of one run of every prompt to completion."""
    llm.generate(prompts[:2], params, lora=loras[:2])  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, params, lora=loras)
    dt = time.perf_counter() - t
    return sum(len(o.outputs[0].token_ids) for o in outs) / dt, dt


def layer_methods(rows: int, adapters: int, d_in: int, d_out: int, rank: int) -> str:
    """Time the grouped and the gathered delta on one layer's shape, ``rows`` rows spread
    over ``adapters`` adapters."""
    batch = LoRABatch()
    layer = LoRALinear(lambda x: torch.zeros(x.shape[0], d_out), {None: (0, d_out)}, d_in,
                       adapters, rank, torch.float32, torch.device("cpu"), batch)  # fmt: skip
    layer.a.normal_()
    layer.b.normal_()
    for b_t in layer.b_t:  # the CPU paths' copy of b (one shard here: b transposed)
        b_t.copy_(layer.b.transpose(1, 2))
    x = torch.randn(rows, d_in)
    slots = torch.arange(rows) % adapters
    batch.groups = [(s, torch.nonzero(slots == s).flatten()) for s in range(adapters)]

    def best(fn, reps: int = 50) -> float:
        fn()
        t = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        return t * 1e6

    g = best(lambda: layer(x))
    m = -(-rows // adapters)
    src = torch.nonzero(slots == torch.arange(adapters)[:, None])[:, 1]
    batch.groups, batch.padded = [], (src, src, m)
    p = best(lambda: layer(x))
    b = best(lambda: gathered_delta(x, layer.a, layer.b, slots))
    return f"| {rows} | {adapters} | {d_in} x {d_out} | {g:.0f} | {p:.0f} | {b:.0f} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--output", type=int, default=64, help="output tokens")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    path = resolve_model(args.model)
    cfg = getattr(load_hf_config(path), "text_config", None) or load_hf_config(path)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (args.prompt,), generator=gen).tolist()
               for _ in range(args.requests)]  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=args.output, ignore_eos=True)
    common = {"max_num_seqs": args.requests, "enable_prefix_caching": False}
    print(f"{args.requests} requests x {args.prompt} prompt / {args.output} output tokens, "
          f"greedy, torch threads {torch.get_num_threads()}")  # fmt: skip
    tmp = tempfile.TemporaryDirectory()
    names = [f"a{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        write_adapter(Path(tmp.name) / name, cfg, args.rank, seed=i)
    base = LLM(args.model, **common)
    mixed = LLM(args.model, **common, max_loras=args.adapters, max_lora_rank=args.rank,
                lora_modules=[f"{n}={Path(tmp.name) / n}" for n in names])  # fmt: skip
    loras = [names[i % len(names)] for i in range(len(prompts))]
    none = [None] * len(prompts)
    # Alternated and best of --repeats: the machine's other load changes between runs.
    runs: dict[str, list[tuple[float, float]]] = {"base": [], "mixed": [], "base_on_lora": []}
    for _ in range(args.repeats):
        runs["base"].append(throughput(base, prompts, params, none))
        runs["mixed"].append(throughput(mixed, prompts, params, loras))
        runs["base_on_lora"].append(throughput(mixed, prompts, params, none))
    tmp.cleanup()
    (base_tps, base_s), (lora_tps, lora_s), (base_on_lora_tps, _) = (
        max(runs[k]) for k in ("base", "mixed", "base_on_lora")
    )
    print("all runs (tok/s):", {k: [round(t, 1) for t, _ in v] for k, v in runs.items()})
    print("| run | output tok/s | seconds |")
    print("|---|---:|---:|")
    print(f"| base model, LoRA off | {base_tps:.1f} | {base_s:.2f} |")
    print(f"| {args.adapters} adapters (rank {args.rank}) mixed in the batch | {lora_tps:.1f} "
          f"| {lora_s:.2f} |")  # fmt: skip
    print(f"| base model on the LoRA engine (no adapter rows) | {base_on_lora_tps:.1f} | |")
    print(f"mixed / base: {lora_tps / base_tps:.2f}x")
    h, inter = cfg.hidden_size, cfg.intermediate_size
    print("\n| rows | adapters | in x out | grouped us | padded bmm us | gathered bmm us |")
    print("|---:|---:|---|---:|---:|---:|")
    for rows in (8, 32, 512):
        for d_in, d_out in ((h, 3 * h), (inter, h)):
            print(layer_methods(rows, args.adapters, d_in, d_out, 3 * args.rank))


if __name__ == "__main__":
    main()
