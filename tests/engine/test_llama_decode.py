"""The CPU decode-step path (models/llama_decode.py) computes what the module calls compute."""

from __future__ import annotations

import pytest
import torch

from services.engine import model_runner as mr
from services.engine.config import EngineConfig
from services.engine.layers import cpu_fused
from services.engine.llm_engine import LLMEngine
from services.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(
    cpu_fused.ops() is None or mr.attention_backend(torch.device("cpu")).native_decode is None,
    reason="needs the CPU kernels (a C compiler)",
)


def decoding_engine(model_dir, n: int = 3) -> LLMEngine:
    eng = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_bytes=8 << 20, max_num_seqs=8))
    for i in range(n):
        prompt = [(7 * i + j) % 200 + 3 for j in range(5 + 4 * i)]
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        eng.add_request(f"r{i}", prompt, params)
    for _ in range(4):  # the prompts, then decodes of different context lengths
        eng.step()
    return eng


def capture_decode_batch(eng: LLMEngine, monkeypatch) -> dict:
    captured: dict = {}
    orig = mr.ModelRunner._forward

    def spy(self, ids, pos, meta, decodes, prefills):
        captured.update(ids=list(ids), pos=list(pos), meta=meta)
        return orig(self, ids, pos, meta, decodes, prefills)

    monkeypatch.setattr(mr.ModelRunner, "_forward", spy)
    eng.step()
    monkeypatch.undo()
    return captured


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_decode_path_equals_the_module_calls_bit_for_bit(tiny_model_dir, monkeypatch, family):
    eng = decoding_engine(tiny_model_dir(family))
    decoder = eng.runner.model.model
    path = decoder.decode_path
    assert path is not None and all(path.layers)
    steps = path.steps
    batch = capture_decode_batch(eng, monkeypatch)
    meta = batch["meta"]
    assert meta.num_decodes == 3 and not meta.prefills
    assert path.steps == steps + 1  # the engine's own step took the path
    ids = torch.tensor(batch["ids"])
    pos = torch.tensor(batch["pos"])
    with torch.inference_mode():
        # The same slots get the same K/V again: the two passes see the same cache.
        fast = decoder(ids, pos, meta)
        decoder.decode_path = None
        slow = decoder(ids, pos, meta)
        decoder.decode_path = path
    assert path.steps == steps + 2
    assert torch.equal(fast, slow)


def test_a_hooked_layer_keeps_its_module_call(tiny_model_dir, monkeypatch):
    eng = decoding_engine(tiny_model_dir("llama"))
    decoder = eng.runner.model.model
    seen = []
    handle = decoder.layers[1].register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    try:
        capture_decode_batch(eng, monkeypatch)
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].shape[0] == 3  # EAGLE-3 reads layer inputs this way


def test_a_prefill_step_takes_the_module_calls(tiny_model_dir):
    eng = LLMEngine(EngineConfig(model=str(tiny_model_dir("llama")), kv_cache_bytes=8 << 20))
    path = eng.runner.model.model.decode_path
    assert path is not None
    eng.add_request("a", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=2))
    eng.step()  # the prompt
    assert path.steps == 0
    eng.step()  # its decode
    assert path.steps == 1


def test_a_verification_step_takes_the_path_bit_for_bit(tiny_model_dir, monkeypatch):
    """Speculative verifications (short chunks whose query rows run as decode rows of the
    paged kernel) take the path too, and compute what the module calls compute; on the old
    code a step with a draft left the path (54 of 128 steps of chat at batch 8 with n-gram)."""
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "adaptive": false}'
    eng = LLMEngine(EngineConfig(model=str(tiny_model_dir("llama")), kv_cache_bytes=8 << 20,
                                 max_num_seqs=8, speculative_config=spec))  # fmt: skip
    for i in range(3):
        prompt = [3 + i, 4, 5, 6, 7] * (2 + i)
        eng.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=30,
                                                        ignore_eos=True))  # fmt: skip
    eng.step()  # the prompts

    class Drafts:  # every sequence drafts 1-3 tokens (accepted or not: verified either way)
        def propose(self, seq, k: int) -> list[int]:
            return [5, 6, 7][: 1 + seq.num_tokens % 3][:k]

        def finished(self, seq) -> None:
            pass

    eng.scheduler.speculator.proposer = Drafts()
    decoder = eng.runner.model.model
    path = decoder.decode_path
    assert path is not None
    for _ in range(10):
        steps = path.steps
        batch = capture_decode_batch(eng, monkeypatch)
        if batch["meta"].prefills:
            break
    meta = batch["meta"]
    assert meta.prefills and path.steps == steps + 1  # a verification step took the path
    ids, pos = torch.tensor(batch["ids"]), torch.tensor(batch["pos"])
    with torch.inference_mode():
        fast = decoder(ids, pos, meta)
        decoder.decode_path = None
        slow = decoder(ids, pos, meta)
        decoder.decode_path = path
    assert torch.equal(fast, slow)
