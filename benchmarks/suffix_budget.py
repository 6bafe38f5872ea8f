"""The suffix proposer's cost on long inputs, without a model: the longest single step and the
trie's size.

Two measures, in CPU time of the thread (``time.thread_time``: the machine's load counts
only through cache and frequency effects; no model, no threads):

- stall: ``--running`` sequences decode one token a step (their tries built already) when a
  sequence with a ``--prompt``-token prompt starts speculating; each step asks every sequence
  for drafts (as the scheduler does). Prints the longest and the median step, and the first
  step (where the long prompt's trie is first built).
- memory: ``--outputs`` finished outputs of ``--output-len`` tokens each go into the worker's
  trie; prints its node count after them (~265 bytes a node, see speculative/config.py).

- engine (``--engine``): the stall in a real engine (a 2-layer random model): wall time and
  the main thread's CPU time of each step after the long prompt's prefill.

Tokens are random (the worst case: every substring new). Runs on any version of
services/engine/speculative/suffix.py (what it measures is the same: the A/B of a change).

    .venv/bin/python benchmarks/suffix_budget.py --prompt 8000 --steps 64 --engine
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's services


def count_nodes(trie) -> int:
    """Nodes of ``trie``, by walking them (node objects before 2026-12-03, ints since)."""
    if hasattr(trie, "reachable"):
        return trie.reachable()
    total, stack = 0, [trie.root]
    while stack:
        n = stack.pop()
        total += len(n.children)
        stack.extend(n.children.values())
    return total


def stall(args: argparse.Namespace) -> None:
    from services.engine.sampling_params import SamplingParams
    from services.engine.sequence import Sequence
    from services.engine.speculative.config import SpeculativeConfig
    from services.engine.speculative.speculator import make_proposer

    rng = random.Random(0)
    prop = make_proposer(SpeculativeConfig(method="suffix"))
    new_step = getattr(prop, "new_step", lambda: None)
    params = SamplingParams(max_tokens=1 << 20)
    running = [
        Sequence(f"r{i}", [rng.randrange(49152) for _ in range(200)], params)
        for i in range(args.running)
    ]
    for _ in range(8):  # their tries are built (short prompts: a few ms)
        new_step()
        for seq in running:
            prop.propose(seq, 16)
            seq.append_token(rng.randrange(49152))
    long_seq = Sequence("long", [rng.randrange(49152) for _ in range(args.prompt)], params)
    gc.collect()
    steps: list[float] = []  # CPU time of this thread: the machine's load does not count
    for _ in range(args.steps):
        t0 = time.thread_time()
        new_step()
        for seq in [*running, long_seq]:
            prop.propose(seq, 16)
        steps.append(time.thread_time() - t0)
        for seq in [*running, long_seq]:
            seq.append_token(rng.randrange(49152))
    state = long_seq.draft_state
    print(f"stall (CPU time): prompt {args.prompt} tokens beside {args.running} running, "
          f"{args.steps} steps: "
          f"first step {1e3 * steps[0]:.1f} ms, longest {1e3 * max(steps):.1f} ms, median "
          f"{1e3 * statistics.median(steps):.2f} ms; long prompt's trie "
          f"{count_nodes(state.trie)} nodes")  # fmt: skip


def memory(args: argparse.Namespace) -> None:
    from services.engine.sampling_params import SamplingParams
    from services.engine.sequence import Sequence
    from services.engine.speculative.config import SpeculativeConfig
    from services.engine.speculative.speculator import make_proposer

    rng = random.Random(1)
    prop = make_proposer(SpeculativeConfig(method="suffix"))
    params = SamplingParams(max_tokens=1 << 20)
    t0 = time.thread_time()
    for i in range(args.outputs):
        seq = Sequence(f"o{i}", [1, 2, 3], params)
        for _ in range(args.output_len):
            seq.append_token(rng.randrange(49152))
        prop.finished(seq)
    took = time.thread_time() - t0
    nodes = count_nodes(prop.global_trie)
    print(f"memory: {args.outputs} outputs of {args.output_len} tokens: worker trie {nodes} "
          f"nodes (~{nodes * 265 / 1e6:.0f} MB at 265 B a node), added in {took:.1f} s CPU")  # fmt: skip


def engine(args: argparse.Namespace) -> None:
    """The same in an engine: a 2-layer random model, 7 greedy streams decoding with suffix
    speculation, then a ``--prompt``-token prompt joins; each step's wall time and the main
    thread's CPU time (where the proposer runs) after the long prompt's prefill."""
    import json
    import tempfile

    import torch
    import transformers

    from benchmarks.random_model import save_random
    from services.engine import LLM, SamplingParams

    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * args.prompt,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random(transformers.LlamaForCausalLM(cfg), Path(tmp))
        spec = json.dumps({"method": "suffix", "disable_by_batch_size": 0})
        e = LLM(path, dtype="float32", block_size=16, max_model_len=args.prompt + 1000,
                enable_prefix_caching=False, speculative_config=spec).engine  # fmt: skip
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=1 << 10, ignore_eos=True)
    for i in range(args.running):
        e.add_request(f"s{i}", [rng.randrange(100, 49000) for _ in range(100)], params)
    for _ in range(10):
        e.step()
    prompt = [rng.randrange(100, 49000) for _ in range(args.prompt)]
    e.add_request("long", prompt, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    steps: list[tuple[float, float, bool]] = []
    while len(steps) < args.steps:
        t0, c0 = time.perf_counter(), time.thread_time()
        outs = e.step()
        started = any(o.request_id == "long" and o.outputs[0].token_ids for o in outs)
        steps.append((time.perf_counter() - t0, time.thread_time() - c0, started))
    first = next(i for i, s in enumerate(steps) if s[2])
    wall = [1e3 * s[0] for s in steps[first + 1 :]]
    cpu = [1e3 * s[1] for s in steps[first + 1 :]]
    print(f"engine: {len(wall)} steps after the {args.prompt}-token prompt's prefill beside "
          f"{args.running} streams: first step wall {wall[0]:.0f} ms / main-thread CPU "
          f"{cpu[0]:.0f} ms; longest wall {max(wall):.0f} ms, CPU {max(cpu):.0f} ms; median "
          f"wall {statistics.median(wall):.0f} ms, CPU {statistics.median(cpu):.0f} ms")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=8000)
    ap.add_argument("--running", type=int, default=7)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--outputs", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=4000)
    ap.add_argument("--engine", action="store_true", help="also the engine measure (minutes)")
    args = ap.parse_args()
    stall(args)
    memory(args)
    if args.engine:
        engine(args)


if __name__ == "__main__":
    main()
