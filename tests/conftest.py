"""Shared fixtures: tiny random models built with transformers (nothing is downloaded)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

FAMILIES = ("llama", "llama3_rope", "qwen2", "qwen3")


def build_tiny_model(family: str, out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer random model of ``family`` with the default model's tokenizer, saved as a
    Hugging Face folder (float32 safetensors)."""
    import torch
    import transformers

    from services.engine.model_loader import resolve_model

    common = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        # Larger than the usual 0.02 so that greedy choices are not near-ties.
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True)
        cls = transformers.LlamaForCausalLM
    elif family == "llama3_rope":
        cfg = transformers.LlamaConfig(
            **common,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=False)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
        cls = transformers.Qwen3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    if family == "qwen2":
        # Random init leaves biases at zero: give them values so the bias path is tested.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0, 0.2)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    src = Path(resolve_model(None))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, out_dir / name)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_model_dir(family)`` -> folder of a tiny random model (built once per session)."""
    cache: dict[str, Path] = {}

    def get(family: str = "llama") -> Path:
        if family not in cache:
            cache[family] = build_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from services.engine.model_loader import resolve_model

    return Path(resolve_model(None))
