"""EAGLE-3 draft heads for Llama/Qwen targets, in the public checkpoint format (the EAGLE-3
repository's and vLLM's ``LlamaForCausalLMEagle3``): ``fc`` maps the target's hidden states of
three layers, concatenated, to one; one decoder layer (``midlayer``) whose attention reads the
token's embedding and that hidden state side by side (2 x hidden inputs); ``norm``; an
``lm_head`` over a smaller draft vocabulary and ``d2t``, each draft token's offset to the
target's id. The token embedding is the target's unless the checkpoint has its own.

Not in the registry: a draft only (speculative/eagle3.py builds it). Its forward reads the
hidden states that go with the input tokens from ``hidden_in`` (set by the proposer, one row
per input token in the runner's order) and leaves its own, before the final norm, in
``hidden_out``: the next draft position's input.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from services.engine.layers.attention import AttentionBackend, AttentionMetadata
from services.engine.layers.norm import RMSNorm
from services.engine.layers.rotary import RotaryEmbedding, rope_parameters
from services.engine.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


def aux_layer_ids(head: Any, num_target_layers: int) -> list[int]:
    """The target layers whose input hidden states feed ``fc``: the checkpoint's
    ``eagle_config.eagle_aux_hidden_state_layer_ids``, else vLLM's default (2, L/2, L-3)."""
    eagle = getattr(head, "eagle_config", None) or {}
    ids = eagle.get("eagle_aux_hidden_state_layer_ids") if isinstance(eagle, dict) else None
    ids = list(ids or (2, num_target_layers // 2, num_target_layers - 3))
    if len(ids) != 3 or not all(0 <= i < num_target_layers for i in ids):
        raise ValueError(f"EAGLE-3 needs 3 target layers in [0, {num_target_layers}), got {ids}")
    return ids


class _Body(nn.Module):
    """``model.*`` of the checkpoint (after vLLM's renaming of ``midlayer`` to ``layers.0``)."""

    def __init__(self, cfg: Any, backend: AttentionBackend) -> None:
        super().__init__()
        hidden = cfg.hidden_size
        target_hidden = getattr(cfg, "target_hidden_size", None) or hidden
        self.embed_tokens = nn.Embedding(cfg.vocab_size, hidden)
        self.fc = nn.Linear(3 * target_hidden, hidden, bias=False)
        wide = copy.copy(cfg)  # the attention's q/k/v read [embedding, hidden state]
        wide.hidden_size = 2 * hidden
        wide.head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
        self.layers = nn.ModuleList([_MidLayer(cfg, wide, backend)])
        self.norm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(
            wide.head_dim, cfg.max_position_embeddings, rope_parameters(cfg)
        )

    @property
    def layer(self) -> _MidLayer:
        return self.layers[0]  # type: ignore[return-value]


class _MidLayer(nn.Module):
    """The checkpoint's ``midlayer``: a Llama decoder layer over [embedding, hidden state]."""

    def __init__(self, cfg: Any, wide: Any, backend: AttentionBackend) -> None:
        super().__init__()
        hidden = cfg.hidden_size
        self.self_attn = LlamaAttention(wide, backend, qkv_bias=False, qk_norm=False)
        self.self_attn.o_proj = nn.Linear(self.self_attn.q_size, hidden, bias=False)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, cfg.rms_norm_eps)


class Eagle3LlamaForCausalLM(nn.Module):
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping
    tie_word_embeddings = False

    def __init__(self, cfg: Any, backend: AttentionBackend) -> None:
        super().__init__()
        self.model = _Body(cfg, backend)
        self.vocab_size = cfg.vocab_size
        self.draft_vocab_size = getattr(cfg, "draft_vocab_size", None) or cfg.vocab_size
        self.lm_head = nn.Linear(cfg.hidden_size, self.draft_vocab_size, bias=False)
        self.d2t: torch.Tensor
        self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.long))
        self.has_embedding = False  # the checkpoint brought its own embed_tokens
        self.eagle_config = getattr(cfg, "eagle_config", None)  # aux_layer_ids reads it
        self.hidden_in = torch.empty(0)
        self.hidden_out = torch.empty(0)

    @property
    def attention_layers(self) -> list[LlamaAttention]:
        return [self.model.layer.self_attn]

    def combine(self, aux: torch.Tensor) -> torch.Tensor:
        """The target's hidden states of the 3 layers, concatenated [T, 3 x H], as one."""
        return self.model.fc(aux)

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        body, layer = self.model, self.model.layer
        emb = body.embed_tokens(input_ids)
        hidden = self.hidden_in
        x = torch.cat([layer.input_layernorm(emb), layer.hidden_norm(hidden)], dim=-1)
        attn = layer.self_attn(positions, x, body.rotary, meta)
        total, h = layer.post_attention_layernorm.add_forward(hidden, attn)
        self.hidden_out = total + layer.mlp(h)
        return body.norm(self.hidden_out)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the target's vocabulary: a draft-vocabulary row goes to its target id
        (``d2t``); the tokens outside the draft vocabulary get -inf (never drafted)."""
        logits = self.lm_head(hidden).float()
        if self.draft_vocab_size == self.vocab_size and not bool(self.d2t.any()):
            return logits
        out = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        ids = torch.arange(self.draft_vocab_size, device=logits.device) + self.d2t
        out[:, ids] = logits
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The EAGLE-3 names: ``midlayer.*`` (or ``layers.0.*``), ``fc``, ``norm``,
        ``lm_head``, ``d2t`` (``t2d`` is not needed), optionally ``embed_tokens``."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        self.d2t.zero_()  # NOTE: built on meta, then emptied: absent from a checkpoint, it is 0
        for name, tensor in weights:
            if name.endswith("t2d"):
                continue
            if name.endswith("d2t"):
                self.d2t.copy_(tensor.to(torch.long))
                continue
            name = name.replace("midlayer.", "layers.0.")
            if not name.startswith(("model.", "lm_head.")):
                name = f"model.{name}"
            shard: Any = None
            for src, (fused_name, shard_id) in self.packed_modules_mapping.items():
                if f".{src}." in name:
                    name, shard = name.replace(f".{src}.", f".{fused_name}."), shard_id
                    break
            if name not in params:
                raise ValueError(f"EAGLE-3 checkpoint tensor {name!r} has no matching parameter")
            dst = params[name].data
            if shard is not None:
                module: Any = self.get_submodule(name.rsplit(".", 1)[0])
                offset, size = module.shard_offsets[shard]
                dst = dst.narrow(0, offset, size)
            if dst.shape != tensor.shape:
                raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                                 f"model {tuple(dst.shape)}")  # fmt: skip
            dst.copy_(tensor)
            loaded.add(f"{name}:{shard}")
        self.has_embedding = "model.embed_tokens.weight:None" in loaded
        missing = {f"{n}:None" for n in params} - loaded - {"model.embed_tokens.weight:None"}
        missing = {m for m in missing if "qkv_proj" not in m and "gate_up_proj" not in m}
        if missing:
            raise ValueError(f"EAGLE-3 checkpoint is missing {sorted(missing)[:4]}")
