"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 attention (per-head q/k RMSNorm), sparse
MoE feed-forward blocks; top-k weights renormalised when ``norm_topk_prob``."""

from __future__ import annotations

from typing import Any

from torch import nn

from services.engine.models.llama import LlamaMLP
from services.engine.models.moe import MoeForCausalLM, SparseMoeBlock, is_sparse_layer


class Qwen3MoeForCausalLM(MoeForCausalLM):
    qk_norm = True

    def make_mlp(self, cfg: Any, layer: int) -> nn.Module:
        if cfg.num_experts and is_sparse_layer(cfg, layer):
            return SparseMoeBlock(
                cfg, cfg.num_experts, cfg.moe_intermediate_size, bool(cfg.norm_topk_prob)
            )
        return LlamaMLP(cfg)
