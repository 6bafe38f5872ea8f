"""An idle engine sleeps (its weights written out, their pages and the KV cache's given back)
and wakes up answering as before, on a tiny random model, with packed CPU weights."""

from __future__ import annotations

import pytest

from services.engine import LLM, SamplingParams
from services.engine.layers.cpu_linear import OneDNNLinear, onednn_available
from services.engine.sleep import EngineSleep

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPT = "The capital of France is Paris, and the capital of Italy is"


@pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
def test_sleep_then_wake_answers_as_before(tiny_model_dir) -> None:
    llm = LLM(str(tiny_model_dir("llama")), max_model_len=256, block_size=16, cpu_linear="onednn",
              kv_cache_bytes=8 * 1024 * 1024)  # fmt: skip
    engine = llm.engine
    assert any(
        isinstance(vars(m).get("forward"), OneDNNLinear) for m in engine.runner.model.modules()
    )
    ids = llm.tokenizer.encode(PROMPT)
    before = llm.generate(ids, GREEDY)[0].outputs[0].token_ids
    assert engine.block_manager.hash_to_block  # the prompt's blocks are cached
    stored = {h for ev in engine.take_kv_events() if ev.kind == "stored" for h in ev.block_hashes}
    assert stored

    sleep = EngineSleep()
    asleep = sleep.sleep(engine)
    assert sleep.asleep and asleep.kv_bytes == engine.runner.kv_cache.nbytes
    assert asleep.weight_bytes > 0 and not engine.block_manager.hash_to_block
    # The kvstore index hears that every cached block is gone (the worker publishes these).
    events = engine.take_kv_events()
    assert {h for ev in events if ev.kind == "removed" for h in ev.block_hashes} == stored
    awake = sleep.wake_up(engine)
    assert not sleep.asleep and awake.weight_bytes == asleep.weight_bytes
    # The cache was forgotten with the KV it described: the same prompt computes again and
    # answers as before (a hit on the released, zeroed blocks would not).
    out = llm.generate(ids, GREEDY)[0]
    assert out.outputs[0].token_ids == before and out.num_cached_tokens == 0


def test_a_busy_engine_does_not_sleep(tiny_model_dir) -> None:
    llm = LLM(str(tiny_model_dir("llama")), max_model_len=256, kv_cache_bytes=8 * 1024 * 1024)
    llm.engine.add_request("r1", llm.tokenizer.encode(PROMPT), GREEDY)
    with pytest.raises(ValueError, match="still has requests"):
        EngineSleep().sleep(llm.engine)


def test_the_sleeping_weights_leave_no_file_behind(tiny_model_dir, tmp_path) -> None:
    """The weights wait in an anonymous file: a worker stopped, killed or restarted with
    another model (os.execv) while asleep left a named one, a model's weights, for good."""
    llm = LLM(str(tiny_model_dir("llama")), max_model_len=256, kv_cache_bytes=8 * 1024 * 1024)
    ids = llm.tokenizer.encode(PROMPT)
    before = llm.generate(ids, GREEDY)[0].outputs[0].token_ids
    sleep = EngineSleep(spill_dir=str(tmp_path))
    assert sleep.sleep(llm.engine).weight_bytes > 0
    assert list(tmp_path.iterdir()) == []
    sleep.wake_up(llm.engine)
    assert llm.generate(ids, GREEDY)[0].outputs[0].token_ids == before
