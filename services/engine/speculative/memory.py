"""The KV bytes per block that a draft model or an EAGLE head adds to the target's: its cache
has as many blocks as the target's (draft_model.py), so one budget (``kv_cache_bytes``, or the
device's free memory) pays for both, and the target gets fewer blocks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.engine.model_loader import load_hf_config, resolve_model

if TYPE_CHECKING:
    from services.engine.config import EngineConfig


def draft_bytes_per_block(config: EngineConfig, element_size: int) -> int:
    """0 without a draft model; its config is read (not its weights) to size its blocks."""
    spec = config.speculative
    if spec is None or spec.model is None:
        return 0
    hf = load_hf_config(resolve_model(spec.model))
    layers = 1 if spec.method == "eagle3" else int(hf.num_hidden_layers)
    heads = int(hf.num_attention_heads)
    kv_heads = int(getattr(hf, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(hf, "head_dim", None) or hf.hidden_size // heads)
    return 2 * layers * config.block_size * kv_heads * head_dim * element_size
