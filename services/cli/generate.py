"""`epdserve generate "prompt"`: run the engine offline on one or more prompts."""

from __future__ import annotations

import argparse
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epdserve generate", description=__doc__)
    p.add_argument("prompts", nargs="+", help="prompt text (one or more)")
    p.add_argument("--model", default=None, help="HF folder or .gguf file (default: SmolLM2-135M)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from services.engine import LLM, SamplingParams

    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
        llm = LLM(args.model, device=args.device, dtype=args.dtype)
        start = time.perf_counter()
        if args.raw:
            outputs = llm.generate(list(args.prompts), params)
        else:
            outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    tokens = 0
    for prompt, out in zip(args.prompts, outputs, strict=True):
        c = out.outputs[0]
        tokens += len(c.token_ids)
        print(f"> {prompt}\n{c.text}\n[{len(c.token_ids)} tokens, finish: {c.finish_reason}]\n")
    print(
        f"{tokens} tokens in {elapsed:.2f}s ({tokens / max(elapsed, 1e-9):.1f} tok/s)",
        file=sys.stderr,
    )
    return 0
