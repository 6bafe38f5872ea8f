"""Qwen3: the Llama decoder with per-head RMSNorm on queries and keys, explicit head_dim."""

from __future__ import annotations

from services.engine.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
