"""Which model's workers load each ``epdserve up --lora-modules`` adapter, and the checks that
refuse an adapter trained for another model before anything starts.

``--lora-modules MODEL:name=path`` gives the adapter to the workers of the model served as
MODEL; ``name=path`` (no MODEL) is for the only model, and an error with several (an adapter
given to every model's workers was loaded into models it was not trained for). A models file
entry lists its own: ``"lora_modules": ["name=path", ...]``.

An adapter is refused when its ``adapter_config.json`` names a base model
(``base_model_name_or_path``) that is not this one (compared by full path or by last path
component, the form a Hugging Face id and a local copy of it share), and, for a model
folder, when a factor's shape does not fit the model's layers (read from the safetensors
header: nothing is loaded). The engine checks the shapes again when it loads the adapter.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol

ADAPTER_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class Group(Protocol):
    model: str | None
    lora_modules: list[str]


def split_entry(entry: str) -> tuple[str | None, str]:
    """(MODEL or None, "name=path") of one --lora-modules entry (ValueError: malformed)."""
    name, sep, path = entry.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules entries are [MODEL:]name=path, got {entry!r}")
    model, colon, name = name.rpartition(":")
    if colon and not (model and name):
        raise ValueError(f"--lora-modules entries are [MODEL:]name=path, got {entry!r}")
    return (model or None), f"{name}={path}"


def assign(groups: list[Group], names: list[str], entries: list[str]) -> None:
    """Add each entry to the ``lora_modules`` of the group it names (``names``: the groups'
    served names, in order). ValueError for an unknown model, a missing one with several."""
    for entry in entries:
        model, module = split_entry(entry)
        if model is None:
            if len(groups) > 1:
                raise ValueError(
                    f"--lora-modules {entry}: the cluster serves {len(groups)} models; say "
                    f"which one the adapter is for: MODEL:{entry} (MODEL one of "
                    f"{', '.join(names)})"
                )
            groups[0].lora_modules.append(module)
        elif model not in names:
            raise ValueError(f"--lora-modules {entry}: no model is served as {model!r} "
                             f"(served: {', '.join(names)})")  # fmt: skip
        else:
            groups[names.index(model)].lora_modules.append(module)


def _same_model(base: str, model: str | None, served: str) -> bool:
    def norm(s: str) -> str:
        return s.strip().rstrip("/").lower()

    def last(s: str) -> str:
        return norm(s).rsplit("/", 1)[-1].removesuffix(".gguf")

    candidates = {served} | ({model} if model else set())
    return any(norm(base) == norm(c) or last(base) == last(c) for c in candidates) or (
        model is not None and Path(model).is_dir() and _config_name(Path(model)) == norm(base)
    )


def _config_name(folder: Path) -> str:
    """The ``_name_or_path`` a model folder's config.json records (transformers writes the
    id it was loaded from), lowercased; "" when none."""
    try:
        return str(
            json.loads((folder / "config.json").read_text()).get("_name_or_path", "")
        ).lower()
    except (OSError, ValueError, AttributeError):
        return ""


def check_adapters(group: Group, served: str) -> None:
    """ValueError naming the adapter and the model when one of ``group``'s adapters is not
    for its model (see the module's docstring); an unreadable folder is the engine's error."""
    for module in group.lora_modules:
        name, path = module.split("=", 1)
        folder = Path(path)
        try:
            config = json.loads((folder / "adapter_config.json").read_text())
        except (OSError, ValueError):
            continue  # the engine says what is wrong with it, at load
        base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        if isinstance(base, str) and base and not _same_model(base, group.model, served):
            raise ValueError(
                f"LoRA adapter {name} ({path}) was trained for {base!r}, not for the model "
                f"served as {served!r} ({group.model or 'the embedded default'})"
            )
        if group.model is not None and Path(group.model).is_dir():
            _check_shapes(name, folder, Path(group.model), served)


def _check_shapes(name: str, folder: Path, model: Path, served: str) -> None:
    try:
        cfg = json.loads((model / "config.json").read_text())
        h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or h // heads
        kv = (cfg.get("num_key_value_heads") or heads) * head_dim
    except (OSError, ValueError, KeyError, TypeError):
        return  # not a config this check knows (the engine checks every model)
    dims = {"q_proj": (h, heads * head_dim), "k_proj": (h, kv), "v_proj": (h, kv),
            "o_proj": (heads * head_dim, h), "gate_proj": (h, inter), "up_proj": (h, inter),
            "down_proj": (inter, h)}  # fmt: skip
    try:
        from safetensors import safe_open

        with safe_open(str(folder / ADAPTER_FILE), "pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception:  # noqa: BLE001 - missing or unreadable: the engine's error at load
        return
    for key, shape in shapes.items():
        m = _KEY.search(key)
        if m is None or m.group(2) not in dims or len(shape) != 2:
            continue
        layer, module, factor = int(m.group(1)), m.group(2), m.group(3)
        d_in, d_out = dims[module]
        fits = shape[1] == d_in if factor == "A" else shape[0] == d_out
        if layer >= layers or not fits:
            raise ValueError(
                f"LoRA adapter {name} ({folder}) does not fit the model served as {served!r}: "
                f"{key} has shape {tuple(shape)}, the model's layer {layer} {module} has "
                f"{d_in} inputs and {d_out} outputs ({layers} layers)"
            )
