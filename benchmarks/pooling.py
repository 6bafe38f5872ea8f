"""Embeddings throughput of the engine's pooling batches (engine/pooler.py) on the default
model served as an embedding model (last-token pooling), against the same engine pooling one
prompt per batch and transformers' padded batched forward (the same last-token states).

Prints inputs/s and tokens/s of each, and the worst cosine between epdserve's and
transformers' embeddings.

    .venv/bin/python benchmarks/pooling.py [--prompts 64] [--tokens 128] [--hf-batch 16]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from services.engine import LLM
from services.engine.model_loader import resolve_model


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=16)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 49000, (args.tokens,), generator=g).tolist()
               for _ in range(args.prompts)]  # fmt: skip
    total = args.prompts * args.tokens

    def report(name: str, secs: float) -> None:
        print(f"{name:40s} {args.prompts / secs:8.1f} inputs/s {total / secs:9.0f} tok/s",
              flush=True)  # fmt: skip

    for budget in (args.tokens, 2048):
        llm = LLM(None, pooling="embed", max_num_batched_tokens=budget, max_model_len=2048)
        llm.encode(prompts[:2])  # warm-up
        secs, outs = timed(lambda llm=llm: llm.encode(prompts))
        report(f"epdserve, {budget // args.tokens} prompt(s) per batch", secs)
        ours = torch.tensor([o.data for o in outs])  # type: ignore[attr-defined]
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(resolve_model(None), dtype=torch.float32).eval()

    def hf_run() -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for i in range(0, len(prompts), args.hf_batch):
                ids = torch.tensor(prompts[i : i + args.hf_batch])
                out.append(F.normalize(hf(ids).last_hidden_state[:, -1], dim=-1))
        return torch.cat(out)

    hf_run()
    secs, ref = timed(hf_run)
    report(f"transformers, batches of {args.hf_batch}", secs)
    cos = F.cosine_similarity(ours, ref, dim=-1).min()  # type: ignore[arg-type]
    print(f"worst cosine epdserve vs transformers: {float(cos):.6f}")


if __name__ == "__main__":
    main()
