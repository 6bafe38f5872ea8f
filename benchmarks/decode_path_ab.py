"""The engine's own CPU per decode step, with the CPU decode-step path (models/llama_decode.py)
on and off, alternated in one process: the same engine, the same batch, the same cache.
``--compare fused``: the path on both sides, its one C call a layer for the rotary, the KV
write and the attention ("on") against the two calls it replaced ("off"). ``--compare
scratch``: the path on both sides, its layers' shared scratch tensors ("on") against a new
``torch.empty`` for each use ("off", what the path did before).

``--model tiny`` builds a 30-layer Llama of hidden size 128 with random weights (in a
temporary folder, nothing downloaded): its kernels cost little, so a step is mostly the
engine's own Python, ctypes and dispatch. Without ``--model`` the default model. ``--batch``
sequences (random prompts) are prefilled, then ``--rounds`` x ``--steps`` decode steps run per
side, the sides alternating. Prints per side the median step-thread CPU (``time.thread_time``,
the least disturbed by other processes), the process's CPU (the OpenMP threads too) and the
wall time, and the ratios off/on. Recorded, not asserted; not in CI.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/decode_path_ab.py [--model tiny]
        [--batch 16] [--rounds 8] [--steps 8] [--compare path|fused|scratch]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as the workers run
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.offline import make_prompts  # noqa: E402
from services.engine.config import EngineConfig  # noqa: E402
from services.engine.llm_engine import LLMEngine  # noqa: E402
from services.engine.models.llama_decode import Scratch  # noqa: E402
from services.engine.sampling_params import SamplingParams  # noqa: E402


def tiny_model(folder: Path) -> str:
    """A 30-layer, 128-wide Llama with random weights and the default model's tokenizer."""
    import transformers

    from tests.conftest import TINY_CONFIG, tokenizer_source

    cfg = dict(TINY_CONFIG, num_hidden_layers=30, hidden_size=128, num_attention_heads=2,
               num_key_value_heads=1, head_dim=64, intermediate_size=256,
               max_position_embeddings=2048)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    model.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer_source() / name).read_bytes())
    return str(folder)


class FreshScratch(Scratch):
    """A new tensor for every use: the path's allocations before its shared scratch."""

    def get(self, what: str, rows: int, width: int) -> torch.Tensor:
        return torch.empty((rows, width), dtype=torch.float32)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="'tiny', a HF folder, or the default model")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per side a round")
    p.add_argument("--compare", choices=["path", "fused", "scratch"], default="path",
                   help="path: the decode path on/off; fused: its one attention call on/off; "
                        "scratch: its shared scratch tensors on/off")  # fmt: skip
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="decode-path-ab-") as tmp:
        model = tiny_model(Path(tmp)) if args.model == "tiny" else args.model
        engine = LLMEngine(EngineConfig(model=model, max_num_seqs=max(args.batch, 16)))
        run(engine, args)
    return 0


def run(engine: LLMEngine, args: argparse.Namespace) -> None:
    prompt_len = 128 if args.model is None else 32
    need = prompt_len + 2 * args.rounds * (args.steps + 1) + 8
    if need > engine.max_model_len:
        raise SystemExit(f"rounds x steps need a context of {need} > {engine.max_model_len}")
    vocab = engine.runner.model.vocab_size
    for i, prompt in enumerate(make_prompts(args.batch, prompt_len, vocab, 0)):
        params = SamplingParams(temperature=0, max_tokens=need - prompt_len, ignore_eos=True)
        engine.add_request(f"r{i}", prompt, params)
    sched = engine.scheduler
    while sched.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in sched.running):
        engine.step()
    decoder = engine.runner.model.model
    path = decoder.decode_path
    if path is None:
        raise SystemExit("this engine has no CPU decode-step path (not a float32 CPU Llama?)")
    sides: dict[str, tuple[list[float], list[float], list[float]]] = {"on": ([], [], []),
                                                                      "off": ([], [], [])}  # fmt: skip
    shared = next(layer.scratch for layer in path.layers if layer is not None)
    fresh = FreshScratch()
    load = os.getloadavg()[0]
    for r in range(args.rounds):
        for side in ("on", "off") if r % 2 == 0 else ("off", "on"):
            if args.compare == "path":
                decoder.decode_path = path if side == "on" else None
            elif args.compare == "scratch":
                scratch = shared if side == "on" else fresh
                for layer in path.layers:
                    if layer is not None:
                        layer.scratch = scratch
            else:
                for layer in path.layers:
                    if layer is not None:
                        layer.fuse = side == "on"
            engine.step()  # untimed: the first step after a switch
            cpu, proc, wall = sides[side]
            for _ in range(args.steps):
                c, pc, t = time.thread_time(), time.process_time(), time.perf_counter()
                engine.step()
                wall.append(time.perf_counter() - t)
                cpu.append(time.thread_time() - c)
                proc.append(time.process_time() - pc)
    decoder.decode_path = path
    for layer in path.layers:
        if layer is not None:
            layer.fuse = True
            layer.scratch = shared

    def ms(values: list[float]) -> float:
        return 1e3 * statistics.median(values)

    for side, (cpu, proc, wall) in sides.items():
        print(f"{args.compare} {side:3s}: step-thread CPU {ms(cpu):.3f} ms, process CPU {ms(proc):.3f} ms, "
              f"wall {ms(wall):.3f} ms (median of {len(cpu)} steps at batch {args.batch})")  # fmt: skip
    on, off = sides["on"], sides["off"]
    print(f"off/on: step-thread CPU {ms(off[0]) / ms(on[0]):.3f}x, process CPU "
          f"{ms(off[1]) / ms(on[1]):.3f}x, wall {ms(off[2]) / ms(on[2]):.3f}x; load "
          f"{load:.1f} -> {os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
