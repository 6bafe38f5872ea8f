"""Random Hugging Face models for the benchmarks: weights saved with transformers, beside the
embedded default model's tokenizer (so the router and the workers can serve them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def save_random(model: torch.nn.Module, out: Path) -> str:
    """Save ``model`` (a transformers model, random weights) and the tokenizer into ``out``."""
    from services.engine.model_loader import resolve_model

    model.eval().save_pretrained(str(out))  # type: ignore[operator]
    src = Path(resolve_model(None))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return str(out)
