"""Run as a script with ``TRITON_INTERPRET=1`` (``test_triton_moe.py`` does): the fused MoE
kernels of the CUDA path (``triton_moe.py``), interpreted on CPU tensors in float32, against
the torch reference; then a tiny MoE model's greedy tokens with the fused experts against the
reference experts. Prints one line per check and exits non-zero on the first failure."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.engine import LLM, SamplingParams  # noqa: E402
from services.engine.layers import fused, triton_moe  # noqa: E402
from services.engine.layers.moe import experts_reference, route  # noqa: E402


def check_align() -> None:
    slots = torch.tensor([[2, 0], [2, -1], [0, 2], [-1, -1]])
    ids, block_slot, used = triton_moe.align_by_expert(slots, num_slots=3, block_m=4)
    # Slot 0: pairs 1, 4; slot 2: pairs 0, 2, 5 (in pair order); each run padded to 4 rows.
    assert int(used) == 8, used
    assert ids[:8].tolist() == [1, 4, 8, 8, 0, 2, 5, 8], ids
    assert block_slot.tolist()[:2] == [0, 2] and set(block_slot.tolist()[2:]) == {-1}
    print("align ok")


def check_experts() -> None:
    g = torch.Generator().manual_seed(0)
    # Sizes that are not multiples of the blocks; tokens that hit one expert many times.
    for tokens, hidden, inter, experts, top_k in [(5, 48, 40, 6, 2), (1, 32, 16, 4, 1),
                                                  (37, 64, 72, 8, 3)]:  # fmt: skip
        x = torch.randn(tokens, hidden, generator=g)
        w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
        w2 = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
        weights, ids = route(torch.randn(tokens, experts, generator=g), top_k, True)
        # Expert parallelism: every third (token, k) pair computed by another rank.
        slots = ids.clone().reshape(-1)
        slots[::3] = -1
        slots = slots.view(tokens, top_k)
        for s in (ids, slots):
            want = experts_reference(x, w13, w2, weights, s)
            got = triton_moe.fused_experts(x, w13, w2, weights, s)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    none = -torch.ones(3, 2, dtype=torch.long)
    got = triton_moe.fused_experts(x[:3], w13, w2, weights[:3, :2], none)
    assert torch.equal(got, torch.zeros_like(got))
    print("fused experts ok")


def check_engine(model: str) -> None:
    prompts = ["Hello there", "1, 2, 3, 4, 5, 6, 7, 8"]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm = LLM(model, device="cpu", dtype="float32", block_size=4)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    fused.moe = triton_moe
    triton_moe.usable = lambda x: True  # CPU tensors through the interpreted kernels
    calls = []
    kernel = triton_moe.fused_experts
    triton_moe.fused_experts = lambda *args: calls.append(1) or kernel(*args)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert calls and got == want, (len(calls), got, want)
    print("engine ok")


if __name__ == "__main__":
    check_align()
    check_experts()
    check_engine(sys.argv[1])
