"""Batched LoRA on the CPU: the same requests run by the base model alone and as a batch mixing
8 adapters, in output tokens/s, interleaved --repeats times (the median round's ratio); with
--layers, the CPU plans of ``services/engine/layers/lora.py`` on one layer.

The adapters are random PEFT folders (all seven target modules) written here for the default
model (SmolLM2-135M) or ``--model``; nothing is downloaded.

    .venv/bin/python benchmarks/lora.py [--requests 32] [--prompt 128] [--output 64] [--layers]
        [--warmup-rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from services.engine import LLM, SamplingParams
from services.engine.layers.lora import LoRABatch, LoRALinear
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


def throughput(llm: LLM, prompts, params, loras) -> tuple[float, float, float]:
    """(output tokens/s, seconds, output tokens per CPU second of this process) of one run
    of every prompt to completion. On a machine others load, the CPU-time rate moves far
    less than the wall-clock one (best with --threads 1: no thread waits for a descheduled
    sibling)."""
    llm.generate(prompts[:2], params, lora=loras[:2])  # warm-up
    t, cpu = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params, lora=loras)
    dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / dt, dt, tokens / dcpu


def layer_plans(rows: int, adapters: int, d_in: int, d_out: int, rank: int) -> str:
    """Time the CPU plans on one layer's shape (us, best of 20): ``rows`` rows over
    ``adapters`` adapters, as decode rows (adapters interleaved: grouped, padded) and as
    prefill chunks (each adapter's rows consecutive: padded, runs)."""
    batch = LoRABatch()
    layer = LoRALinear(lambda x: torch.zeros(x.shape[0], d_out), {None: (0, d_out)}, d_in,
                       adapters, rank, torch.float32, torch.device("cpu"), batch)  # fmt: skip
    layer.a.normal_()
    layer.b.normal_()
    for b_t in layer.b_t:  # the CPU paths' copy of b (one shard here: b transposed)
        b_t.copy_(layer.b.transpose(1, 2))
    x = torch.randn(rows, d_in)

    def best(reps: int = 20) -> float:
        layer(x)
        t = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            layer(x)
            t = min(t, time.perf_counter() - t0)
        batch.groups, batch.runs, batch.padded = [], [], None
        return t * 1e6

    def padded(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        m = -(-rows // adapters)
        src = torch.nonzero(slots == torch.arange(adapters)[:, None])[:, 1]
        return src, src, m

    interleaved = torch.arange(rows) % adapters
    batch.groups = [(s, torch.nonzero(interleaved == s).flatten()) for s in range(adapters)]
    grouped = best()
    batch.padded = padded(interleaved)
    pad_decode = best()
    chunked = torch.arange(rows) * adapters // rows
    batch.padded = padded(chunked)
    pad_chunks = best()
    n = rows // adapters
    batch.runs = [(s * n, (s + 1) * n, s) for s in range(adapters)]
    runs = best()
    return (f"| {rows} | {adapters} | {d_in} x {d_out} | {grouped:.0f} | {pad_decode:.0f} | "
            f"{pad_chunks:.0f} | {runs:.0f} |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--output", type=int, default=64, help="output tokens")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup-rounds", type=int, default=1,
                   help="untimed rounds of every engine on the whole work first: the "
                   "mixed engine's first rounds pay one-time costs (each adapter's first "
                   "slot copy, new GEMM shapes) that a served engine pays once")  # fmt: skip
    p.add_argument("--cpu-linear", default="onednn",
                   help="both engines' linear backend (auto probes each engine on its own: "
                   "on a loaded machine the two may differ)")  # fmt: skip
    p.add_argument(
        "--base-on-lora",
        action="store_true",
        help="also run the base model's requests on the LoRA engine",
    )
    p.add_argument(
        "--torch-plans",
        action="store_true",
        help="also run the mixed batch with the C kernel off (the torch plans), interleaved",
    )
    p.add_argument("--layers", action="store_true", help="also time the plans on one layer")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    cfg = getattr(load_hf_config(path), "text_config", None) or load_hf_config(path)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (args.prompt,), generator=gen).tolist()
               for _ in range(args.requests)]  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=args.output, ignore_eos=True)
    # A KV cache for the run's tokens twice over, not the engine's default share of the
    # machine's memory: three engines of the default size ran a shared 23 GB machine out of
    # memory (the kernel killed the run).
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    per_token = 2 * cfg.num_hidden_layers * (cfg.num_key_value_heads or heads) * head_dim * 4
    kv_bytes = 2 * args.requests * (args.prompt + args.output + 16) * per_token
    common = {"max_num_seqs": args.requests, "enable_prefix_caching": False,
              "cpu_linear": args.cpu_linear, "kv_cache_bytes": kv_bytes}  # fmt: skip
    print(f"{args.requests} requests x {args.prompt} prompt / {args.output} output tokens, "
          f"greedy, torch threads {torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    tmp = tempfile.TemporaryDirectory()
    names = [f"a{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        write_adapter(Path(tmp.name) / name, cfg, args.rank, seed=i)
    base = LLM(args.model, **common)
    mixed = LLM(args.model, **common, max_loras=args.adapters, max_lora_rank=args.rank,
                lora_modules=[f"{n}={Path(tmp.name) / n}" for n in names])  # fmt: skip
    mixed_torch = None
    if args.torch_plans:
        mixed_torch = LLM(args.model, **common, max_loras=args.adapters,
                          max_lora_rank=args.rank,
                          lora_modules=[f"{n}={Path(tmp.name) / n}" for n in names])  # fmt: skip
        mixed_torch.engine.loras.batch.cpu_lib = None  # the torch plans (layers/lora.py)
    print(f"C kernel for decode rows: {mixed.engine.loras.batch.cpu_lib is not None}")
    loras = [names[i % len(names)] for i in range(len(prompts))]
    none = [None] * len(prompts)
    # Interleaved, each round's ratio from its own pair: the machine's other load changes
    # between runs; the median round is the figure.
    runs: dict[str, list[tuple[float, float, float]]] = {
        "base": [], "mixed": [], "mixed_torch": [], "base_on_lora": []
    }  # fmt: skip
    for _ in range(args.warmup_rounds):
        throughput(base, prompts, params, none)
        throughput(mixed, prompts, params, loras)
        if mixed_torch is not None:
            throughput(mixed_torch, prompts, params, loras)
    for _ in range(args.repeats):
        runs["base"].append(throughput(base, prompts, params, none))
        runs["mixed"].append(throughput(mixed, prompts, params, loras))
        if mixed_torch is not None:
            runs["mixed_torch"].append(throughput(mixed_torch, prompts, params, loras))
        if args.base_on_lora:
            runs["base_on_lora"].append(throughput(mixed, prompts, params, none))
    tmp.cleanup()
    pairs = list(zip(runs["base"], runs["mixed"], strict=True))
    ratios = [m[0] / b[0] for b, m in pairs]
    cpu_ratios = sorted(m[2] / b[2] for b, m in pairs)
    mid = sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]
    print("all runs (tok/s):", {k: [round(t[0], 1) for t in v] for k, v in runs.items() if v})
    print("all runs (tok per CPU s):",
          {k: [round(t[2], 1) for t in v] for k, v in runs.items() if v})  # fmt: skip
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print("| run | output tok/s (median round) | seconds | tok per CPU s |")
    print("|---|---:|---:|---:|")
    (base_tps, base_s, base_cpu), (lora_tps, lora_s, lora_cpu) = pairs[mid]
    print(f"| base model, LoRA off | {base_tps:.1f} | {base_s:.2f} | {base_cpu:.1f} |")
    print(f"| {args.adapters} adapters (rank {args.rank}) mixed in the batch | {lora_tps:.1f} "
          f"| {lora_s:.2f} | {lora_cpu:.1f} |")  # fmt: skip
    if runs["mixed_torch"]:
        torch_tps, torch_s, torch_cpu = runs["mixed_torch"][mid]
        print(f"| same, torch plans (C kernel off) | {torch_tps:.1f} | {torch_s:.2f} | "
              f"{torch_cpu:.1f} |")  # fmt: skip
        kernel = sorted(
            m[0] / t[0] for m, t in zip(runs["mixed"], runs["mixed_torch"], strict=True)
        )
        print("C kernel / torch plans per round (wall): "
              + ", ".join(f"{r:.2f}" for r in kernel))  # fmt: skip
        torch_ratios = sorted(
            t[0] / b[0] for b, t in zip(runs["base"], runs["mixed_torch"], strict=True)
        )
        print("torch plans mixed / base per round (wall): "
              + ", ".join(f"{r:.2f}" for r in torch_ratios))  # fmt: skip
    if runs["base_on_lora"]:
        print(f"| base model on the LoRA engine (no adapter rows) | "
              f"{runs['base_on_lora'][mid][0]:.1f} | | |")  # fmt: skip
    print(f"mixed / base: {ratios[mid]:.2f}x wall-clock (median of "
          f"{', '.join(f'{r:.2f}' for r in ratios)}); {cpu_ratios[len(cpu_ratios) // 2]:.2f}x "
          f"in CPU time (median of {', '.join(f'{r:.2f}' for r in cpu_ratios)})")  # fmt: skip
    if not args.layers:
        return
    h, inter = cfg.hidden_size, cfg.intermediate_size
    print(
        "\n| rows | adapters | in x out | grouped (interleaved) | padded (interleaved) | "
        "padded (chunks) | runs (chunks) |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|")
    for rows in (16, 256, 1024):
        for d_in, d_out in ((h, 3 * h), (inter, h)):
            print(layer_plans(rows, args.adapters, d_in, d_out, 3 * args.rank))


if __name__ == "__main__":
    main()
