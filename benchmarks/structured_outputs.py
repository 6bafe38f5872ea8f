"""Cost of structured outputs: the same batch decoded with and without a JSON-schema
constraint, in one process on one engine.

N prompts of random token ids (fixed seed) are generated greedily, constrained to a schema
whose string field is exactly ``--output-len`` characters long, and plain, where each request
generates (``ignore_eos``) exactly as many tokens as its constrained run did: both runs then
schedule the same batches, step for step, and differ only by the constraint. Rounds alternate
plain / constrained so that both see the same background load; the fastest run of each
counts. Reports output tokens/s of each and their ratio, the mean engine step time, the time
spent building masks per step (``structured_output.apply_masks``), and the one-time cost of a
grammar and of the engine's first constraint (llguidance's tokenizer and token trie).

    .venv/bin/python benchmarks/structured_outputs.py --num-prompts 32 --output-len 64
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

from services.engine import LLM, SamplingParams, StructuredOutputsParams
from services.engine import sampler as sampler_mod


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded model)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeat", type=int, default=2, help="rounds; the fastest run counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    args = p.parse_args(argv)
    for name in ("num_prompts", "input_len", "output_len", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def schema(chars: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 999},
            "kind": {"enum": ["a", "b"]},
            "text": {"type": "string", "minLength": chars, "maxLength": chars},
        },
        "required": ["id", "kind", "text"],
        "additionalProperties": False,
    }


class StepTimer:
    """Wall time and count of ``LLMEngine.step`` calls."""

    def __init__(self, engine: Any) -> None:
        self.seconds = 0.0
        self.steps = 0
        inner = engine.step

        def timed() -> Any:
            t = time.perf_counter()
            try:
                return inner()
            finally:
                self.seconds += time.perf_counter() - t
                self.steps += 1

        engine.step = timed

    def reset(self) -> None:
        self.seconds, self.steps = 0.0, 0


class MaskTimer:
    """Wall time spent in ``apply_masks`` (wrapped where the sampler calls it)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._inner = sampler_mod.apply_masks
        sampler_mod.apply_masks = self._timed  # type: ignore[assignment]

    def _timed(self, logits: Any, seqs: Any) -> Any:
        t = time.perf_counter()
        try:
            return self._inner(logits, seqs)
        finally:
            self.seconds += time.perf_counter() - t
            self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def run(
    llm: LLM,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    timer: MaskTimer,
    steps: StepTimer,
) -> dict:
    timer.reset()
    steps.reset()
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "seconds": wall,
        "output_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "mask_ms_per_step": 1000 * timer.seconds / max(timer.calls, 1),
        "step_ms": 1000 * steps.seconds / max(steps.steps, 1),
        "steps": steps.steps,
        "texts": [o.outputs[0].text for o in outs],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    llm = LLM(model=args.model, device=args.device, dtype=args.dtype,
              max_num_seqs=args.num_prompts, seed=args.seed)  # fmt: skip
    vocab = len(llm.tokenizer)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)]
               for _ in range(args.num_prompts)]  # fmt: skip
    shape = StructuredOutputsParams(json=schema(args.output_len))
    constrained = SamplingParams(
        temperature=0, max_tokens=args.output_len * 4, structured_outputs=shape
    )
    timer = MaskTimer()
    engine = llm.engine
    steps = StepTimer(engine)
    t = time.perf_counter()
    engine.structured.prepare(StructuredOutputsParams(json_object=True))  # tokenizer + trie
    first_use_s = time.perf_counter() - t
    t = time.perf_counter()
    engine.structured.prepare(shape)
    compile_s = time.perf_counter() - t
    # Each request's constrained output length, for the plain run to generate as many.
    lengths = [len(o.outputs[0].token_ids) for o in llm.generate(prompts, constrained)]
    plain = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for name, params in (("plain", plain), ("constrained", constrained)):
            r = run(llm, prompts, params, timer, steps)
            if name not in best or r["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = r
    valid = 0
    for text in best["constrained"]["texts"]:
        try:
            value = json.loads(text)
            valid += len(value["text"]) == args.output_len and value["kind"] in ("a", "b")
        except (ValueError, KeyError, TypeError):
            pass
    result = {
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "plain_tokens_per_s": round(best["plain"]["tokens_per_s"], 1),
        "constrained_tokens_per_s": round(best["constrained"]["tokens_per_s"], 1),
        "ratio": round(best["constrained"]["tokens_per_s"] / best["plain"]["tokens_per_s"], 3),
        "constrained_output_tokens": best["constrained"]["output_tokens"],
        "plain_step_ms": round(best["plain"]["step_ms"], 2),
        "constrained_step_ms": round(best["constrained"]["step_ms"], 2),
        "step_time_ratio": round(best["constrained"]["step_ms"] / best["plain"]["step_ms"], 3),
        "steps": {k: best[k]["steps"] for k in best},
        "mask_ms_per_step": round(best["constrained"]["mask_ms_per_step"], 3),
        "valid_outputs": f"{valid}/{args.num_prompts}",
        "first_constraint_s": round(first_use_s, 3),
        "grammar_compile_s": round(compile_s, 4),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
