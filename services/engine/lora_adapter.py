"""Reading a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) and
mapping its low-rank factors onto the engine's modules, fused projections included.

PEFT stores ``lora_A`` [r, in] and ``lora_B`` [out, r] per target module (``q_proj``,
``gate_proj``, ...) and computes ``W x + (alpha / r) B A x``. The engine fuses q/k/v and
gate/up into one ``PackedLinear``; an adapter's factors for each shard map onto that shard's
rows of the fused output (``models/llama.py``'s ``packed_modules_mapping`` and
``shard_offsets``). The scaling is folded into B once here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# PEFT's target module names the engine serves (the decoder's linear layers).
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


@dataclass
class ModuleFactors:
    """One adapter's factors for one engine module, per shard (None: not a fused module)."""

    a: dict[Any, torch.Tensor]  # shard -> A [r, in]
    b: dict[Any, torch.Tensor]  # shard -> B [out_shard, r], scaling folded in


@dataclass
class LoRAAdapter:
    """An adapter read into host memory, keyed like the engine's modules."""

    name: str
    path: str
    rank: int  # the largest rank of any module
    # (layer index, engine module name e.g. "qkv_proj") -> factors
    modules: dict[tuple[int, str], ModuleFactors]


def _read_config(folder: Path) -> dict[str, Any]:
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        raise ValueError(f"LoRA adapter {str(folder)!r} has no adapter_config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise ValueError(f"LoRA adapter {str(folder)!r}: bad adapter_config.json: {exc}") from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"LoRA adapter {str(folder)!r}: peft_type {cfg.get('peft_type')!r}")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if cfg.get(key) == bad:
            raise ValueError(f"LoRA adapter {str(folder)!r}: {key}={bad} is not supported")
    if cfg.get("modules_to_save"):
        raise ValueError(f"LoRA adapter {str(folder)!r}: modules_to_save is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"LoRA adapter {str(folder)!r}: bias={cfg['bias']!r} is not supported")
    return cfg


def _scaling(cfg: dict[str, Any], module: str, rank: int) -> float:
    alpha = float(cfg.get("lora_alpha", rank))
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.search(pattern, module):
            alpha = float(value)
    if cfg.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


def load_adapter(
    name: str,
    path: str,
    packed_modules_mapping: dict[str, tuple[str, Any]],
    num_layers: int,
    max_rank: int,
) -> LoRAAdapter:
    """Read the PEFT adapter at ``path`` (a folder). Raises ValueError, naming the adapter,
    for anything the engine cannot serve: other PEFT types, DoRA, embedding or lm_head
    targets, ranks over ``max_rank``, layers the model lacks."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    # NOTE: a name too long, a folder without permission (is_file raises those) or a broken
    # weights file was not a ValueError: the LoadLoRA RPC ended UNKNOWN, not a 400.
    try:
        cfg = _read_config(folder)
        weights_file = folder / "adapter_model.safetensors"
        if not weights_file.is_file():
            raise ValueError(f"LoRA adapter {path!r} has no adapter_model.safetensors")
        tensors = load_file(str(weights_file))
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"LoRA adapter {path!r} cannot be read: {exc}") from None
    factors: dict[tuple[int, str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.search(key)
        if m is None:
            raise ValueError(f"LoRA adapter {path!r}: tensor {key!r} targets no supported module")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if module not in SUPPORTED_TARGETS:
            raise ValueError(f"LoRA adapter {path!r}: target module {module!r} is not supported")
        if layer >= num_layers:
            raise ValueError(f"LoRA adapter {path!r}: layer {layer} is not in the model")
        factors.setdefault((layer, module, key[: m.start(3)]), {})[which] = tensor.float()
    modules: dict[tuple[int, str], ModuleFactors] = {}
    rank = 0
    for (layer, module, prefix), ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {path!r}: {prefix} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r:
            raise ValueError(f"LoRA adapter {path!r}: {prefix} has mismatched A/B shapes")
        if r > max_rank:
            raise ValueError(
                f"LoRA adapter {path!r} has rank {r}, over the engine's max_lora_rank {max_rank}"
            )
        rank = max(rank, r)
        target, shard = packed_modules_mapping.get(module, (module, None))
        entry = modules.setdefault((layer, target), ModuleFactors({}, {}))
        entry.a[shard] = a
        entry.b[shard] = b * _scaling(cfg, prefix, r)
    if not modules:
        raise ValueError(f"LoRA adapter {path!r} has no LoRA weights")
    return LoRAAdapter(name, str(folder), rank, modules)
