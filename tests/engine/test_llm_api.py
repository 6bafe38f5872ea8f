"""The vLLM-style offline API on the default model, streaming, and clear errors."""

from __future__ import annotations

import asyncio
import json

import pytest

from services.engine import LLM, AsyncLLMEngine, EngineConfig, SamplingParams


@pytest.fixture(scope="module")
def default_llm() -> LLM:
    return LLM()


def test_default_model_knows_paris(default_llm):
    out = default_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=24),
    )[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason in ("stop", "length")


def test_generate_accepts_strings_and_token_ids(default_llm):
    text = "The quick brown fox"
    ids = default_llm.tokenizer.encode(text)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    a, b = default_llm.generate([text, ids], params)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert a.outputs[0].text == default_llm.tokenizer.decode(a.outputs[0].token_ids)
    assert a.prompt == text
    assert a.outputs[0].finish_reason == "length"


def test_stop_string_truncates_text(default_llm):
    params = SamplingParams(temperature=0, max_tokens=40)
    full = default_llm.chat([{"role": "user", "content": "Count from 1 to 10."}], params)[0]
    text = full.outputs[0].text
    assert len(text) > 4
    stop = text[2:4]
    cut = default_llm.chat(
        [{"role": "user", "content": "Count from 1 to 10."}],
        SamplingParams(temperature=0, max_tokens=40, stop=[stop]),
    )[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[: text.index(stop)]


def test_stop_token_ids_and_min_tokens(default_llm):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    tokens = default_llm.generate(["Once upon a time"], params)[0].outputs[0].token_ids
    stop_tok = tokens[3]
    out = default_llm.generate(
        ["Once upon a time"],
        SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_tok], ignore_eos=True),
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    assert out.token_ids[-1] == stop_tok and len(out.token_ids) == tokens.index(stop_tok) + 1
    many = default_llm.generate(
        ["Once upon a time"],
        SamplingParams(temperature=0, max_tokens=10, min_tokens=10, stop_token_ids=[stop_tok]),
    )[0].outputs[0]
    assert len(many.token_ids) == 10


def test_seeded_sampling_reproducible(default_llm):
    p = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=12, ignore_eos=True
    )
    a = default_llm.generate(["Tell me a story"], p)[0].outputs[0].token_ids
    b = default_llm.generate(["Tell me a story"], p)[0].outputs[0].token_ids
    assert a == b


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n must be"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_prompt_longer_than_context(default_llm):
    engine = default_llm.engine
    too_long = [5] * engine.max_model_len
    with pytest.raises(ValueError, match="context length"):
        default_llm.generate([too_long], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="exceeds the context"):
        default_llm.generate([[5] * 10], SamplingParams(max_tokens=engine.max_model_len))
    with pytest.raises(ValueError, match="token ids"):
        default_llm.generate([[10**9]], SamplingParams(max_tokens=1))
    assert not engine.has_unfinished_requests()


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["MambaForCausalLM"], "model_type": "llama"})
    )
    with pytest.raises(ValueError, match="unsupported model architecture"):
        LLM(str(tmp_path))


def test_bad_engine_config():
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int3")
    with pytest.raises(ValueError, match="device"):
        EngineConfig(device="tpu")
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=12)
    with pytest.raises(ValueError, match="neither a folder"):
        LLM("/nonexistent/model")


def test_async_engine_streams_and_aborts(tiny_model_dir):
    async def run():
        engine = AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir("llama")), block_size=4))
        await engine.start()
        try:
            params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
            deltas = [o async for o in engine.generate("a", [5, 6, 7, 8, 9], params)]
            tokens = [t for d in deltas for t in d.outputs[0].token_ids]
            assert len(tokens) == 8 and deltas[-1].finished
            assert len(deltas) > 1  # streamed step by step
            offline = LLM(str(tiny_model_dir("llama")), block_size=4).generate(
                [[5, 6, 7, 8, 9]], params
            )
            assert tokens == offline[0].outputs[0].token_ids

            # A consumer that stops early aborts the request and frees its blocks.
            long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
            gen = engine.generate("b", [5, 6, 7], long)
            await gen.__anext__()
            await gen.aclose()
            await asyncio.sleep(0.2)
            stats = engine.stats()
            assert stats.num_running == 0 and stats.num_waiting == 0
            assert stats.num_free_blocks == stats.num_total_blocks

            with pytest.raises(ValueError, match="context length"):
                async for _ in engine.generate("c", [5] * engine.max_model_len, params):
                    pass
        finally:
            await engine.shutdown()

    asyncio.run(run())
