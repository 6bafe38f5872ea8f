"""GPU: our engine against transformers, and decode step time against the memory floor.

For a model shape (random bf16 weights; nothing is downloaded), in one process:

1. the device-to-device copy bandwidth (bytes read + written per second, CUDA events);
2. offline throughput: ``--num-prompts`` random prompts through our engine and through
   transformers' batched ``generate`` on the *same* weights (the transformers model is built
   on the GPU and its tensors are copied into an engine made with ``load_format="dummy"``),
   as ``benchmarks/offline.py`` does on the CPU;
3. the decode step at each ``--batch-sizes`` with prompts of ``--context`` tokens: the median
   time of the model's forward (``ModelRunner.execute``, synchronized) and of the whole engine
   step (scheduling, sampling, detokenizing too), with CUDA graphs and eagerly, against the
   floor = (weight bytes read + KV bytes read) / copy bandwidth. Weight bytes are every
   parameter but an untied input embedding (a decode reads only B rows of it).

    python benchmarks/gpu_decode.py --shape llama3-8b --json /tmp/llama3-8b.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import offline  # noqa: E402

# Hugging Face config fields of the shapes (their published config.json values).
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2.5-0.5b": (
        "Qwen2Config",
        dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
    ),
    "llama3-8b": (
        "LlamaConfig",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--tokenizer", default=None, help="folder with tokenizer files (default: the "
                   "embedded model's)")  # fmt: skip
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--context", type=int, default=512, help="prompt tokens in the decode runs")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--kv-cache-bytes", type=int, default=8 << 30)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE")
    return p.parse_args(argv)


def copy_bandwidth(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Bytes read + written per second by device-to-device copies."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes * iters / seconds


def model_folder(shape: str, tokenizer: str | None, out: Path) -> Path:
    """config.json of the shape + a tokenizer (ids past its vocabulary decode to '')."""
    import transformers

    from services.engine.model_loader import resolve_model

    cls_name, fields = SHAPES[shape]
    cfg = getattr(transformers, cls_name)(**fields, bos_token_id=1, eos_token_id=2)
    cfg.architectures = [cls_name.replace("Config", "ForCausalLM")]
    cfg.save_pretrained(str(out))
    src = Path(tokenizer or resolve_model(None))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    return out


def build_models(folder: Path, args: argparse.Namespace) -> tuple[Any, Any]:
    """A random transformers model on the GPU and our engine holding the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from services.engine import LLM

    cfg = AutoConfig.from_pretrained(str(folder))
    torch.manual_seed(args.seed)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    llm = LLM(
        str(folder),
        device="cuda",
        dtype="bfloat16",
        load_format="dummy",
        kv_cache_bytes=args.kv_cache_bytes,
        max_num_seqs=max(args.num_prompts, *args.batch_sizes),
        max_model_len=max(
            args.context + 2 * args.decode_steps + 2, args.input_len + args.output_len
        )
        + 1024,
        seed=args.seed,
    )
    with torch.no_grad():
        llm.engine.runner.model.load_weights(hf.state_dict().items())
    return hf, llm


def weight_bytes(model: torch.nn.Module, tied: bool) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not tied:  # the input embedding: a decode step reads B rows of it, not the table
        emb = model.model.embed_tokens.weight
        total -= emb.numel() * emb.element_size()
    return total


def decode_run(llm: Any, batch: int, context: int, steps: int, seed: int) -> dict[str, float]:
    """Median decode-only step times (ms) and the mean context length during them."""
    from services.engine import SamplingParams

    engine, runner = llm.engine, llm.engine.runner
    vocab = runner.model.lm_head.out_features
    engine.block_manager.reset_prefix_cache()
    # Every request decodes until the last prompt is in: `steps` full-batch steps follow.
    budget = engine.config.max_num_batched_tokens
    prefill_steps = -(-batch * context // budget)
    params = SamplingParams(temperature=0, max_tokens=steps + prefill_steps + 1, ignore_eos=True)
    for i, prompt in enumerate(offline.make_prompts(batch, context, vocab, seed)):
        engine.add_request(f"decode-{batch}-{i}", prompt, params)
    model_ms: list[float] = []
    step_ms: list[float] = []
    ctx: list[float] = []
    inner = runner.execute

    def timed(scheduled: Any, *rest: Any) -> Any:
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = inner(scheduled, *rest)
        torch.cuda.synchronize()
        if all(s.num_new_tokens == 1 for s in scheduled) and len(scheduled) == batch:
            model_ms.append(1e3 * (time.perf_counter() - t))
            ctx.append(statistics.fmean(s.seq.num_computed_tokens + 1 for s in scheduled))
        return out

    runner.execute = timed  # type: ignore[method-assign]
    try:
        while engine.has_unfinished_requests():
            n = len(model_ms)
            t = time.perf_counter()
            engine.step()
            if len(model_ms) > n:
                step_ms.append(1e3 * (time.perf_counter() - t))
    finally:
        runner.execute = inner  # type: ignore[method-assign]
    return {
        "model_ms": statistics.median(model_ms),
        "step_ms": statistics.median(step_ms),
        "mean_context": statistics.fmean(ctx),
        "num_steps": len(model_ms),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_decode.py needs a CUDA device")
    result: dict[str, Any] = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
    }
    bw = copy_bandwidth()
    result["copy_bandwidth_GBps"] = bw / 1e9
    print(f"{result['device']}: device-to-device copy {bw / 1e9:.0f} GB/s (read + write)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args.shape, args.tokenizer, Path(tmp))
        t0 = time.perf_counter()
        hf, llm = build_models(folder, args)
        runner = llm.engine.runner
        print(f"models built in {time.perf_counter() - t0:.1f} s; graphs for {runner.graphs.sizes}")
        # --- throughput against transformers on the same weights -----------------------------
        ns = argparse.Namespace(
            device="cuda", dtype="bfloat16", output_len=args.output_len, hf_batch_size=None
        )
        vocab = runner.model.lm_head.out_features
        prompts = offline.make_prompts(args.num_prompts, args.input_len, vocab, args.seed)
        ours = offline.EngineBench(ns, prompts, llm=llm).run()
        line = f"epdserve {ours['output_tok_s']:.0f} tok/s"
        result["epdserve_tok_s"] = ours["output_tok_s"]
        if not args.skip_hf:
            ref = offline.HFBench(ns, str(folder), prompts, model=hf).run()
            check = offline.compare(ours["tokens"][:8], ref["tokens"][:8], [2])
            result.update(
                transformers_tok_s=ref["output_tok_s"],
                ratio=ours["output_tok_s"] / ref["output_tok_s"],
                greedy_check=check,
            )
            line += (
                f", transformers {ref['output_tok_s']:.0f} tok/s: {result['ratio']:.2f}x; "
                f"greedy: {check['agree']}/{check['checked']} identical "
                f"(first differences at {[m['first_diff'] for m in check['mismatches']]})"
            )
        print(f"N={args.num_prompts} in={args.input_len} out={args.output_len}: {line}")
        cfg = hf.config
        tied = bool(cfg.tie_word_embeddings)
        del hf
        torch.cuda.empty_cache()
        # --- decode step against the floor -----------------------------------------------------
        wbytes = weight_bytes(runner.model, tied)
        kv_per_token = runner.bytes_per_block // runner.block_size
        result["weight_bytes"] = wbytes
        rows = []
        graphs = runner.graphs
        for batch in args.batch_sizes:
            for mode in ("graphs", "eager"):
                runner.graphs = graphs if mode == "graphs" else None
                r = decode_run(llm, batch, args.context, args.decode_steps, args.seed + batch)
                kv_bytes = batch * r["mean_context"] * kv_per_token
                floor_ms = 1e3 * (wbytes + kv_bytes) / bw
                row = {
                    "batch": batch,
                    "mode": mode,
                    **r,
                    "kv_bytes": kv_bytes,
                    "floor_ms": floor_ms,
                    "model_over_floor": r["model_ms"] / floor_ms,
                    "step_over_floor": r["step_ms"] / floor_ms,
                }
                rows.append(row)
                print(
                    f"batch {batch:3d} {mode:6s}: model {r['model_ms']:7.2f} ms, step "
                    f"{r['step_ms']:7.2f} ms, floor {floor_ms:6.2f} ms "
                    f"({wbytes / 1e9:.2f} GB weights + {kv_bytes / 1e9:.2f} GB KV) -> "
                    f"model/floor {row['model_over_floor']:.2f}, "
                    f"step/floor {row['step_over_floor']:.2f}"
                )
        runner.graphs = graphs
        result["decode"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
