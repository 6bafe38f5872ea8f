"""Offline throughput: our engine against transformers' batched ``generate`` on one model.

N requests of random token ids (fixed seed) with the same input and output lengths go
through ``services.engine.LLM`` and through ``AutoModelForCausalLM.generate`` (left padding,
greedy, exactly ``--output-len`` new tokens) in the same process. Both models are loaded and
warmed up first; then each round times our engine and then transformers, so that on a shared
machine both see the same background load (``--repeat`` rounds; the fastest run of each
counts). Prints output tokens/s of each, their ratio, the engine's mean step time, and how
many of the first requests produce the same greedy tokens in both (a check, never a failure).

    .venv/bin/python benchmarks/offline.py --num-prompts 64 --input-len 128 --output-len 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
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
    p.add_argument("--repeat", type=int, default=1, help="timed rounds; the fastest run counts")
    p.add_argument("--num-check", type=int, default=8, help="requests compared token by token")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    args = p.parse_args(argv)
    for name in ("num_prompts", "input_len", "output_len", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
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
    return kwargs


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def warmup_prompts(prompts: list[list[int]]) -> list[list[int]]:
    """Short prompts the timed runs never see (no prefix-cache hits)."""
    return [p[: max(2, len(p) // 4)][::-1] for p in prompts[:2]]


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads. Unlike wall time it barely moves
    when other processes compete for the cores (busy-waiting OpenMP threads do count)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class EngineBench:
    """Our engine, with per-step timings: the whole step (schedule + model + sample +
    detokenize) and the model runner's share, decode-only steps kept apart."""

    def __init__(self, args: argparse.Namespace, prompts: list[list[int]], llm: Any = None) -> None:
        from services.engine import LLM, SamplingParams

        self.device = args.device
        self.prompts = prompts
        self.llm = llm or LLM(model=args.model, **engine_kwargs(args))
        self.params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        self.llm.generate(warmup_prompts(prompts), self.params)
        self.step_s: list[float] = []
        self.exec_s: list[float] = []
        self.decode_only: list[bool] = []
        engine, runner = self.llm.engine, self.llm.engine.runner
        inner_step, inner_execute = engine.step, runner.execute

        def timed_step() -> Any:
            t = time.perf_counter()
            out = inner_step()
            _sync(self.device)
            self.step_s.append(time.perf_counter() - t)
            return out

        def timed_execute(scheduled: Any, *rest: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            out = inner_execute(scheduled, *rest, **kw)
            self.exec_s.append(time.perf_counter() - t)
            self.decode_only.append(all(s.num_new_tokens == 1 for s in scheduled))
            return out

        engine.step = timed_step  # type: ignore[method-assign]
        runner.execute = timed_execute  # type: ignore[method-assign]

    def run(self) -> dict[str, Any]:
        self.step_s.clear()
        self.exec_s.clear()
        self.decode_only.clear()
        # Random prompts share no prefix, but a repeat would hit the previous run's blocks.
        self.llm.engine.block_manager.reset_prefix_cache()
        _sync(self.device)
        t0, c0 = time.perf_counter(), cpu_seconds()
        outs = self.llm.generate(self.prompts, self.params)
        _sync(self.device)
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        n_out = sum(len(t) for t in tokens)
        pairs = list(zip(self.step_s, self.exec_s, self.decode_only, strict=False))
        dec_steps = [s for s, _, d in pairs if d]
        dec_exec = [x for _, x, d in pairs if d]
        return {
            "elapsed_s": elapsed,
            "output_tokens": n_out,
            "output_tok_s": n_out / elapsed,
            "cpu_s": cpu,
            "output_tok_per_cpu_s": n_out / cpu,
            "num_steps": len(self.step_s),
            "mean_step_ms": 1e3 * statistics.fmean(self.step_s),
            "mean_decode_step_ms": 1e3 * statistics.fmean(dec_steps) if dec_steps else None,
            "mean_decode_model_ms": 1e3 * statistics.fmean(dec_exec) if dec_exec else None,
            "num_decode_steps": len(dec_steps),
            "prefill_steps_total_s": sum(self.step_s) - sum(dec_steps),
            "tokens": tokens,
        }

    @property
    def eos_token_ids(self) -> list[int]:
        return sorted(self.llm.engine.eos_token_ids)


class HFBench:
    """transformers' batched generate: left padding, greedy, exactly output-len new tokens."""

    def __init__(
        self, args: argparse.Namespace, folder: str, prompts: list[list[int]], model: Any = None
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if model is None:  # else a model already built (benchmarks/gpu_decode.py)
            dtype = getattr(torch, args.dtype)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device)
        self.model = model.eval()
        tok = AutoTokenizer.from_pretrained(folder)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.batch_size = args.hf_batch_size or len(prompts)
        self.device = args.device
        self.output_len = args.output_len
        self.prompts = prompts
        self.generate(warmup_prompts(prompts), 4)

    def generate(self, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):  # left padding
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=self.pad_id,
            )
        return out[:, width:].tolist()

    def run(self) -> dict[str, Any]:
        _sync(self.device)
        t0, c0 = time.perf_counter(), cpu_seconds()
        tokens: list[list[int]] = []
        for start in range(0, len(self.prompts), self.batch_size):
            tokens.extend(
                self.generate(self.prompts[start : start + self.batch_size], self.output_len)
            )
        _sync(self.device)
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        n_out = sum(len(t) for t in tokens)
        return {
            "elapsed_s": elapsed,
            "output_tokens": n_out,
            "output_tok_s": n_out / elapsed,
            "cpu_s": cpu,
            "output_tok_per_cpu_s": n_out / cpu,
            "batch_size": self.batch_size,
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


def _strip(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "tokens"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
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
    ours_bench = EngineBench(args, prompts)
    hf_bench = None if args.skip_hf else HFBench(args, folder, prompts)

    rounds: list[dict[str, Any]] = []
    best_ours: dict[str, Any] | None = None
    best_hf: dict[str, Any] | None = None
    for r in range(args.repeat):
        # Other processes on the machine skew every number: record how busy it was.
        entry: dict[str, Any] = {"loadavg_1min_before": os.getloadavg()[0]}
        ours = ours_bench.run()
        entry["epdserve_tok_s"] = ours["output_tok_s"]
        entry["epdserve_cpu_s"] = ours["cpu_s"]
        print(
            f"[round {r + 1}] epdserve:     {ours['output_tok_s']:8.1f} output tok/s  "
            f"({ours['output_tokens']} tokens in {ours['elapsed_s']:.2f} s, "
            f"{ours['cpu_s']:.1f} CPU s, {ours['num_steps']} steps, mean step {ours['mean_step_ms']:.1f} ms, mean decode "
            f"step {ours['mean_decode_step_ms'] or 0:.1f} ms of which model "
            f"{ours['mean_decode_model_ms'] or 0:.1f} ms)",
            flush=True,
        )
        if best_ours is None or ours["elapsed_s"] < best_ours["elapsed_s"]:
            best_ours = ours
        if hf_bench is not None:
            ref = hf_bench.run()
            entry["transformers_tok_s"] = ref["output_tok_s"]
            entry["transformers_cpu_s"] = ref["cpu_s"]
            entry["ratio"] = ours["output_tok_s"] / ref["output_tok_s"]
            entry["cpu_ratio"] = ref["cpu_s"] / ours["cpu_s"]
            print(
                f"[round {r + 1}] transformers: {ref['output_tok_s']:8.1f} output tok/s  "
                f"({ref['output_tokens']} tokens in {ref['elapsed_s']:.2f} s, "
                f"{ref['cpu_s']:.1f} CPU s, batch {ref['batch_size']}); ratio {entry['ratio']:.2f}x "
                f"(by CPU time {entry['cpu_ratio']:.2f}x)",
                flush=True,
            )
            if best_hf is None or ref["elapsed_s"] < best_hf["elapsed_s"]:
                best_hf = ref
        entry["loadavg_1min_after"] = os.getloadavg()[0]
        rounds.append(entry)
    assert best_ours is not None

    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "model_folder": folder,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "rounds": rounds,
        "epdserve": _strip(best_ours),
    }
    print(f"epdserve:     {best_ours['output_tok_s']:8.1f} output tok/s (best of {args.repeat})")
    print(
        f"              mean step {best_ours['mean_step_ms']:.1f} ms over "
        f"{best_ours['num_steps']} steps; mean decode step "
        f"{best_ours['mean_decode_step_ms'] or 0:.1f} ms "
        f"(model {best_ours['mean_decode_model_ms'] or 0:.1f} ms)"
    )
    if best_hf is not None:
        ratio = best_ours["output_tok_s"] / best_hf["output_tok_s"]
        k = min(args.num_check, len(prompts))
        check = compare(best_ours["tokens"][:k], best_hf["tokens"][:k], ours_bench.eos_token_ids)
        print(f"transformers: {best_hf['output_tok_s']:8.1f} output tok/s (best of {args.repeat})")
        cpu_ratio = min(e["transformers_cpu_s"] for e in rounds) / min(
            e["epdserve_cpu_s"] for e in rounds
        )
        print(f"ratio:        {ratio:8.2f}x  (by least CPU time: {cpu_ratio:.2f}x)")
        print(f"greedy check: {check['agree']}/{check['checked']} requests identical")
        for m in check["mismatches"]:
            print(
                f"  request {m['request']}: first difference at output token {m['first_diff']}"
                f"{' (ours: EOS)' if m['ours_is_eos'] else ''}"
            )
        result["transformers"] = _strip(best_hf)
        result["ratio"] = ratio
        result["cpu_ratio"] = cpu_ratio
        result["greedy_check"] = check
    loads = [x for e in rounds for x in (e["loadavg_1min_before"], e["loadavg_1min_after"])]
    print(f"load average (1 min) around the rounds: {' '.join(f'{x:.2f}' for x in loads)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
