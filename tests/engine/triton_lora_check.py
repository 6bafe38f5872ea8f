"""Run as a script with ``TRITON_INTERPRET=1`` (``test_triton_lora.py`` does): the Triton LoRA
kernels of the CUDA path, interpreted on CPU tensors in float32, against a per-row torch
reference; then a mixed LoRA batch of the engine through the kernels against its torch path.

Arguments: the base model folder, then ``name=folder`` adapters. Prints one line per check
and exits non-zero on the first failure.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.engine import LLM, SamplingParams  # noqa: E402
from services.engine.layers import triton_lora  # noqa: E402


def check_kernels(device: str = "cpu", dtype: torch.dtype = torch.float32, tol: float = 1e-4):
    """The kernels against a per-row reference computed in float32 (``test_triton_lora.py``
    also runs this compiled on a GPU)."""
    g = torch.Generator().manual_seed(0)
    # (slots, rank, input, output shards): q/k/v-like unequal shards (one tile straddles
    # two of them), two equal ones, one unfused; rows: base-only (-1) and empty slots.
    cases = [(3, 8, 40, [40, 15, 15]), (4, 16, 64, [96, 96]), (2, 4, 33, [50])]
    for slots, rank, k, shards in cases:
        width, n = rank * len(shards), sum(shards)
        a = torch.randn(slots, width, k, generator=g)
        b = torch.zeros(slots, n, width)
        lo = [sum(shards[:i]) for i in range(len(shards))]
        for s in range(slots):
            for i, (o, size) in enumerate(zip(lo, shards, strict=True)):
                b[s, o : o + size, i * rank : (i + 1) * rank] = torch.randn(size, rank, generator=g)
        rows = 37
        slot_of = [(i * 7) % (slots + 1) - 1 for i in range(rows)]
        slot_of = [s if s != slots - 1 else -1 for s in slot_of]  # the last slot: no rows
        x = torch.randn(rows, k, generator=g)
        rows_of = [[i for i in range(rows) if slot_of[i] == s] for s in range(slots)]
        seg = triton_lora.segments(rows_of, torch.device(device))
        bounds = torch.tensor([lo, [o + n for o, n in zip(lo, shards, strict=True)]],
                              dtype=torch.int32)  # fmt: skip
        y0 = torch.randn(rows, n, generator=g)
        on = [t.to(device, dtype, copy=True) for t in (x, a, b, y0)]
        x, a, b, ref = (t.float().cpu().clone() for t in on)  # the same rounded inputs
        xa = triton_lora.lora_shrink(on[0], on[1], seg)
        y = triton_lora.lora_expand_(on[3], xa, on[2], seg, bounds.to(device), rank)
        for i, s in enumerate(slot_of):
            if s >= 0:
                ref[i] += (x[i] @ a[s].T) @ b[s].T
        torch.testing.assert_close(y.float().cpu(), ref, atol=tol * 10, rtol=tol)
    print("lora kernels ok")


def check_engine(base: str, modules: list[str]) -> None:
    names = [m.split("=")[0] for m in modules]
    llm = LLM(base, dtype="float32", lora_modules=modules, max_loras=len(names) + 1,
              kv_cache_bytes=8 << 20, enable_prefix_caching=False)  # fmt: skip
    batch = llm.engine.loras.batch
    launches = []

    def shrink(*args):
        launches.append(1)
        return triton_lora.lora_shrink(*args)

    kernels = SimpleNamespace(segments=triton_lora.segments, lora_shrink=shrink,
                              lora_expand_=triton_lora.lora_expand_)  # fmt: skip
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 49000, (n,), generator=g).tolist() for n in (3, 9, 5, 12, 7)]
    loras = [names[0], None, names[1], names[0], names[-1]]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1)
    outs = {}
    for path, kern in (("torch", None), ("triton", kernels)):
        batch.kernels = kern
        outs[path] = llm.generate(prompts, params, lora=loras)
    assert launches, "the kernels never ran"
    for got, want in zip(outs["triton"], outs["torch"], strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for lp, ref in zip(got.outputs[0].logprobs, want.outputs[0].logprobs, strict=True):
            assert abs(lp.logprob - ref.logprob) < 1e-4
    print("lora engine ok")


if __name__ == "__main__":
    check_kernels()
    check_engine(sys.argv[1], sys.argv[2:])
