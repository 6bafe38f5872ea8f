"""oneDNN packed linears on the CPU: same results as F.linear, weights freed, ties kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from services.engine.config import EngineConfig
from services.engine.layers.cpu_linear import OneDNNLinear, onednn_available, pack_linears

pytestmark = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


class Tiny(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 24)
        self.up = nn.Linear(24, 40, bias=True)
        self.down = nn.Linear(40, 24, bias=False)
        self.lm_head = nn.Linear(24, 50, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as in SmolLM2
        self.to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.down(torch.relu(self.up(self.embed(ids)))))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_packed_model_computes_what_the_unpacked_one_does(dtype, tol):
    torch.manual_seed(0)
    model = Tiny(dtype)
    ids = torch.randint(0, 50, (3, 7))  # a 3-d activation: [batch, tokens, features]
    with torch.no_grad():
        ref = model(ids).float()
        assert pack_linears(model, "onednn") == 3
        got = model(ids).float()
    assert all(isinstance(m.forward, OneDNNLinear) for m in (model.up, model.down, model.lm_head))
    assert torch.allclose(got, ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_untied_weights_are_freed_and_the_tied_one_kept():
    model = Tiny()
    pack_linears(model, "onednn")
    assert model.up.weight.numel() == 0 and model.down.weight.numel() == 0
    assert model.lm_head.weight is model.embed.weight and model.embed.weight.shape == (50, 24)
    assert (model.up.in_features, model.up.out_features) == (24, 40)


def test_torch_backend_leaves_the_model_alone_and_unknown_backends_are_refused():
    model = Tiny()
    assert pack_linears(model, "torch") == 0
    assert model.up.weight.shape == (40, 24) and "forward" not in vars(model.up)
    with pytest.raises(ValueError, match="cpu linear backend"):
        pack_linears(model, "mkl")
    with pytest.raises(ValueError, match="cpu_linear"):
        EngineConfig(cpu_linear="fast")


def test_auto_packs_only_when_onednn_is_faster(monkeypatch):
    from services.engine.layers import cpu_linear

    monkeypatch.setattr(cpu_linear, "_faster", lambda m: False)
    assert pack_linears(Tiny(), "auto") == 0
    monkeypatch.setattr(cpu_linear, "_faster", lambda m: True)
    assert pack_linears(Tiny(), "auto") == 3
