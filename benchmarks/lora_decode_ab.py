"""Decode-dominated A/B of batched LoRA on the CPU: the base model, 8 adapters mixed with the C
kernel (layers/cpu_lora.py), and the same with the torch plans, in alternating order, one torch
thread. With --realtime the measured runs (not the loading) run at SCHED_FIFO 10, as
``chrt -f 10`` would: on a machine others load, only then do the three rates hold still from
round to round. Keep it short (it holds one core): 32 requests x 16 / 32 tokens, 4 rounds ~45 s.

    PYTHONPATH=. .venv/bin/python benchmarks/lora_decode_ab.py [--rounds 4] [--realtime]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.lora import write_adapter
from services.engine import LLM, SamplingParams
from services.engine.model_loader import load_hf_config, resolve_model


def _set_policy(policy: int, priority: int) -> None:
    for tid in os.listdir("/proc/self/task"):  # every thread, OpenMP's included
        try:
            os.sched_setscheduler(int(tid), policy, os.sched_param(priority))
        except OSError as exc:
            print(f"thread {tid}: {exc}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--output", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--realtime", action="store_true", help="measured runs at SCHED_FIFO 10")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_hf_config(resolve_model(None))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (args.prompt,), generator=gen).tolist()
               for _ in range(args.requests)]  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=args.output, ignore_eos=True)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    kv = 2 * args.requests * (args.prompt + args.output + 16) * per_token
    common = {"max_num_seqs": args.requests, "enable_prefix_caching": False,
              "cpu_linear": "onednn", "kv_cache_bytes": kv}  # fmt: skip
    tmp = tempfile.TemporaryDirectory()
    names = [f"a{i}" for i in range(8)]
    for i, n in enumerate(names):
        write_adapter(Path(tmp.name) / n, cfg, 16, seed=i)
    mods = [f"{n}={Path(tmp.name) / n}" for n in names]
    base = LLM(None, **common)
    kernel = LLM(None, **common, max_loras=8, max_lora_rank=16, lora_modules=mods)
    plans = LLM(None, **common, max_loras=8, max_lora_rank=16, lora_modules=mods)
    plans.engine.loras.batch.cpu_lib = None  # the torch plans
    if kernel.engine.loras.batch.cpu_lib is None:
        raise SystemExit("the C kernel did not build here (no C compiler?)")
    loras = [names[i % 8] for i in range(args.requests)]
    engines = [("base", base, [None] * args.requests), ("kernel", kernel, loras),
               ("torch plans", plans, loras)]  # fmt: skip
    for _, llm, lora in engines:
        llm.generate(prompts[:4], params, lora=lora[:4])  # warm-up
    print(f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
    rates: dict[str, list[float]] = {name: [] for name, _, _ in engines}
    tokens: dict[str, list[list[int]]] = {}
    if args.realtime:
        _set_policy(os.SCHED_FIFO, 10)
    try:
        for r in range(args.rounds):
            for name, llm, lora in engines if r % 2 == 0 else engines[::-1]:
                t = time.perf_counter()
                outs = llm.generate(prompts, params, lora=lora)
                n = sum(len(o.outputs[0].token_ids) for o in outs)
                rates[name].append(n / (time.perf_counter() - t))
                tokens[name] = [list(o.outputs[0].token_ids) for o in outs]
    finally:
        if args.realtime:
            _set_policy(os.SCHED_OTHER, 0)
    tmp.cleanup()
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print("kernel tokens == torch plans tokens:", tokens["kernel"] == tokens["torch plans"])
    for name, v in rates.items():
        print(f"{name}: tok/s per round " + ", ".join(f"{x:.1f}" for x in v))
    for r in range(args.rounds):
        b, k, t = (rates[n][r] for n in ("base", "kernel", "torch plans"))
        print(f"round {r}: kernel/base {k / b:.2f}, torch plans/base {t / b:.2f}, "
              f"kernel/torch plans {k / t:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
