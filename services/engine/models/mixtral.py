"""Mixtral (8x7B, 8x22B): Llama attention, every feed-forward block sparse; the top-k
weights are always renormalised. Checkpoints call the block ``block_sparse_moe`` and the
expert projections ``w1`` (gate), ``w3`` (up), ``w2`` (down)."""

from __future__ import annotations

from typing import Any

from torch import nn

from services.engine.layers.attention import AttentionBackend
from services.engine.models.moe import MoeForCausalLM, SparseMoeBlock


class MixtralForCausalLM(MoeForCausalLM):
    renamed = {".block_sparse_moe.": ".mlp."}
    expert_parts = {"w1": "gate", "w3": "up", "w2": "down"}

    def __init__(self, cfg: Any, backend: AttentionBackend) -> None:
        if getattr(cfg, "sliding_window", None) is not None:
            raise ValueError("Mixtral with a sliding_window is not supported")
        super().__init__(cfg, backend)

    def make_mlp(self, cfg: Any, layer: int) -> nn.Module:
        return SparseMoeBlock(cfg, cfg.num_local_experts, cfg.intermediate_size, True)
