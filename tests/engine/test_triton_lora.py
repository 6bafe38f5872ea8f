"""The CUDA path's Triton LoRA kernels (shrink / expand over rows grouped by slot),
interpreted on the CPU (``TRITON_INTERPRET=1``): against a per-row torch reference, and a
mixed batch of three adapters and the base model against the engine's torch path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.deps import TRITON, require
from tests.engine.lora_helpers import build_adapter

require("triton", TRITON)


def test_lora_kernels_in_the_interpreter(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    adapters = {
        "all": build_adapter(base, tmp_path / "all", seed=1, r=8),
        "attn": build_adapter(
            base, tmp_path / "attn", seed=2, r=4, targets=["q_proj", "v_proj", "o_proj"]
        ),  # fmt: skip
    }
    script = Path(__file__).with_name("triton_lora_check.py")
    modules = [f"{name}={path}" for name, path in adapters.items()]
    proc = subprocess.run(
        [sys.executable, str(script), str(base), *modules],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lora kernels ok" in proc.stdout and "lora engine ok" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lora_kernels_compiled_on_cuda():
    from tests.engine.triton_lora_check import check_kernels

    check_kernels("cuda", torch.float32, 1e-2)  # tl.dot: TF32 inputs
    check_kernels("cuda", torch.bfloat16, 3e-2)
