"""Speculation replayed, without the model's timing: acceptance and modelled TPOT per policy.

Runs the benchmark's workloads (benchmarks/speculative.py) once without speculation (greedy),
then replays each output, sequence by sequence at batch 1, through the real proposer and the
real ``Speculator`` (adaptive length, cost rule, probes): each step asks for drafts, accepts
the prefix that equals the output, appends it and the target's own token. A step costs one
decode step plus ``--verify-base + --per-draft * k`` when it verifies ``k`` drafts (defaults
from the verification timings in RESULTS.md: 16 drafts ~1.74x a decode step, 4 ~1.2x), so
the modelled speed-up is what the policy gains on the model's real outputs, free of the
machine's load. Prints per workload, method and ``--k`` the geometric mean and the lowest of
the prompts' modelled TPOT off/on, drafts and accepted drafts.

    .venv/bin/python benchmarks/speculative_replay.py --k 4,16 --max-tokens 64
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's services

from benchmarks.speculative import prompts  # noqa: E402


def greedy_outputs(engine, workload: str, n: int, max_tokens: int) -> list[tuple[list, list]]:
    """(prompt ids, output ids) of ``n`` prompts of ``workload``, greedy."""
    from services.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    ids = [engine.apply_chat_template(c) for c in prompts(workload, n)]
    outs: dict[str, list[int]] = {}
    for i, p in enumerate(ids):
        engine.add_request(f"{workload}{i}", p, params)
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)
    return [(p, outs[f"{workload}{i}"]) for i, p in enumerate(ids)]


def replay(config, prompt: list[int], out: list[int], base: float, per: float):
    """(modelled TPOT off/on, drafts, accepted) of ``out`` replayed at batch 1."""
    from services.engine.block_manager import BlockManager
    from services.engine.sampling_params import SamplingParams
    from services.engine.sequence import Sequence
    from services.engine.speculative.speculator import Speculator

    spec = Speculator(config, 1 << 20, BlockManager(16, 16))
    seq = Sequence("r", list(prompt), SamplingParams(max_tokens=len(out)))
    seq.append_token(out[0])  # the prefill's token
    pos, cost = 1, 0.0
    while pos < len(out):
        spec.new_step()  # as the scheduler does (the suffix trie indexes a budget a step)
        drafts = spec.drafts(seq, 1 << 20, 1)
        ok = 0
        while ok < len(drafts) and pos + ok < len(out) and drafts[ok] == out[pos + ok]:
            ok += 1
        if drafts:
            spec.observe(seq, len(drafts), ok)
        cost += 1 + (base + per * len(drafts) if drafts else 0.0)
        for t in out[pos : pos + ok + 1]:
            seq.append_token(t)
        pos += ok + 1
    s = spec.stats
    return (len(out) - 1) / cost, s.num_draft_tokens, s.num_accepted_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded model)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--workloads", default="copy,docstring,chat")
    p.add_argument("--prompts", type=int, default=4, help="per workload")
    p.add_argument("--methods", default="ngram,suffix")
    p.add_argument("--k", default="4,16", help="num_speculative_tokens values")
    p.add_argument("--verify-base", type=float, default=0.02, help="of a decode step")
    p.add_argument("--per-draft", type=float, default=0.045, help="of a decode step")
    args = p.parse_args()
    from services.engine import LLM
    from services.engine.speculative.config import SpeculativeConfig

    engine = LLM(args.model, max_num_seqs=16).engine
    print("| workload | method | k | TPOT off/on (geo. mean) | lowest | drafts | accepted |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for workload in args.workloads.split(","):
        data = greedy_outputs(engine, workload, args.prompts, args.max_tokens)
        for method in args.methods.split(","):
            for k in (int(x) for x in args.k.split(",")):
                cfg = SpeculativeConfig(method=method, num_speculative_tokens=k)
                rows = [replay(cfg, pr, out, args.verify_base, args.per_draft) for pr, out in data]
                gm = math.exp(statistics.mean(math.log(r[0]) for r in rows))
                print(f"| {workload} | {method} | {k} | {gm:.2f}x | {min(r[0] for r in rows):.2f}x "
                      f"| {sum(r[1] for r in rows)} | {sum(r[2] for r in rows)} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
