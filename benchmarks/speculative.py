"""Speculative decoding on the CPU: n-gram and suffix against no speculation, batch 1 and 8.

Workloads of chat prompts for the default model (greedy, up to ``--max-tokens``): ``copy``
asks it to rewrite a code snippet with one variable renamed, outputting only the code (the
output copies the prompt: code edits, extraction; the 135M model copies the snippet and
seldom renames), ``docstring`` asks it to repeat a snippet and add a docstring (the old copy
workload: the model writes a new docstring and drops most of the body, so even an oracle
proposer appends only 1.7 tokens per verification at batch 1), ``chat`` asks open questions
(little to copy). Each (workload, batch) runs with speculation off, ``ngram`` and ``suffix``
in ONE engine (loaded once, a warm-up request first) whose scheduler gets each method's
speculator, or none, before its run: separate engines per method differed by a few per cent
with identical work (their weights' placement in memory), which read as speculation's cost.
Each row first runs every method once untimed (each arm warm before any timing: a single
warm-up before the first arm left the first repeat favouring speculation, 1.62x / 2.11x in
the lead's run), then ``--repeats`` repeats, each running every method twice in a mirrored
order (off, ngram, suffix, suffix, ngram, off: every arm at the same mean position in the
repeat, so that load drifting over the repeat cancels from each ratio); each run starts with
a fresh proposer (the suffix method's cache of recent outputs would otherwise hold the same
request's output from the repeat before). Prints per method: output tokens/s and mean TPOT
(per request: time from its first to its last token over the tokens after the first; a
repeat's two runs together, medians over the repeats), CPU per token beside them, the
median of the repeats' TPOT and CPU off / on ratios (> 1: speculation is faster) with each repeat's,
acceptance rate, mean accepted length (tokens a verification appends), and whether every
output equals the run without speculation (greedy: it must). ``--show`` prints the first
output of each workload. ``--requests N`` runs N requests per row with at most the batch at
once, a finished one replaced by the next (as a served batch is refilled from its queue):
without it the batch's requests start together and the row lasts as long as the slowest, so
speculation saves CPU only where it shortens that one, while a replaced request's saved steps
go to the next.

    .venv/bin/python benchmarks/speculative.py --max-tokens 64 --batches 1 --methods ngram,suffix

``--fifo`` runs each timed run (a few seconds) with every thread of the process under
SCHED_FIFO priority 10, then back to SCHED_OTHER and a 3 s pause before the next: on the shared
2-core machine at load 20-60 one row of 9 runs then takes ~100 s instead of ~1 h, and the off
run reads the quiet machine's tok/s (282-320 against the lead's quiet 275). It needs root (or
CAP_SYS_NICE); keep it to short rows: other processes wait while a run holds both cores.

With ``--draft-model PATH`` (a model with the target's tokenizer) or ``--draft-layers N`` (the
target's own first N decoder layers with its final norm and lm_head, written to a temporary
folder: a self-draft, as LayerSkip's, when no smaller model of the family is at hand) a
``draft`` method runs too; ``--methods`` picks which run (``off`` always does); ``ngram:measured`` and ``suffix:measured``
run the method with ``measure_draft_cost`` on (the draft cost fitted on the engine's own steps,
draft_cost.py) beside the default (the configured ``draft_token_cost``) in the same engine.
"""

from __future__ import annotations

import argparse
import json
import os
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
    # More for --requests (a question asked twice would let the suffix method copy the
    # earlier answer from the worker's recent outputs).
    "How do bees make honey?",
    "What should I pack for a weekend camping trip?",
    "Explain why the sky is blue.",
    "Write a short poem about autumn leaves.",
    "What are the benefits of reading every day?",
    "How does a bicycle stay upright?",
    "Describe your ideal breakfast.",
    "Why do we have seasons?",
    "Give me advice for a job interview.",
    "What is the water cycle?",
    "Tell me a short story about a brave mouse.",
    "How can I sleep better at night?",
    "Why is exercise good for the brain?",
    "Explain how plants grow from seeds.",
    "What makes a good friend?",
    "Describe a busy city street in the morning.",
]


TEMPLATES = {
    "copy": "Rewrite this Python code with the variable `line` renamed to `text`. Output only "
    "the code.\n\n{}",
    "docstring": "Repeat this Python code exactly, but add a docstring to the first "
    "function:\n\n{}",
}
WORKLOADS = ("copy", "docstring", "chat")


def prompts(workload: str, n: int) -> list[list[dict[str, str]]]:
    if workload in TEMPLATES:
        return [
            [{"role": "user", "content": TEMPLATES[workload].format(SNIPPETS[i % len(SNIPPETS)])}]
            for i in range(n)
        ]
    return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]


def run(
    engine, convs, max_tokens: int, concurrency: int = 0
) -> tuple[float, float, list[list[int]], int, float]:
    """(output tok/s, mean TPOT s, outputs, output tokens, process CPU s per output token) of
    ``convs`` run together (``concurrency``: at most that many at once, the next one added as
    one finishes; 0: all at once). The CPU time (all the process's threads, OpenMP's included)
    is the load-robust measure: on a shared machine the wall clock also counts waiting."""
    from services.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    times: dict[str, list[float]] = {}
    outs: dict[str, list[int]] = {}
    queue = list(enumerate(convs))[::-1]

    def add() -> None:
        i, conv = queue.pop()
        rid = f"r{i:04d}-{time.monotonic_ns()}"
        engine.add_request(rid, engine.apply_chat_template(conv), params)
        times[rid], outs[rid] = [], []

    start, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(min(concurrency or len(convs), len(convs))):
        add()
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            for _ in out.outputs[0].token_ids:
                times[out.request_id].append(now)
            outs[out.request_id] += out.outputs[0].token_ids
            if out.finished and queue:
                add()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    tpots = [(t[-1] - t[0]) / (len(t) - 1) for t in times.values() if len(t) > 1]
    total = sum(len(o) for o in outs.values())
    outputs = [outs[rid] for rid in sorted(outs)]  # in the order of ``convs``
    return total / elapsed, statistics.mean(tpots), outputs, total, cpu / total


def _schedule_threads(policy: int, priority: int) -> None:
    """Every thread of this process (OpenMP's too) under ``policy``; the calling thread's
    failure (no root) is an error, another's (it ended meanwhile) is not."""
    os.sched_setscheduler(0, policy, os.sched_param(priority))
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(tid), policy, os.sched_param(priority))
        except OSError:
            pass


def fifo_run(engine, convs, max_tokens: int, concurrency: int = 0):
    """``run`` with every thread of the process under SCHED_FIFO 10 (``--fifo``)."""
    _schedule_threads(os.SCHED_FIFO, 10)
    try:
        return run(engine, convs, max_tokens, concurrency)
    finally:
        _schedule_threads(os.SCHED_OTHER, 0)
        time.sleep(3)  # the other processes' turn


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


def spec_counts(engine) -> tuple[int, int, int]:
    """(verifications, draft tokens, accepted drafts) so far; zeros without speculation."""
    spec = engine.scheduler.speculator
    if spec is None:
        return (0, 0, 0)
    return (spec.stats.num_drafts, spec.stats.num_draft_tokens, spec.stats.num_accepted_tokens)


def onednn_packed(engine) -> bool:
    """Whether the engine's linear layers run through oneDNN (layers/cpu_linear.py)."""
    from services.engine.layers.cpu_linear import OneDNNLinear

    modules = engine.runner.model.modules()
    return any(isinstance(m.__dict__.get("forward"), OneDNNLinear) for m in modules)


def fresh_proposer(engine) -> None:
    """A new n-gram or suffix proposer: the suffix method keeps the worker's recent outputs,
    and a repeat would find its own earlier output there (accepting nearly every draft)."""
    from services.engine.speculative.speculator import make_proposer

    spec = engine.scheduler.speculator
    if spec is not None and not spec.deferred:
        spec.proposer = make_proposer(spec.config)


def speculator(engine, method: str | None, k: int):
    """``engine``'s scheduler's speculator for n-gram or suffix ``method`` (None: none)."""
    from services.engine.speculative.config import SpeculativeConfig
    from services.engine.speculative.speculator import Speculator

    if method is None:
        return None
    method, _, variant = method.partition(":")  # "ngram:measured": the measured draft cost
    measured = variant == "measured"
    cfg = SpeculativeConfig(method=method, num_speculative_tokens=k, measure_draft_cost=measured)
    return Speculator(cfg, engine.max_model_len, engine.scheduler.bm)


def row(
    engines, convs, max_tokens: int, repeats: int, timed=run, concurrency: int = 0
) -> dict[str, dict]:
    """Each method on ``convs`` (``engines``: name -> (engine, the speculator its scheduler
    gets for the run, or "own")): first one untimed run of each (every arm warm: a single
    warm-up before the first arm gave the first repeat's first arm the cold caches and read
    as a bias for whichever came second), then ``repeats`` repeats, each running every method
    twice in a mirrored order (A B C C B A: each arm sits at the same mean position within
    the repeat, so a load that drifts across the repeat cancels out of every ratio). Per
    method and repeat: tok/s, mean TPOT and CPU per token of its two runs together, the
    TPOT and CPU ratios off/on of the same repeat, its speculation counters over the timed
    runs, and whether every run's outputs equaled the off runs' of its repeat."""
    names = list(engines)
    res = {
        name: {"tps": [], "tpot": [], "cpu": [], "ratio": [], "outs": [], "equal": True}
        for name in names
    }

    def one(name: str, timer):
        engine, spec = engines[name]
        if spec != "own":
            engine.scheduler.speculator = spec
        fresh_proposer(engine)
        before = spec_counts(engine)
        got = timer(engine, convs, max_tokens, concurrency)
        after = spec_counts(engine)
        return got, [a - b for a, b in zip(after, before, strict=True)]

    for name in names:
        one(name, timed)  # warm-up, not recorded (under FIFO too: at load 30 it took minutes)
    for _ in range(repeats):
        runs: dict[str, list] = {name: [] for name in names}
        for name in names + names[::-1]:
            runs[name].append(one(name, timed))
        for name in names:
            r, pair = res[name], runs[name]
            tokens = sum(got[3] for got, _ in pair)
            r["tps"].append(tokens / sum(got[3] / got[0] for got, _ in pair))
            r["tpot"].append(statistics.mean(got[1] for got, _ in pair))
            r["cpu"].append(sum(got[4] * got[3] for got, _ in pair) / tokens)
            r["outs"].append([got[2] for got, _ in pair])
            counts = [sum(c) for c in zip(*(c for _, c in pair), strict=True)]
            r["counts"] = [a + b for a, b in zip(counts, r.get("counts", (0, 0, 0)), strict=True)]
    base_tpot, base_cpu = res["off"]["tpot"], res["off"]["cpu"]
    base_outs = [outs[0] for outs in res["off"]["outs"]]
    for r in res.values():
        r["ratio"] = [b / t for b, t in zip(base_tpot, r["tpot"], strict=True)]
        r["cpu_ratio"] = [b / c for b, c in zip(base_cpu, r["cpu"], strict=True)]
        outs = r.pop("outs")
        r["equal"] = all(
            o == base for pair, base in zip(outs, base_outs, strict=True) for o in pair
        )
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded model)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--workloads", default="copy,chat", help=f"of {','.join(WORKLOADS)}")
    p.add_argument("--k", type=int, default=16, help="num_speculative_tokens (the adaptive max)")
    p.add_argument("--repeats", type=int, default=3, help="off/on runs of each row")
    p.add_argument("--show", action="store_true", help="print each workload's first output")
    p.add_argument("--requests", type=int, default=0,
                   help="N requests per row, at most the batch at once (a finished one is "
                        "replaced, as in a served batch); 0: the batch's requests alone")  # fmt: skip
    p.add_argument("--fifo", action="store_true",
                   help="each timed run under SCHED_FIFO 10 (root; see above)")  # fmt: skip
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
    # off, n-gram and suffix share one engine (each run sets its scheduler's speculator);
    # a draft model needs an engine of its own. The first engine's linear-layer probe decides
    # for both (each probing under load could pick differently).
    base = LLM(args.model, max_num_seqs=16).engine
    linear = "onednn" if onednn_packed(base) else "torch"
    engines = {"off": (base, None)}
    engines |= {
        m: (base, speculator(base, m, args.k))
        for m in ("ngram", "ngram:measured", "suffix", "suffix:measured")
        if m in chosen
    }
    if "draft" in chosen:
        cfg = json.dumps(
            {"method": "draft_model", "model": draft, "num_speculative_tokens": args.k}
        )
        own = LLM(args.model, speculative_config=cfg, max_num_seqs=16, cpu_linear=linear).engine
        engines["draft"] = (own, "own")
    for engine, _ in engines.values():
        run(engine, prompts("chat", 1), 8)  # warm-up
    print(f"cpu linear layers: {linear} (all engines)")
    print("| workload | batch | method | output tok/s | TPOT ms | TPOT off/on (median; runs) "
          "| CPU ms/token | CPU off/on (median; runs) | acceptance | mean accepted len "
          "| equal to off |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for workload in args.workloads.split(","):
        if args.show:
            base.scheduler.speculator = None
            _, _, outs, _, _ = run(base, prompts(workload, 1), args.max_tokens)
            text = base.inputs.tokenizer.decode(outs[0])
            print(f"{workload}, first output:\n{text}\n", flush=True)
        for batch in (int(b) for b in args.batches.split(",")):
            timed = fifo_run if args.fifo else run
            convs = prompts(workload, max(batch, args.requests))
            res = row(engines, convs, args.max_tokens, args.repeats, timed, batch)
            for name, r in res.items():
                drafts, proposed, accepted = r["counts"]
                acc = f"{accepted / proposed:.0%}" if proposed else "0 drafts"
                mal = f"{1 + accepted / drafts:.2f}" if drafts else "–"
                if name == "off":
                    acc = "–"
                runs = ", ".join(f"{x:.2f}" for x in r["ratio"])
                cpu_runs = ", ".join(f"{x:.2f}" for x in r["cpu_ratio"])
                print(f"| {workload} | {batch} | {name} | {statistics.median(r['tps']):.1f} | "
                      f"{statistics.median(r['tpot']) * 1000:.1f} | "
                      f"{statistics.median(r['ratio']):.2f}x ({runs}) | "
                      f"{statistics.median(r['cpu']) * 1000:.1f} | "
                      f"{statistics.median(r['cpu_ratio']):.2f}x ({cpu_runs}) | {acc} | "
                      f"{mal} | {r['equal']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
