"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): the Qwen2 decoder with M-RoPE, plus the
vision tower, whose embeddings replace the image-pad tokens' word embeddings.

The language model reuses the Llama decoder (with qkv bias); only the rotary embedding differs
and takes ``[3, T]`` positions (``[T]`` positions, as text-only batches pass, mean plain RoPE,
which is what M-RoPE gives for text). The vision tower stays float32 whatever the engine dtype.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from services.engine import heartbeat
from services.engine.layers.attention import AttentionBackend, AttentionMetadata
from services.engine.layers.mrope import MRotaryEmbedding
from services.engine.models.llama import LlamaForCausalLM
from services.engine.models.qwen2_vl_vision import Qwen2VisionTransformer


class Qwen2VLForConditionalGeneration(LlamaForCausalLM):
    qkv_bias = True
    is_multimodal = True
    vision_class: type[Qwen2VisionTransformer] = Qwen2VisionTransformer

    def __init__(self, cfg: Any, backend: AttentionBackend) -> None:
        text_cfg = getattr(cfg, "text_config", cfg)
        super().__init__(text_cfg, backend)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        head_dim = self.attention_layers[0].head_dim
        # NOTE: same call signature as RotaryEmbedding, so the decoder layers are unchanged.
        self.model.rotary = MRotaryEmbedding(  # type: ignore[assignment]
            head_dim, text_cfg.max_position_embeddings, text_cfg
        )
        self.image_token_id = int(cfg.image_token_id)
        self.spatial_merge_size = int(cfg.vision_config.spatial_merge_size)
        self.visual = self.vision_class(cfg.vision_config)

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Vision embeddings ``[num_pad_tokens, hidden]`` in float32, in pad-token order."""
        return self.visual(pixel_values.float(), grid_thw)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``inputs_embeds`` (word embeddings with image rows merged in, see
        ``multimodal.merge_embeddings``) replaces the lookup of ``input_ids`` when given."""
        m = self.model
        x = m.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for i, layer in enumerate(m.layers):
            x = layer(positions, x, m.rotary, meta)
            heartbeat.beat()  # a slow step is not a stuck one (heartbeat.py)
            if meta.on_layer_done is not None:
                meta.on_layer_done(i)
        return m.norm(x)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Accepts both checkpoint layouts: ``model.layers.*`` + ``visual.*`` (original) and
        ``model.language_model.*`` + ``model.visual.*`` (transformers v5 in memory)."""
        text: list[tuple[str, torch.Tensor]] = []
        vision: list[tuple[str, torch.Tensor]] = []
        for name, tensor in weights:
            if name.startswith("model.visual."):
                vision.append((name[len("model.visual.") :], tensor))
            elif name.startswith("visual."):
                vision.append((name[len("visual.") :], tensor))
            else:
                text.append((name.replace("model.language_model.", "model.", 1), tensor))
        super().load_weights(text)
        # NOTE: the tower runs in float32 whatever the engine dtype (the runner casts the whole
        # model first), so its weights are kept at the checkpoint's precision.
        self.visual.float()
        with torch.no_grad():
            self.visual.load_weights(vision)
