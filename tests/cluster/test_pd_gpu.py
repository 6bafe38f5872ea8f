"""PD on a CUDA device (skipped without one): with the non-CUDA Mooncake wheel the workers'
KV goes through pinned host staging slots (``--kv-staging auto``), and the outputs equal a
co-located worker's on the same GPU."""

from __future__ import annotations

import pytest
import torch
from cluster_helpers import start_cluster
from test_pd import PROMPTS, complete, concurrently, staging_slots

from tests.deps import MOONCAKE, require

require("mooncake.engine", MOONCAKE)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ON_GPU = {"dtype": "float32"}


def test_pd_on_cuda_equals_colocated(tiny_model_dir):
    from services.worker.main import _mooncake_flavour

    model = tiny_model_dir("llama")
    colocated = start_cluster(model, workers=1, device="cuda", engine_overrides=ON_GPU)
    try:
        expected = concurrently(complete, [(colocated.base_url, p) for p in PROMPTS])
    finally:
        colocated.stop()
    pd = start_cluster(
        model, workers=0, prefill=1, decode=1, device="cuda", engine_overrides=ON_GPU
    )
    try:
        got = concurrently(complete, [(pd.base_url, p) for p in PROMPTS])
        for e, g in zip(expected, got, strict=True):
            assert g["choices"][0]["text"] == e["choices"][0]["text"]
            for a, b in zip(
                g["choices"][0]["logprobs"]["token_logprobs"],
                e["choices"][0]["logprobs"]["token_logprobs"],
                strict=True,
            ):
                assert abs(a - b) < 1e-4
        if _mooncake_flavour() == "non-cuda":  # the KV went through staging slots
            slots = staging_slots(pd)
            assert all(free == total > 0 for free, total in slots), slots
    finally:
        pd.stop()
