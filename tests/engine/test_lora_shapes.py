"""A LoRA adapter whose safetensors lie about its factors' shapes (or hold NaN) is refused at
load with a clear error naming the layer: before, one column of A or one row of B broadcast
silently into garbage output, and a wider A loaded fine and then aborted every request that
used it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.engine import LLM, SamplingParams
from tests.engine.lora_helpers import build_adapter

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def _lie(t: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    def change(key: str, v: torch.Tensor) -> torch.Tensor:
        if how == "wide_a" and "lora_A" in key:
            return torch.cat([v, v[:, :3]], 1)
        if how == "one_col_a" and "lora_A" in key:
            return v[:, :1].contiguous()
        if how == "tall_b" and "lora_B" in key:
            return torch.cat([v, v[:5]], 0)
        if how == "one_row_b" and "lora_B" in key:
            return v[:1].contiguous()
        if how == "nan_b" and "lora_B" in key:
            return torch.full_like(v, float("nan"))
        return v

    return {k: change(k, v) for k, v in t.items()}


@pytest.fixture(scope="module")
def good(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    base = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("lora-good")
    return base, build_adapter(base, out, seed=1, r=8, targets=["q_proj", "o_proj"])


def test_adapters_that_lie_about_their_shapes_are_refused(good, tmp_path) -> None:
    base, folder = good
    llm = LLM(str(base), dtype="float32", kv_cache_bytes=8 << 20, max_lora_rank=8,
              lora_modules=[f"good={folder}"])  # fmt: skip
    ref = llm.generate([[5, 6, 7]], GREEDY, lora="good")[0].outputs[0].token_ids
    for how, match in [("wide_a", "do not fit"), ("one_col_a", "do not fit"),
                       ("tall_b", "do not fit"), ("one_row_b", "do not fit"),
                       ("nan_b", "not finite")]:  # fmt: skip
        bad = tmp_path / how
        shutil.copytree(folder, bad)
        weights = bad / "adapter_model.safetensors"
        save_file(_lie(load_file(str(weights)), how), str(weights))
        with pytest.raises(ValueError, match=match):
            llm.engine.loras.add(how, str(bad))
    # The good adapter (in fp16 too) still loads and serves.
    half = tmp_path / "half"
    shutil.copytree(folder, half)
    weights = half / "adapter_model.safetensors"
    save_file({k: v.half() for k, v in load_file(str(weights)).items()}, str(weights))
    llm.engine.loras.add("half", str(half))
    assert llm.generate([[5, 6, 7]], GREEDY, lora="good")[0].outputs[0].token_ids == ref
    assert len(llm.generate([[5, 6, 7]], GREEDY, lora="half")[0].outputs[0].token_ids) == 4
