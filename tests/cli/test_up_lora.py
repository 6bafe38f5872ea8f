"""`epdserve up --lora-modules`: an adapter goes to the model it names, the one-model form
keeps working, and an adapter trained for another model is refused before anything starts
(by the base model its adapter_config.json names, and by the shapes of its factors)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

from services.cli.cluster_spec import ClusterSpec, ModelGroup
from services.cli.up import add_arguments, model_groups

H, INTER, LAYERS = 8, 16, 2


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def model_dir(tmp_path, name: str):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "hidden_size": H, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": 2, "num_key_value_heads": 1,
    }))  # fmt: skip
    return folder


def adapter(tmp_path, name: str, base: str | None, d_in: int = H):
    """An adapter of q_proj and down_proj on every layer (q_proj's A with ``d_in`` inputs)."""
    folder = tmp_path / name
    folder.mkdir()
    tensors = {}
    for layer in range(LAYERS):
        key = f"base_model.model.model.layers.{layer}"
        tensors[f"{key}.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, d_in)
        tensors[f"{key}.self_attn.q_proj.lora_B.weight"] = torch.zeros(H, 2)
        tensors[f"{key}.mlp.down_proj.lora_A.weight"] = torch.zeros(2, INTER)
        tensors[f"{key}.mlp.down_proj.lora_B.weight"] = torch.zeros(H, 2)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    if base is not None:
        config["base_model_name_or_path"] = base
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_each_adapter_goes_to_the_model_it_names(tmp_path) -> None:
    a, b = model_dir(tmp_path, "a"), model_dir(tmp_path, "b")
    sql = adapter(tmp_path, "sql", str(a))
    chat = adapter(tmp_path, "chat", "someorg/b")  # a hub id of b: its last component
    groups = model_groups(parse("--model", str(a), "--model", str(b), "--lora-modules",
                                f"a:sql={sql}", f"b:chat={chat}"), mixed=1)  # fmt: skip
    assert [g.lora_modules for g in groups] == [[f"sql={sql}"], [f"chat={chat}"]]
    # One model: the plain form, as before.
    (one,) = model_groups(parse("--model", str(a), "--lora-modules", f"sql={sql}"), mixed=1)
    assert one.lora_modules == [f"sql={sql}"]
    # A models file lists each model's own.
    f = tmp_path / "models.json"
    f.write_text(json.dumps([{"model": str(a), "lora_modules": [f"sql={sql}"]},
                             {"model": str(b), "mixed": 2}]))  # fmt: skip
    groups = model_groups(parse("--models-file", str(f), "--lora-modules", f"b:chat={chat}"),
                          mixed=1)  # fmt: skip
    assert groups == [ModelGroup(str(a), lora_modules=[f"sql={sql}"]),
                      ModelGroup(str(b), mixed=2, lora_modules=[f"chat={chat}"])]  # fmt: skip


@pytest.mark.parametrize(
    "case, message",
    [
        ("no model named", "say which one the adapter is for"),
        ("unknown model", "no model is served as 'c'"),
        ("trained for the other model", "was trained for"),
        ("shapes of another model", "does not fit the model served as 'a'"),
        ("layer past the model's", "does not fit"),
        ("models file entry names a model", "the entry is the model"),
    ],
)
def test_an_adapter_for_another_model_is_refused(tmp_path, case: str, message: str) -> None:
    a, b = model_dir(tmp_path, "a"), model_dir(tmp_path, "b")
    two = ("--model", str(a), "--model", str(b))
    if case == "no model named":
        args = parse(*two, "--lora-modules", f"sql={adapter(tmp_path, 'sql', None)}")
    elif case == "unknown model":
        args = parse(*two, "--lora-modules", f"c:sql={adapter(tmp_path, 'sql', None)}")
    elif case == "trained for the other model":
        args = parse(*two, "--lora-modules", f"a:sql={adapter(tmp_path, 'sql', str(b))}")
    elif case == "shapes of another model":
        args = parse(*two, "--lora-modules", f"a:sql={adapter(tmp_path, 'sql', None, H * 2)}")
    elif case == "layer past the model's":
        folder = adapter(tmp_path, "sql", None)
        extra = {"base_model.model.model.layers.5.mlp.down_proj.lora_A.weight":
                 torch.zeros(2, INTER)}  # fmt: skip
        save_file(extra, str(folder / "adapter_model.safetensors"))
        args = parse("--model", str(a), "--lora-modules", f"sql={folder}")
    else:
        f = tmp_path / "models.json"
        f.write_text(json.dumps([{"model": str(a), "lora_modules": ["a:sql=/x"]}]))
        args = parse("--models-file", str(f))
    with pytest.raises(ValueError, match=message):
        model_groups(args, mixed=1)


def test_a_spec_cannot_give_one_adapter_list_to_several_models() -> None:
    with pytest.raises(ValueError, match="give each model its own LoRA adapters"):
        ClusterSpec(model="/x/a", more_models=[ModelGroup("/y/b")],
                    engine_overrides={"lora_modules": ["sql=/p"]})  # fmt: skip


@pytest.mark.parametrize("model", [None, "/models/m.gguf"], ids=["default", "gguf"])
def test_a_gguf_or_default_model_s_adapter_shapes_are_checked_before_start(
    tmp_path, monkeypatch, model
) -> None:
    """The embedded default model (and any GGUF) is a folder only once converted: its
    adapters' shapes went unchecked and a misfit one failed the worker after the model
    loaded (40 s into `epdserve up`), where the README promises a refusal before start."""
    from services.cli.launcher import LocalCluster
    from services.engine import model_loader

    converted = model_dir(tmp_path, "converted")
    monkeypatch.setattr(model_loader, "resolve_model", lambda _m: str(converted))
    bad = adapter(tmp_path, "bad", None, H * 2)
    spec = ClusterSpec(model=model, lora_modules=[f"bad={bad}"])
    with pytest.raises(ValueError, match="does not fit the model"):
        LocalCluster(spec).prepare_model(lambda _msg: None)
    fits = ClusterSpec(model=model, lora_modules=[f"ok={adapter(tmp_path, 'ok', None)}"])
    LocalCluster(fits).prepare_model(lambda _msg: None)
