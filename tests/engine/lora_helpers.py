"""Random PEFT LoRA adapters for tiny test models, and the transformers + peft reference."""

from __future__ import annotations

from pathlib import Path

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_adapter(
    base_dir: Path,
    out_dir: Path,
    seed: int,
    r: int = 8,
    targets: list[str] | None = None,
    rslora: bool = False,
) -> Path:
    """A PEFT LoRA adapter of the model at ``base_dir`` with random A and B (PEFT starts B
    at zero, which would change nothing), saved as adapter_config.json +
    adapter_model.safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=targets or ALL_TARGETS, use_rslora=rslora,
        lora_dropout=0.0, task_type="CAUSAL_LM",
    )  # fmt: skip
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


# Two engine slots, rank up to 8: room for both of sql_and_chat's adapters.
LORA_ENGINE = {"enable_lora": True, "max_loras": 2, "max_lora_rank": 8}


def sql_and_chat(base_dir: Path, tmp_path_factory, seeds: tuple[int, int]) -> dict[str, Path]:
    """Two adapters of the model at ``base_dir``: "sql" (rank 8) and "chat" (rank 4), made
    with ``seeds``, each in a folder of its own."""
    return {
        "sql": build_adapter(base_dir, tmp_path_factory.mktemp("sql"), seed=seeds[0], r=8),
        "chat": build_adapter(base_dir, tmp_path_factory.mktemp("chat"), seed=seeds[1], r=4),
    }


def peft_greedy(base_dir: Path, adapters: dict[str, Path], prompts, max_tokens: int):
    """Reference: transformers + peft, greedy with the adapter of each name and with none;
    {name or None: [(tokens, logprobs) per prompt]}."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(adapters[name]), adapter_name=name)
    peft_model.eval()
    out = {}
    for name in [*names, None]:
        if name is None:
            with peft_model.disable_adapter():
                out[None] = _greedy(peft_model, prompts, max_tokens)
        else:
            peft_model.set_adapter(name)
            out[name] = _greedy(peft_model, prompts, max_tokens)
    return out


def _greedy(model, prompts, max_tokens: int):
    results = []
    with torch.no_grad():
        for prompt in prompts:
            gen = model.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=max_tokens,
                min_new_tokens=max_tokens, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=0,
            )  # fmt: skip
            tokens = gen.sequences[0, len(prompt) :].tolist()
            lps = [
                float(torch.log_softmax(lg[0].float(), -1)[t])
                for lg, t in zip(gen.logits, tokens, strict=True)
            ]
            results.append((tokens, lps))
    return results
