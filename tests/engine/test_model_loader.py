"""Start-up cuts of the model build: transformers' config validators imported without its
activation functions (model_loader.py), modules built on meta without their initializers
(meta_init.py), rotary tables computed once, on the device."""

from __future__ import annotations

import sys

import torch
import transformers.utils
import transformers.utils.import_utils as import_utils

from services.engine import model_loader
from services.engine.layers.rotary import RotaryEmbedding
from services.engine.meta_init import meta_build

VALIDATORS = "transformers.utils.type_validators"


def test_config_validators_import_alone_and_see_torch_after(monkeypatch):
    monkeypatch.delitem(sys.modules, VALIDATORS, raising=False)
    monkeypatch.delattr(transformers.utils, "type_validators", raising=False)
    monkeypatch.setattr(model_loader, "LIGHT_IMPORTS", set())
    model_loader._import_config_validators()
    # Nothing but the validators themselves was imported while torch looked absent.
    assert model_loader.LIGHT_IMPORTS == {VALIDATORS}
    validators = sys.modules[VALIDATORS]
    assert validators.ACT2FN == {}  # the hidden_act name check is off (the models check it)
    assert validators.is_torch_available() and import_utils.is_torch_available()
    assert validators.torch is torch


def test_meta_build_skips_initializers_and_restores_them():
    saved = torch.nn.init.normal_
    with meta_build():
        assert torch.nn.init.normal_ is not saved
        emb = torch.nn.Embedding(10, 4)
        linear = torch.nn.Linear(4, 3)
    assert torch.nn.init.normal_ is saved
    assert emb.weight.is_meta and linear.weight.is_meta
    # Outside the build, initializers run as before.
    torch.manual_seed(0)
    first = torch.nn.Embedding(10, 4).weight.detach().clone()
    torch.manual_seed(0)
    assert torch.equal(torch.nn.Embedding(10, 4).weight, first)


def test_rotary_built_on_meta_waits_for_its_device():
    params = {"rope_type": "default", "rope_theta": 10000.0}
    with meta_build():
        meta = RotaryEmbedding(16, 64, params)
    assert meta.cos.numel() == 0  # nothing computed on meta
    meta.build(torch.device("cpu"))
    cpu = RotaryEmbedding(16, 64, params)
    assert torch.equal(meta.cos, cpu.cos) and torch.equal(meta.sin, cpu.sin)
