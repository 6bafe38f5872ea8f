"""`epdserve generate "prompt"`: run the engine offline on one or more prompts."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


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
    constraint = p.add_mutually_exclusive_group()
    constraint.add_argument(
        "--json-schema",
        default=None,
        metavar="SCHEMA",
        help="constrain the output to this JSON schema (JSON text, or @FILE)",
    )
    constraint.add_argument(
        "--json-object", action="store_true", help="constrain the output to a JSON object"
    )
    constraint.add_argument("--regex", default=None, help="constrain the output to this regex")
    constraint.add_argument(
        "--choice",
        action="append",
        default=None,
        metavar="TEXT",
        help="constrain the output to one of these (repeat the flag)",
    )
    return p  # fmt: skip


def structured(args: argparse.Namespace) -> Any:
    """The StructuredOutputsParams the flags ask for, or None; ValueError for a bad schema."""
    from services.engine import StructuredOutputsParams

    if args.json_schema is not None:
        text = args.json_schema
        if text.startswith("@"):
            text = Path(text[1:]).read_text()
        try:
            return StructuredOutputsParams(json=json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"--json-schema is not valid JSON: {e}") from None
    if args.json_object:
        return StructuredOutputsParams(json_object=True)
    if args.regex is not None:
        return StructuredOutputsParams(regex=args.regex)
    if args.choice:
        return StructuredOutputsParams(choice=args.choice)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from services.engine import LLM, SamplingParams

    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            seed=args.seed,
            structured_outputs=structured(args),
        )
        llm = LLM(args.model, device=args.device, dtype=args.dtype)
        start = time.perf_counter()
        if args.raw:
            outputs = llm.generate(list(args.prompts), params)
        else:
            outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    except (ValueError, OSError) as e:
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
