"""Convert and load model weights: a GGUF file into a cached Hugging Face folder, the
folder's config and tensors (where the files are: ``model_files``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from services.engine import model_files

logger = logging.getLogger(__name__)
# The modules the torch-less import of transformers' config validators brought in (see
# ``_import_config_validators``): that module alone, else another saw torch absent.
LIGHT_IMPORTS: set[str] = set()


def resolve_model(model: str | None) -> str:
    """``model_files.resolve_model``, converting a GGUF file in this process."""
    return model_files.resolve_model(model, convert=convert_gguf)


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF file into ``<cache>/models/<name>-<digest>/`` (config, tokenizer,
    float32 safetensors) the first time; later calls return the cached folder."""
    out = model_files.converted_folder(gguf_path)
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once)", gguf_path, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        # save_pretrained refuses GGUF-sourced models; the tensors are plain float32 by now.
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(model).__name__]
        config.save_pretrained(str(tmp))
        model.generation_config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_hf_config(folder: str) -> Any:
    _import_config_validators()
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def iter_safetensors(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, sharded (``model.safetensors.index.json``) or not."""
    from safetensors import safe_open

    root = Path(folder)
    index = root / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
    if not files and (bins := sorted(root.glob("pytorch_model*.bin"))):
        # NOTE: EAGLE heads are published as pytorch_model.bin; tensors only, no code runs.
        for path in bins:
            yield from torch.load(path, map_location="cpu", weights_only=True).items()
        return
    if not files:
        raise ValueError(f"no .safetensors files in {folder}")
    for name in files:
        with safe_open(str(root / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield key, f.get_tensor(key)


def read_tensor(folder: str, names: tuple[str, ...]) -> torch.Tensor | None:
    """The first of ``names`` that the checkpoint holds, reading that tensor only: a sharded
    checkpoint's index names its file, other files are searched by their headers; a
    ``.bin`` file is memory-mapped (its other tensors are never read). None if absent."""
    from safetensors import safe_open

    root = Path(folder)
    index = root / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        found = [(weight_map[n], n) for n in names if n in weight_map]
    else:
        found = []
        for path in sorted(root.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
            found += [(path.name, n) for n in names if n in keys]
    if found:
        file, name = min(found, key=lambda fn: names.index(fn[1]))
        with safe_open(str(root / file), framework="pt") as f:
            return f.get_tensor(name)
    for path in sorted(root.glob("pytorch_model*.bin")):
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # the legacy (not zip) format cannot be mapped
            raise ValueError(f"{path} cannot be memory-mapped ({exc}); convert the "
                             f"checkpoint to safetensors") from None  # fmt: skip
        for name in names:
            if name in tensors:
                return tensors[name].clone()  # NOTE: a copy: the mapping closes with the file
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m services.engine.model_loader FILE.gguf``: convert (once) and print the folder."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("gguf", type=Path)
    args = parser.parse_args(argv)
    print(convert_gguf(args.gguf), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def _import_config_validators() -> None:
    """Import transformers' config field validators without its activation functions.

    NOTE: transformers 5 model configs (``configuration_llama``...) import
    ``utils.type_validators``, which imports ``transformers.activations`` wherever torch is
    installed, only to check a config's ``hidden_act`` name; that module pulls in the hub
    kernels, the checkpoint conversions and ``torch.distributed.tensor`` (sympy with it): ~1 s
    of CPU at each worker start, which the engine never uses (its models map ``hidden_act``
    themselves). With torch reported absent for that one import, the validators skip the name
    check (``ACT2FN`` empty, as transformers does without torch); the module then sees torch
    as it is for every other check. A process that already imported it keeps it as it is.
    """
    if "transformers.utils.type_validators" in sys.modules:
        return
    # Its other imports first, as they are: only its own body may see torch absent.
    import huggingface_hub.dataclasses  # noqa: F401
    import transformers.image_utils
    import transformers.tokenization_utils_base
    import transformers.utils.generic
    import transformers.utils.import_utils as import_utils
    import transformers.video_utils  # noqa: F401

    before = set(sys.modules)
    real = import_utils.is_torch_available
    import_utils.is_torch_available = lambda: False  # type: ignore[assignment]
    try:
        import transformers.utils.type_validators as validators
    finally:
        import_utils.is_torch_available = real
    # NOTE: tests/engine/test_model_loader.py checks that nothing else was imported here.
    LIGHT_IMPORTS.update(set(sys.modules) - before)
    validators.is_torch_available = real  # type: ignore[attr-defined]
    validators.torch = torch  # type: ignore[attr-defined]
