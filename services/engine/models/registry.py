"""Model classes keyed by the Hugging Face ``architectures`` string of config.json."""

from __future__ import annotations

from typing import Any

from services.engine.models.bert import BertModel, XLMRobertaModel
from services.engine.models.classification import (
    LlamaForSequenceClassification,
    Qwen2ForSequenceClassification,
    Qwen3ForSequenceClassification,
)
from services.engine.models.llama import LlamaForCausalLM
from services.engine.models.mixtral import MixtralForCausalLM
from services.engine.models.qwen2 import Qwen2ForCausalLM
from services.engine.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from services.engine.models.qwen2_moe import Qwen2MoeForCausalLM
from services.engine.models.qwen2_vl import Qwen2VLForConditionalGeneration
from services.engine.models.qwen3 import Qwen3ForCausalLM
from services.engine.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
    # Pooling models: a bare decoder (its checkpoint names lack "model."; embeddings) and
    # classification heads (scores).
    "LlamaModel": LlamaForCausalLM,
    "Qwen2Model": Qwen2ForCausalLM,
    "Qwen3Model": Qwen3ForCausalLM,
    "LlamaForSequenceClassification": LlamaForSequenceClassification,
    "Qwen2ForSequenceClassification": Qwen2ForSequenceClassification,
    "Qwen3ForSequenceClassification": Qwen3ForSequenceClassification,
    # Encoders (embeddings with CLS pooling; bidirectional, no KV cache).
    "BertModel": BertModel,  # type: ignore[dict-item]
    "XLMRobertaModel": XLMRobertaModel,  # type: ignore[dict-item]
}


def architecture(hf_config: Any) -> str:
    """The first of the config's ``architectures`` this engine knows."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return arch
    raise ValueError(
        f"unsupported model architecture {archs or '(none in config.json)'}; "
        f"supported: {sorted(MODEL_REGISTRY)}"
    )


def resolve_model_class(hf_config: Any) -> type[LlamaForCausalLM]:
    return MODEL_REGISTRY[architecture(hf_config)]
