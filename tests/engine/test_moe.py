"""Mixture-of-experts families: greedy tokens and logprobs equal transformers; the routing and
the grouped expert computation equal a per-token loop."""

from __future__ import annotations

import pytest
import torch

from services.engine import LLM
from services.engine.decode_graphs import capture_blocker
from services.engine.layers import fused
from services.engine.layers.moe import experts_reference, route
from tests.conftest import MOE_FAMILIES
from tests.engine.test_correctness import GREEDY, check, hf_greedy, prompts_of_mixed_lengths


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_greedy_matches_transformers(tiny_model_dir, family, monkeypatch):
    model = tiny_model_dir(family)
    refs = hf_greedy(model, prompts_of_mixed_lengths(), GREEDY.max_tokens)
    llm = LLM(str(model), device="cpu", dtype="float32", kv_cache_bytes=8 << 20)
    check(llm.generate(prompts_of_mixed_lengths(), GREEDY), refs)
    # CUDA graphs: only on the fused experts (the reference's host reads break a capture).
    monkeypatch.setattr(fused, "moe", None)
    assert "reference MoE" in (capture_blocker(llm.engine.runner.model) or "")
    monkeypatch.setattr(fused, "moe", object())
    assert capture_blocker(llm.engine.runner.model) is None


def test_experts_reference_equals_per_token_loop():
    g = torch.Generator().manual_seed(0)
    tokens, hidden, inter, experts, k = 9, 16, 8, 5, 2
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g)
    w2 = torch.randn(experts, hidden, inter, generator=g)
    weights, ids = route(torch.randn(tokens, experts, generator=g), k, renormalize=True)
    assert torch.allclose(weights.sum(-1), torch.ones(tokens))
    want = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for j in range(k):
            e = int(ids[t, j])
            gate, up = (w13[e] @ x[t]).chunk(2)
            want[t] += weights[t, j] * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    assert torch.allclose(experts_reference(x, w13, w2, weights, ids), want, atol=1e-4)
    # Slots held by another rank (-1) add nothing: the two halves sum to the whole.
    mine = torch.where(ids < 3, ids, -1)
    theirs = torch.where(ids >= 3, ids, -1)
    split = experts_reference(x, w13, w2, weights, mine) + experts_reference(
        x, w13, w2, weights, theirs
    )
    assert torch.allclose(split, want, atol=1e-4)
