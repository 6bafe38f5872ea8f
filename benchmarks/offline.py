"""Offline throughput: our engine against transformers' batched ``generate`` on one model.

N requests of random token ids (fixed seed) with the same input and output lengths go
through ``services.engine.LLM`` and through ``AutoModelForCausalLM.generate`` (left padding,
greedy, exactly ``--output-len`` new tokens) in the same process, one after the other.
Prints output tokens/s of each, their ratio, the engine's mean step time, and how many of
the first requests produce the same greedy tokens in both (a sanity check, never a failure).

    .venv/bin/python benchmarks/offline.py --num-prompts 64 --input-len 128 --output-len 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from typing import Any

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded model)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: --num-prompts")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="engine default")
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="engine default")
    p.add_argument("--hf-batch-size", type=int, default=None, help="default: --num-prompts")
    p.add_argument("--skip-hf", action="store_true", help="run only our engine")
    p.add_argument("--num-check", type=int, default=8, help="requests compared token by token")
    p.add_argument("--repeat", type=int, default=1, help="timed runs of each; the fastest counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    args = p.parse_args(argv)
    for name in ("num_prompts", "input_len", "output_len", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_engine(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    from services.engine import LLM, SamplingParams

    kwargs: dict[str, Any] = {
        "dtype": args.dtype,
        "device": args.device,
        "max_num_seqs": args.max_num_seqs or args.num_prompts,
        "seed": args.seed,
    }
    if args.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.kv_cache_bytes is not None:
        kwargs["kv_cache_bytes"] = args.kv_cache_bytes
    llm = LLM(model=args.model, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)

    # Warm-up (allocator, kernels, lazy imports) on prompts the timed run never sees, with the
    # prefix cache reset so that nothing carries over.
    llm.generate([p[: max(2, len(p) // 4)][::-1] for p in prompts[:2]], params)
    llm.engine.block_manager.reset_prefix_cache()

    # Per-step timings: the whole step (schedule + model + sample + detokenize) and, inside
    # it, the model runner's share; decode-only steps are kept apart from prefill steps.
    engine, runner = llm.engine, llm.engine.runner
    step_s: list[float] = []
    exec_s: list[float] = []
    decode_only: list[bool] = []
    inner_step, inner_execute = engine.step, runner.execute

    def timed_step() -> Any:
        t = time.perf_counter()
        out = inner_step()
        _sync(args.device)
        step_s.append(time.perf_counter() - t)
        return out

    def timed_execute(scheduled: Any, *rest: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        out = inner_execute(scheduled, *rest, **kw)
        exec_s.append(time.perf_counter() - t)
        decode_only.append(all(s.num_new_tokens == 1 for s in scheduled))
        return out

    engine.step = timed_step  # type: ignore[method-assign]
    runner.execute = timed_execute  # type: ignore[method-assign]
    best: tuple[float, list[float], list[float], list[bool], Any] | None = None
    for _ in range(args.repeat):
        step_s.clear()
        exec_s.clear()
        decode_only.clear()
        # Random prompts share no prefix, but a repeat would hit the previous run's blocks.
        llm.engine.block_manager.reset_prefix_cache()
        _sync(args.device)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        _sync(args.device)
        elapsed = time.perf_counter() - t0
        if best is None or elapsed < best[0]:
            best = (elapsed, list(step_s), list(exec_s), list(decode_only), outs)
    engine.step, runner.execute = inner_step, inner_execute  # type: ignore[method-assign]
    assert best is not None
    elapsed, step_s, exec_s, decode_only, outs = best

    tokens = [list(o.outputs[0].token_ids) for o in outs]
    n_out = sum(len(t) for t in tokens)
    dec_steps = [s for s, d in zip(step_s, decode_only, strict=False) if d]
    dec_exec = [s for s, d in zip(exec_s, decode_only, strict=False) if d]
    return {
        "elapsed_s": elapsed,
        "output_tokens": n_out,
        "output_tok_s": n_out / elapsed,
        "num_steps": len(step_s),
        "mean_step_ms": 1e3 * statistics.fmean(step_s),
        "mean_decode_step_ms": 1e3 * statistics.fmean(dec_steps) if dec_steps else None,
        "mean_decode_model_ms": 1e3 * statistics.fmean(dec_exec) if dec_exec else None,
        "num_prefill_steps": len(step_s) - len(dec_steps),
        "prefill_steps_total_s": sum(step_s) - sum(dec_steps),
        "eos_token_ids": sorted(engine.eos_token_ids),
        "tokens": tokens,
    }


def run_hf(args: argparse.Namespace, folder: str, prompts: list[list[int]]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    bs = args.hf_batch_size or len(prompts)
    out_len = args.output_len

    def generate(batch: list[list[int]], new_tokens: int) -> list[list[int]]:
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):  # left padding
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(args.device),
                attention_mask=mask.to(args.device),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=pad_id,
            )
        return out[:, width:].tolist()

    generate([p[: max(2, len(p) // 4)][::-1] for p in prompts[:2]], 4)  # warm-up
    elapsed = float("inf")
    tokens: list[list[int]] = []
    for _ in range(args.repeat):
        _sync(args.device)
        t0 = time.perf_counter()
        tokens = []
        for start in range(0, len(prompts), bs):
            tokens.extend(generate(prompts[start : start + bs], out_len))
        _sync(args.device)
        elapsed = min(elapsed, time.perf_counter() - t0)
    n_out = sum(len(t) for t in tokens)
    return {
        "elapsed_s": elapsed,
        "output_tokens": n_out,
        "output_tok_s": n_out / elapsed,
        "batch_size": bs,
        "tokens": tokens,
    }


def compare(ours: list[list[int]], ref: list[list[int]], eos: list[int]) -> dict[str, Any]:
    """Greedy agreement of the first requests; for a mismatch, where it starts and whether our
    token there is an EOS (transformers bans EOS under min_new_tokens; ignore_eos does not)."""
    agree = 0
    mismatches = []
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        if a == b:
            agree += 1
            continue
        pos = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        pos = min(len(a), len(b)) if pos is None else pos
        ours_tok = a[pos] if pos < len(a) else None
        mismatches.append({"request": i, "first_diff": pos, "ours_is_eos": ours_tok in eos})
    return {"checked": len(ours), "agree": agree, "mismatches": mismatches}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from services.engine.model_loader import load_hf_config, resolve_model

    folder = resolve_model(args.model)
    vocab = int(load_hf_config(folder).vocab_size)
    prompts = make_prompts(args.num_prompts, args.input_len, vocab, args.seed)
    print(
        f"model={folder} N={args.num_prompts} in={args.input_len} out={args.output_len} "
        f"dtype={args.dtype} device={args.device} torch={torch.__version__} "
        f"threads={torch.get_num_threads()}",
        flush=True,
    )

    load = [os.getloadavg()[0]]
    ours = run_engine(args, prompts)
    load.append(os.getloadavg()[0])
    print(
        f"epdserve:     {ours['output_tok_s']:8.1f} output tok/s  "
        f"({ours['output_tokens']} tokens in {ours['elapsed_s']:.2f} s, {ours['num_steps']} steps, "
        f"mean step {ours['mean_step_ms']:.1f} ms, mean decode step "
        f"{ours['mean_decode_step_ms'] or 0:.1f} ms of which model {ours['mean_decode_model_ms'] or 0:.1f} ms)",
        flush=True,
    )
    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "model_folder": folder,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "epdserve": {k: v for k, v in ours.items() if k != "tokens"},
    }
    if not args.skip_hf:
        ref = run_hf(args, folder, prompts)
        load.append(os.getloadavg()[0])
        ratio = ours["output_tok_s"] / ref["output_tok_s"]
        k = min(args.num_check, len(prompts))
        check = compare(ours["tokens"][:k], ref["tokens"][:k], ours["eos_token_ids"])
        print(
            f"transformers: {ref['output_tok_s']:8.1f} output tok/s  "
            f"({ref['output_tokens']} tokens in {ref['elapsed_s']:.2f} s, batch {ref['batch_size']})",
            flush=True,
        )
        print(f"ratio:        {ratio:8.2f}x", flush=True)
        print(f"greedy check: {check['agree']}/{check['checked']} requests identical", flush=True)
        for m in check["mismatches"]:
            print(
                f"  request {m['request']}: first difference at output token {m['first_diff']}"
                f"{' (ours: EOS)' if m['ours_is_eos'] else ''}"
            )
        result["transformers"] = {k: v for k, v in ref.items() if k != "tokens"}
        result["ratio"] = ratio
        result["greedy_check"] = check
    # Other processes on the machine skew every number: say how busy it was.
    print(f"load average (1 min) before/after each: {' '.join(f'{x:.2f}' for x in load)}")
    result["loadavg_1min"] = load
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
