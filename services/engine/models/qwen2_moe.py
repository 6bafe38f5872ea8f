"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2 attention (q/k/v bias per
``qkv_bias``), sparse MoE blocks with a shared expert behind a sigmoid gate."""

from __future__ import annotations

from typing import Any

from torch import nn

from services.engine.layers.attention import AttentionBackend
from services.engine.models.llama import LlamaMLP
from services.engine.models.moe import MoeForCausalLM, SparseMoeBlock, is_sparse_layer


class Qwen2MoeForCausalLM(MoeForCausalLM):
    def __init__(self, cfg: Any, backend: AttentionBackend) -> None:
        if getattr(cfg, "use_sliding_window", False):
            raise ValueError("Qwen2-MoE with use_sliding_window=True is not supported")
        self.qkv_bias = bool(getattr(cfg, "qkv_bias", True))
        super().__init__(cfg, backend)

    def make_mlp(self, cfg: Any, layer: int) -> nn.Module:
        if cfg.num_experts and is_sparse_layer(cfg, layer):
            return SparseMoeBlock(
                cfg,
                cfg.num_experts,
                cfg.moe_intermediate_size,
                bool(cfg.norm_topk_prob),
                shared_intermediate=cfg.shared_expert_intermediate_size,
            )
        return LlamaMLP(cfg)
