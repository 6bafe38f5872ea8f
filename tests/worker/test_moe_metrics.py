"""The worker exports the tokens routed to each expert of each sparse layer."""

from __future__ import annotations

from types import SimpleNamespace

from services.engine import LLM, SamplingParams
from services.worker.metrics import _EngineCollector


def test_expert_token_counts_are_exported(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("qwen3_moe")), device="cpu", dtype="float32")
    prompt = list(range(100, 110))
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine = SimpleNamespace(engine=llm.engine, stats=llm.engine.stats)
    state = SimpleNamespace(role_epoch=1, role="mixed")
    families = {m.name: m for m in _EngineCollector(engine, state, ("tiny", "w0")).collect()}
    samples = families["epdserve:moe_expert_tokens"].samples
    per_layer = {}
    for s in samples:
        per_layer[s.labels["layer"]] = per_layer.get(s.labels["layer"], 0) + s.value
    # 10 prompt tokens + 2 decoded (the third token is sampled, never run), 2 experts each.
    assert per_layer == {"0": 24, "1": 24}
    assert {s.labels["expert"] for s in samples} == {str(e) for e in range(8)}
