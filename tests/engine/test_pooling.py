"""Pooling models (embeddings, classification heads, a yes/no reranker) equal transformers."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from services.engine import LLM
from services.engine.pooling_params import PoolingParams
from tests.conftest import TINY_CONFIG, tokenizer_source

COMMON = {**TINY_CONFIG, "head_dim": 32}


def save_tiny(model: torch.nn.Module, out: Path) -> Path:
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_source() / name, out / name)
    return out


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 49000, (n,), generator=g).tolist() for n in (1, 7, 33, 64, 3)]


def cosine(a: list[float], b: torch.Tensor) -> float:
    return float(F.cosine_similarity(torch.tensor(a), b.float(), dim=0))


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory) -> Path:
    """A bare Qwen3Model checkpoint (tensor names without "model.", as Qwen3-Embedding)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(**COMMON, tie_word_embeddings=True)
    cfg.architectures = ["Qwen3Model"]
    return save_tiny(transformers.Qwen3Model(cfg).eval(), tmp_path_factory.mktemp("qwen3-embed"))


def hf_last_token(model_dir: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).last_hidden_state[0, -1]


def test_embeddings_equal_transformers_last_token(qwen3_model: Path) -> None:
    # A small step budget: the five prompts run in several batches, some of several prompts.
    llm = LLM(str(qwen3_model), max_num_batched_tokens=80)
    assert llm.engine.pooling_task == "embed"
    outs = llm.encode(prompts())
    for ids, out in zip(prompts(), outs, strict=True):
        ref = F.normalize(hf_last_token(qwen3_model, ids), dim=-1)
        assert len(out.data) == 64 and out.num_prompt_tokens == len(ids)
        assert abs(torch.tensor(out.data).norm() - 1) < 1e-5
        assert cosine(out.data, ref) >= 1 - 1e-4
    # Matryoshka: the first 16 values, renormalised.
    short = llm.encode(prompts()[2:3], PoolingParams(dimensions=16))[0]
    ref = F.normalize(hf_last_token(qwen3_model, prompts()[2])[:16], dim=-1)
    assert len(short.data) == 16 and cosine(short.data, ref) >= 1 - 1e-4


def test_causal_lm_served_for_embeddings(tiny_model_dir) -> None:
    """A *ForCausalLM checkpoint (how Qwen3-Embedding ships) with pooling="embed"."""
    model_dir = tiny_model_dir("qwen3")
    outs = LLM(str(model_dir), pooling="embed").encode(prompts()[:3])
    for ids, out in zip(prompts()[:3], outs, strict=True):
        ref = F.normalize(hf_last_token(model_dir, ids), dim=-1)
        assert cosine(out.data, ref) >= 1 - 1e-4


@pytest.mark.parametrize("num_labels", [1, 3])
def test_classification_head_equals_transformers(tmp_path: Path, num_labels: int) -> None:
    import transformers

    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(**COMMON, num_labels=num_labels, tie_word_embeddings=False)
    hf = transformers.Qwen2ForSequenceClassification(cfg).eval()
    llm = LLM(str(save_tiny(hf, tmp_path / "cls")))
    assert llm.engine.pooling_task == "classify"
    outs = llm.encode(prompts())
    for ids, out in zip(prompts(), outs, strict=True):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0]
        ref = logits.sigmoid() if num_labels == 1 else logits.softmax(-1)
        assert torch.allclose(torch.tensor(out.data), ref, atol=1e-5), (out.data, ref)


def test_yes_no_reranker_equals_causal_lm_probability(tiny_model_dir) -> None:
    """classifier_from_tokens "no,yes": the score is P(yes) of the two next-token logits."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("qwen3")
    llm = LLM(str(model_dir), classifier_from_tokens="no,yes")
    tok = llm.tokenizer
    no, yes = tok.convert_tokens_to_ids("no"), tok.convert_tokens_to_ids("yes")
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    outs = llm.encode(prompts())
    for ids, out in zip(prompts(), outs, strict=True):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1]
        ref = logits[[no, yes]].softmax(-1)[1]
        assert len(out.data) == 1 and abs(out.data[0] - float(ref)) < 1e-5


def test_bad_pooling_inputs_are_value_errors(qwen3_model: Path) -> None:
    llm = LLM(str(qwen3_model), max_model_len=64)
    pooler = llm.engine.pooler
    assert pooler is not None
    for ids, params, match in [
        ([], PoolingParams(), "empty"),
        ([5] * 65, PoolingParams(), "context length"),
        ([5], PoolingParams(dimensions=65), "exceeds"),
        ([5], PoolingParams(task="classify"), "serves the 'embed' task"),
        ([49152], PoolingParams(), "token ids"),
    ]:
        with pytest.raises(ValueError, match=match):
            pooler.add("r", ids, params)
    assert not pooler.has_work
    with pytest.raises(ValueError, match="pooling model"):
        llm.generate([[5, 6]])
    with pytest.raises(ValueError, match="dimensions must be"):
        PoolingParams(dimensions=0)


@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_encoder_cls_embeddings_equal_transformers(tmp_path: Path, family: str) -> None:
    """BERT / XLM-RoBERTa (bge-m3): bidirectional attention, the [CLS] state, normalised."""
    import transformers

    torch.manual_seed(2)
    shape = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=80)  # fmt: skip
    if family == "bert":
        hf = transformers.BertModel(transformers.BertConfig(**shape), add_pooling_layer=True)
    else:
        cfg = transformers.XLMRobertaConfig(**shape, pad_token_id=1)
        hf = transformers.XLMRobertaModel(cfg, add_pooling_layer=False)
    hf.eval()
    llm = LLM(str(save_tiny(hf, tmp_path / family)), max_num_batched_tokens=80)
    assert llm.engine.pooling_task == "embed"
    # XLM-RoBERTa's positions start at pad_token_id + 1: 78 of its 80 are usable.
    assert llm.engine.pooler.max_model_len == (80 if family == "bert" else 78)
    outs = llm.encode(prompts())
    for ids, out in zip(prompts(), outs, strict=True):
        with torch.no_grad():
            ref = F.normalize(hf(torch.tensor([ids])).last_hidden_state[0, 0], dim=-1)
        assert cosine(out.data, ref) >= 1 - 1e-4


def test_async_engine_pools_concurrent_requests(qwen3_model: Path) -> None:
    """The step thread batches concurrent pool() calls; a bad input fails alone."""
    from services.engine import AsyncLLMEngine, EngineConfig

    async def run() -> None:
        engine = AsyncLLMEngine(EngineConfig(model=str(qwen3_model)))
        await engine.start()
        try:
            calls = [engine.pool(f"r{i}", ids, PoolingParams()) for i, ids in enumerate(prompts())]
            bad = engine.pool("bad", [5] * 600, PoolingParams())
            *outs, err = await asyncio.gather(*calls, bad, return_exceptions=True)
            assert isinstance(err, ValueError) and "context length" in str(err)
            for ids, out in zip(prompts(), outs, strict=True):
                ref = F.normalize(hf_last_token(qwen3_model, ids), dim=-1)
                assert cosine(out.data, ref) >= 1 - 1e-4
            assert not engine.engine.pooler.has_work
        finally:
            await engine.shutdown()

    asyncio.run(run())
