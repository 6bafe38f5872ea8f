"""What a verification adds to a decode step, by pattern, alternated step by step in one run.

``B`` chat requests decode together (greedy, the default model); step ``i`` runs pattern
``i % P``: which of the ``B`` sequences draft how many tokens (drafts of id 0, all rejected, so
every step appends one token a sequence and the contexts grow alike under every pattern).
Prints per pattern the median process CPU time and wall time of ``engine.step()`` and their
ratio to the steps without drafts: since the patterns take turns step by step, each shares
the machine's load with the others (the contention-robust measure). The speculator's adaptive
rule prices a draft row at ``1 / (F + B)`` of a step (speculative/config.py): this shows
whether a step's cost is that linear (a fixed cost per verifying group is not).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/spec_step_cost.py --batch 8 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time


def patterns(b: int) -> dict[str, list[int]]:
    """Pattern name -> drafts of each of the ``b`` sequences."""
    pad = [0] * b
    return {
        "none": pad,
        "1x1": ([1] + pad)[:b],
        "1x4": ([4] + pad)[:b],
        "2x(1,3)": ([1, 3] + pad)[:b],
        "4x(1..4)": ([1, 2, 3, 4] + pad)[:b],
        "all x1": [1] * b,
        "all x2": [2] * b,
        "all x4": [4] * b,
    }


class Alternating:
    """Drafts of id 0 in the pattern of the step being scheduled."""

    def __init__(self, pats: dict[str, list[int]]) -> None:
        self.pats, self.names = pats, list(pats)
        self.step = -1
        self.order: dict[str, int] = {}  # request id -> its place in the batch

    @property
    def upcoming(self) -> str:
        return self.names[(self.step + 1) % len(self.names)]

    def new_step(self) -> None:
        self.step += 1

    def propose(self, seq, k: int) -> list[int]:
        i = self.order.setdefault(seq.request_id, len(self.order))
        ks = self.pats[self.names[self.step % len(self.names)]]
        return [0] * ks[i % len(ks)]

    def finished(self, seq) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="batches of requests measured")
    p.add_argument("--max-tokens", type=int, default=130)
    args = p.parse_args()
    from benchmarks.speculative import prompts
    from services.engine import LLM, SamplingParams
    from services.engine.speculative.config import SpeculativeConfig
    from services.engine.speculative.speculator import Speculator

    b = args.batch
    pats = patterns(b)
    engine = LLM(None, max_num_seqs=max(16, b)).engine
    cfg = SpeculativeConfig(method="ngram", num_speculative_tokens=8, adaptive=False,
                            disable_by_batch_size=0, max_draft_tokens_per_step=0)  # fmt: skip
    proposer = Alternating(pats)
    spec = Speculator(cfg, engine.max_model_len, engine.scheduler.bm, proposer=proposer)
    cpu: dict[str, list[float]] = {k: [] for k in pats}
    wall: dict[str, list[float]] = {k: [] for k in pats}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    for r in range(args.rounds + 1):  # round 0 warms up
        engine.scheduler.speculator = None
        for i, conv in enumerate(prompts("chat", b)):
            engine.add_request(f"r{r}-{i}", engine.apply_chat_template(conv), params)
        engine.step()  # the prompts
        engine.scheduler.speculator = spec
        proposer.order = {}
        while engine.has_unfinished_requests():
            name = proposer.upcoming
            w0, c0 = time.perf_counter(), time.process_time()
            engine.step()
            c, w = time.process_time() - c0, time.perf_counter() - w0
            if r and len(engine.scheduler.running) == b:
                cpu[name].append(c)
                wall[name].append(w)
    base_c, base_w = statistics.median(cpu["none"]), statistics.median(wall["none"])
    print("| pattern | draft rows | steps | CPU ms | CPU x | per draft row | wall ms | wall x |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, ks in pats.items():
        rows, mc, mw = sum(ks), statistics.median(cpu[name]), statistics.median(wall[name])
        per_row = f"{(mc / base_c - 1) / rows:.3f}" if rows else "-"
        print(f"| {name} | {rows} | {len(cpu[name])} | {mc * 1e3:.1f} | {mc / base_c:.3f} | "
              f"{per_row} | {mw * 1e3:.1f} | {mw / base_w:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
