"""Service tiers on a real tiny model: online requests arriving into a full batch of offline
(flex) sequences preempt them, run first, and every request of both classes ends with the
greedy tokens of transformers (its undisturbed output), with and without the host KV pool
that takes the preempted blocks (and a cap on the offline tokens of a step and the default
share), and without it with the pace of offline work on (opt-in); chunked prefill and the
prefix cache stay on."""

from __future__ import annotations

import pytest

from services.engine.config import EngineConfig
from services.engine.llm_engine import LLMEngine
from services.engine.sampling_params import SamplingParams
from tests.engine.test_correctness import hf_greedy
from tests.engine.test_memory_pressure import tokens
from tests.engine.test_tier_pace import prime

MAX_TOKENS = 8


def greedy(tier: str, priority: int = 0) -> SamplingParams:
    return SamplingParams(
        temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, service_tier=tier, priority=priority
    )


@pytest.mark.parametrize("host_pool", [False, True])
def test_online_requests_preempt_a_full_offline_batch(model, host_pool) -> None:
    config = EngineConfig(
        model=model, dtype="float32", block_size=4, max_num_seqs=3, max_num_batched_tokens=16,
        kv_cache_bytes=1 << 20, kv_host_pool_bytes=(1 << 20) if host_pool else 0,
        max_offline_batched_tokens=8 if host_pool else None,
        offline_tpot_quantile=None if host_pool else 0.8,
    )  # fmt: skip
    engine = LLMEngine(config)
    if not host_pool:
        # A reference far above any step: offline work takes all the pace lets it (its
        # chunks beside online work change, the tokens must not).
        assert engine.scheduler.policy.pace is not None
        prime(engine.scheduler.policy.pace, reference=1000.0)
    offline = {f"off{i}": tokens(14 + i, 100 + i) for i in range(3)}
    online = {"on0": tokens(11, 200), "on1": tokens(13, 201)}
    for rid, prompt in offline.items():
        engine.add_request(rid, prompt, greedy("flex"))
    got: dict[str, list[int]] = {}

    def step() -> None:
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)

    for _ in range(20):  # chunked prefills (16 tokens a step, or 8 with the cap)
        if all(got.get(rid) for rid in offline):
            break
        step()
    assert len(engine.scheduler.running) == 3 and not engine.scheduler.waiting
    assert all(got.get(rid) for rid in offline)  # every offline request is decoding
    engine.add_request("on0", online["on0"], greedy("default"))
    engine.add_request("on1", online["on1"], greedy("priority", priority=3))
    step()
    tiers = {s.request_id: s.params.service_tier for s in engine.scheduler.running}
    assert sorted(tiers) == ["off0", "on0", "on1"]  # the two newest offline ones made room
    assert engine.scheduler.preemptions_by_tier == {"priority": 0, "default": 0, "flex": 2}
    while engine.has_unfinished_requests():
        step()
    prompts = {**offline, **online}
    refs = hf_greedy(model, list(prompts.values()), MAX_TOKENS)
    assert got == {rid: ref for rid, (ref, _) in zip(prompts, refs, strict=True)}
    stats = engine.stats()
    assert stats.preemptions_by_tier["default"] == stats.preemptions_by_tier["priority"] == 0
    engine.block_manager.check_invariants()
    engine.close()
