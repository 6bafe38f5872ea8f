"""Speculative decoding on the CPU: n-gram and suffix against no speculation, batch 1 and 8.

Two workloads of chat prompts for the default model (greedy, up to ``--max-tokens``):
``copy`` asks it to repeat a code snippet with one change (the output copies the prompt:
code edits, extraction), ``chat`` asks open questions (little to copy). Each (workload,
batch) runs with speculation off, ``ngram`` and ``suffix`` in one engine per method (loaded
once, a warm-up request first), the runs of one row back to back so that they share the
machine's background load. Prints per run: output tokens/s, mean TPOT (per request: time
from its first to its last token over the tokens after the first), the ratio of TPOT off /
on (> 1: speculation is faster), acceptance rate, mean accepted length, and whether every
output equals the run without speculation (greedy: it must).

    .venv/bin/python benchmarks/speculative.py --max-tokens 128

With ``--draft-model PATH`` (a model with the target's tokenizer) or ``--draft-layers N`` (the
target's own first N decoder layers with its final norm and lm_head, written to a temporary
folder: a self-draft, as LayerSkip's, when no smaller model of the family is at hand) a
``draft`` method runs too; ``--methods`` picks which run (``off`` always does).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

SNIPPETS = [
    "def parse_line(line):\n    key, _, value = line.partition('=')\n    key = key.strip()\n"
    "    value = value.strip()\n    if not key:\n        raise ValueError('empty key')\n"
    "    return key, value\n",
    "class Counter:\n    def __init__(self):\n        self.counts = {}\n\n    def add(self, word):\n"
    "        self.counts[word] = self.counts.get(word, 0) + 1\n\n    def top(self, n):\n"
    "        return sorted(self.counts.items(), key=lambda kv: -kv[1])[:n]\n",
    "def read_config(path):\n    with open(path) as f:\n        lines = f.readlines()\n"
    "    config = {}\n    for line in lines:\n        if line.startswith('#'):\n            continue\n"
    "        key, value = parse_line(line)\n        config[key] = value\n    return config\n",
    "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n"
    "    return total / len(values)\n\n\ndef variance(values):\n    m = mean(values)\n"
    "    return sum((v - m) ** 2 for v in values) / len(values)\n",
]
QUESTIONS = [
    "What are three good habits for staying healthy?",
    "Explain how a rainbow forms.",
    "Write a short poem about the sea.",
    "Why do cats purr?",
    "Give me some tips for learning a new language.",
    "Describe a day in the life of a farmer.",
    "What is the difference between weather and climate?",
    "Tell me a short story about a lost key.",
]


def prompts(workload: str, n: int) -> list[list[dict[str, str]]]:
    if workload == "copy":
        return [
            [{"role": "user", "content": "Repeat this Python code exactly, but add a docstring "
              f"to the first function:\n\n{SNIPPETS[i % len(SNIPPETS)]}"}]
            for i in range(n)
        ]  # fmt: skip
    return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]


def run(engine, convs, max_tokens: int) -> tuple[float, float, list[list[int]], int]:
    """(output tok/s, mean TPOT s, outputs, output tokens) of ``convs`` run together."""
    from services.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    times: dict[str, list[float]] = {}
    outs: dict[str, list[int]] = {}
    start = time.perf_counter()
    for i, conv in enumerate(convs):
        rid = f"r{i}-{time.monotonic_ns()}"
        engine.add_request(rid, engine.apply_chat_template(conv), params)
        times[rid], outs[rid] = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            for _ in out.outputs[0].token_ids:
                times[out.request_id].append(now)
            outs[out.request_id] += out.outputs[0].token_ids
    elapsed = time.perf_counter() - start
    tpots = [(t[-1] - t[0]) / (len(t) - 1) for t in times.values() if len(t) > 1]
    total = sum(len(o) for o in outs.values())
    return total / elapsed, statistics.mean(tpots), list(outs.values()), total


def truncated_copy(model: str | None, layers: int) -> str:
    """A folder holding the first ``layers`` decoder layers of ``model`` (with its embedding,
    final norm, lm_head, config and tokenizer): a draft model of the same vocabulary."""
    from safetensors.torch import save_file

    from services.engine.model_loader import iter_safetensors, resolve_model

    src = Path(resolve_model(model))
    out = Path(tempfile.mkdtemp(prefix="draft-"))
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json":
            shutil.copy(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config))
    keep = {}
    for name, tensor in iter_safetensors(str(src)):
        parts = name.split(".")
        if "layers" in parts and int(parts[parts.index("layers") + 1]) >= layers:
            continue
        keep[name] = tensor.contiguous()
    save_file(keep, str(out / "model.safetensors"))
    return str(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded model)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--methods", default="ngram,suffix,draft", help="besides off")
    p.add_argument("--draft-model", default=None, help="the draft method's model")
    p.add_argument("--draft-layers", type=int, default=0,
                   help="draft: the target's first N layers (when no --draft-model)")  # fmt: skip
    args = p.parse_args()
    from services.engine import LLM

    draft = args.draft_model
    if draft is None and args.draft_layers:
        draft = truncated_copy(args.model, args.draft_layers)
    chosen = set(args.methods.split(","))
    if draft is None:
        chosen.discard("draft")
    methods = {"off": None, **{m: m for m in ("ngram", "suffix", "draft") if m in chosen}}
    engines = {}
    for name, method in methods.items():
        cfg = None
        if method == "draft":
            cfg = json.dumps(
                {"method": "draft_model", "model": draft, "num_speculative_tokens": args.k}
            )
        elif method is not None:
            cfg = json.dumps({"method": method, "num_speculative_tokens": args.k})
        engines[name] = LLM(args.model, speculative_config=cfg, max_num_seqs=16).engine
        run(engines[name], prompts("chat", 1), 8)  # warm-up
    print("| workload | batch | method | output tok/s | TPOT ms | TPOT off/on | acceptance "
          "| mean accepted len | equal to off |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---:|---|")
    for workload in ("copy", "chat"):
        for batch in (int(b) for b in args.batches.split(",")):
            convs = prompts(workload, batch)
            base = None
            for name, engine in engines.items():
                spec = engine.scheduler.speculator
                before = (spec.stats.num_drafts, spec.stats.num_draft_tokens,
                          spec.stats.num_accepted_tokens) if spec else (0, 0, 0)  # fmt: skip
                tps, tpot, outs, _ = run(engine, convs, args.max_tokens)
                if base is None:
                    base = (tpot, outs)
                acc = mal = "–"
                if spec:
                    drafts = spec.stats.num_drafts - before[0]
                    proposed = spec.stats.num_draft_tokens - before[1]
                    accepted = spec.stats.num_accepted_tokens - before[2]
                    acc = f"{accepted / proposed:.0%}" if proposed else "0 drafts"
                    mal = f"{1 + accepted / drafts:.2f}" if drafts else "–"
                print(f"| {workload} | {batch} | {name} | {tps:.1f} | {tpot * 1000:.1f} | "
                      f"{base[0] / tpot:.2f}x | {acc} | {mal} | {outs == base[1]} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
