"""The fused MoE kernels of the CUDA path (``layers/triton_moe.py``), interpreted on the CPU
(``TRITON_INTERPRET=1``): the sort by expert, both grouped GEMMs against the torch reference
(with experts held by another rank), and a tiny Qwen2-MoE's greedy tokens through them; on a
GPU, the compiled kernels against the reference at Qwen3-30B-A3B's layer shape."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.deps import TRITON, require

require("triton", TRITON)


def test_fused_moe_in_the_interpreter(tiny_model_dir):
    script = Path(__file__).with_name("triton_moe_check.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir("qwen2_moe"))],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in ("align ok", "fused experts ok", "engine ok"):
        assert line in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 64, 300])
def test_fused_moe_compiled_matches_the_reference(dtype, tokens) -> None:
    from services.engine.layers import triton_moe
    from services.engine.layers.moe import experts_reference, route

    g = torch.Generator(device="cuda").manual_seed(0)
    experts, hidden, inter, top_k = 128, 2048, 768, 8  # one Qwen3-30B-A3B layer
    x = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=g) / 45).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device="cuda", generator=g) / 28).to(dtype)
    logits = torch.randn(tokens, experts, device="cuda", generator=g).to(dtype)
    weights, ids = route(logits, top_k, True)
    want = experts_reference(x, w13, w2, weights, ids).float()
    got = triton_moe.fused_experts(x, w13, w2, weights, ids).float()
    # bfloat16: the reference adds the k experts' outputs one rounding at a time.
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
