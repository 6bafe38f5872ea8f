"""BERT and XLM-RoBERTa encoders with Hugging Face parameter names: embedding models with
CLS pooling (bge-m3's dense vectors).

Encoder-only: each prompt attends to itself both ways, whole (the pooler runs prompts
unchunked), and nothing is cached or generated. The engine serves these as pooling models
only; ``pooling_type`` tells the pooler which token's state is the embedding. The parts the
engine expects of its decoders are stand-ins: ``lm_head`` only says the vocabulary size,
``attention_layers`` take the (one-block) KV cache the runner hands out and never use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.engine import heartbeat
from services.engine.layers.attention import AttentionBackend, AttentionMetadata

_ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}  # fmt: skip
# Checkpoint tensors an embedding model does not use: the NSP/classification pooler, the
# position-id buffers, a task head's prefix is dropped below.
_UNUSED = ("pooler.", "position_ids", "token_type_ids", "lm_head.", "cls.")


class _VocabOnly(nn.Module):
    """Stands in for a decoder's ``lm_head``: the vocabulary size, no weights."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.out_features = vocab_size


class _DenseNorm(nn.Module):
    """``dense`` then ``LayerNorm`` of the residual sum (BertSelfOutput, BertOutput)."""

    def __init__(self, cfg: Any, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.num_heads = self.num_kv_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_cache = torch.empty(0)  # set by the runner, never used
        self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = (p(x).view(t, self.num_heads, self.head_dim).transpose(0, 1)
                   for p in (self.query, self.key, self.value))  # fmt: skip
        out = torch.empty_like(q)
        for seg in meta.prefills:  # NOTE: one whole prompt each, attending both ways
            s = slice(seg.start, seg.start + seg.num_tokens)
            out[:, s] = F.scaled_dot_product_attention(q[:, s], k[:, s], v[:, s])
        return out.transpose(0, 1).reshape(t, -1)


class BertAttention(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = _DenseNorm(cfg, cfg.hidden_size)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = _DenseNorm(cfg, cfg.intermediate_size)
        act = getattr(cfg, "hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {act!r} (supported: {sorted(_ACTIVATIONS)})")
        self.act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, meta), x)
        return self.output(self.act(self.intermediate.dense(x)), x)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])  # one segment


class BertEncoder(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BertModel(nn.Module):
    """BERT's encoder; the pooled embedding is the first ([CLS]) token's final state."""

    pooling_type = "cls"
    tie_word_embeddings = False

    def __init__(self, cfg: Any, backend: AttentionBackend) -> None:
        super().__init__()
        if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        self.position_offset = self._position_offset(cfg)
        self.max_positions = cfg.max_position_embeddings - self.position_offset
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.layers: list[BertLayer] = list(self.encoder.layer)  # type: ignore[arg-type]
        self.lm_head = _VocabOnly(cfg.vocab_size)
        self.vocab_size = cfg.vocab_size  # what the engine reads (the logits' width)

    @staticmethod
    def _position_offset(cfg: Any) -> int:
        return 0

    @property
    def model(self) -> SimpleNamespace:
        """What the engine reads of a decoder's ``model``: the token embedding, and rotary
        buffers to build (none: positions are learned)."""
        rotary = SimpleNamespace(build=lambda device: None)
        return SimpleNamespace(embed_tokens=self.embeddings.word_embeddings, rotary=rotary)

    @property
    def attention_layers(self) -> list[BertSelfAttention]:
        return [layer.attention.self for layer in self.layers]

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embeddings(input_ids, positions + self.position_offset)
        for layer in self.layers:
            x = layer(x, meta)
            heartbeat.beat()  # a slow step is not a stuck one (heartbeat.py)
        return x

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (Hugging Face names, with or without the task model's
        ``bert.`` / ``roberta.`` prefix) into the parameters; every parameter must be given."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            for prefix in ("bert.", "roberta."):
                name = name.removeprefix(prefix)
            if any(name.startswith(u) or name.endswith(u) for u in _UNUSED):
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter")
            if params[name].shape != tensor.shape:
                raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                                 f"model {tuple(params[name].shape)}")  # fmt: skip
            params[name].data.copy_(tensor)
            loaded.add(name)
        if missing := sorted(set(params) - loaded):
            raise ValueError(f"checkpoint is missing tensors: {missing[:4]}")


class XLMRobertaModel(BertModel):
    """XLM-RoBERTa (bge-m3): BERT with positions counted from ``pad_token_id + 1``."""

    @staticmethod
    def _position_offset(cfg: Any) -> int:
        return int(cfg.pad_token_id) + 1
