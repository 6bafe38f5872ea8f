"""Sequence-classification heads on the decoder families (Hugging Face
``*ForSequenceClassification``): the decoder plus a ``score`` linear read on the last token.

The engine serves these as pooling models only (pooler.py applies the head); ``lm_head`` is
kept so that every model class has the same shape for the engine, but is never loaded.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from services.engine.layers.attention import AttentionBackend
from services.engine.models.llama import LlamaForCausalLM
from services.engine.models.qwen2 import Qwen2ForCausalLM
from services.engine.models.qwen3 import Qwen3ForCausalLM


class _ScoreHead(nn.Module):
    """Adds ``score`` (hidden -> num_labels, no bias) to the decoder class it precedes."""

    def __init__(self, cfg: Any, backend: AttentionBackend) -> None:
        super().__init__(cfg, backend)  # type: ignore[call-arg]
        num_labels = int(getattr(cfg, "num_labels", 0) or 0)
        if num_labels < 1:
            raise ValueError("a sequence-classification config needs num_labels >= 1")
        self.score = nn.Linear(cfg.hidden_size, num_labels, bias=False)


class LlamaForSequenceClassification(_ScoreHead, LlamaForCausalLM):
    pass


class Qwen2ForSequenceClassification(_ScoreHead, Qwen2ForCausalLM):
    pass


class Qwen3ForSequenceClassification(_ScoreHead, Qwen3ForCausalLM):
    pass
