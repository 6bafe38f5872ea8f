"""The extreme-input battery against every speculation method that has state of its own (suffix
trees, a draft model's KV, an EAGLE-3 head's): sampling extremes the API accepts (temperature
1e-38 and 5e-324, top_p 1e-38, logit_bias +-100 over many ids, penalties at both ends, n > 1,
logprobs 20, a stop string inside an accepted run, a grammar), all in one batch with drafts
being accepted. Every request finishes, the blocks come back, the engine serves again, and
where the output is deterministic it equals the engine's without speculation. What the API
refuses (NaN, 1e300) the engine refuses too, before any work."""

from __future__ import annotations

import json
import math

import pytest

from services.engine import LLM, SamplingParams, StructuredOutputsParams
from tests.engine.conftest import KV_BYTES
from tests.engine.test_speculative import copy_bias, repetitive_prompts, run, same
from tests.engine.test_speculative_draft import biased_eagle3_head

METHODS = ["suffix", "draft_model", "eagle3"]


@pytest.fixture(scope="module", params=METHODS)
def engine(request, model, tiny_model_dir, tmp_path_factory):
    cfg: dict = {"method": request.param, "num_speculative_tokens": 3, "adaptive": False,
                 "disable_by_batch_size": 0}  # fmt: skip
    if request.param == "eagle3":
        cfg["model"] = biased_eagle3_head(model, tmp_path_factory.mktemp("eagle3"))
    elif request.param == "draft_model":
        cfg["model"] = str(tiny_model_dir("qwen2"))
    return LLM(model, dtype="float32", block_size=4, kv_cache_bytes=KV_BYTES,
               speculative_config=json.dumps(cfg)).engine  # fmt: skip


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                          logit_bias=copy_bias(), **kw)  # fmt: skip


def deterministic_cases(stop: str) -> list[SamplingParams]:
    """Extremes whose output is the greedy one, draw or not: compared with no speculation."""
    bias = copy_bias()
    return [
        SamplingParams(temperature=1e-38, max_tokens=16, ignore_eos=True, logit_bias=bias),
        SamplingParams(temperature=5e-324, max_tokens=16, ignore_eos=True, logit_bias=bias),
        SamplingParams(temperature=2.0, top_p=1e-38, max_tokens=16, ignore_eos=True,
                       logit_bias=bias, seed=1),
        SamplingParams(temperature=2.0, top_k=1, max_tokens=16, ignore_eos=True, logit_bias=bias,
                       seed=2),
        greedy(logprobs=20),
        greedy(stop=[stop]),  # inside the run the drafts get accepted in
        greedy(n=3),
        greedy(repetition_penalty=10.0, presence_penalty=2.0, frequency_penalty=2.0),
        greedy(repetition_penalty=0.01, presence_penalty=-2.0, frequency_penalty=-2.0),
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                       logit_bias={**{i: -100.0 for i in range(300)}, 0: 100.0, 49151: 100.0}),
        SamplingParams(temperature=0, max_tokens=24,
                       structured_outputs=StructuredOutputsParams(regex=r"(ab|cd)[a-z ]{3,12}x")),
    ]  # fmt: skip


SAMPLED = [
    SamplingParams(temperature=2.0, top_k=2**31 - 1, min_p=1.0, max_tokens=12, seed=3),
    SamplingParams(temperature=1.0, seed=-(2**63), max_tokens=12, logit_bias=copy_bias()),
    SamplingParams(temperature=1.0, seed=2**63 - 1, n=3, max_tokens=12, logprobs=20),
    SamplingParams(temperature=2.0, max_tokens=12, min_tokens=4, logprobs=20, seed=4,
                   logit_bias={0: 100.0, 1: -100.0, 2: 100.0, 49151: 100.0}),
    SamplingParams(temperature=1.0, max_tokens=12, stop=["a", "b", "c", "d"],
                   stop_token_ids=[0, 1, 2], seed=5),
    SamplingParams(temperature=0.5, max_tokens=12, repetition_penalty=0.01, seed=6,
                   presence_penalty=-2.0, frequency_penalty=-2.0, logit_bias=copy_bias()),
]  # fmt: skip


def test_extremes_finish_and_equal_no_speculation(engine, plain):
    prompt = repetitive_prompts()[0]
    ref = run(plain, [prompt], greedy())[0][0]
    stop = ref[2][len(ref[2]) // 3 : len(ref[2]) // 3 + 3]  # well inside the copied run
    assert stop.strip(), ref
    cases = deterministic_cases(stop)
    before = engine.stats().spec.num_accepted_tokens
    # All at once: each extreme shares its verification steps with the others'.
    batch = [*cases, *SAMPLED]
    got = run(engine, [prompt] * len(batch), batch)
    assert engine.stats().spec.num_accepted_tokens > before
    same(got[: len(cases)], run(plain, [prompt] * len(cases), cases))
    stopped = got[cases.index(next(c for c in cases if c.stop))][0]
    assert stopped[3] == "stop" and stopped[4] == stop, stopped
    for outs, params in zip(got, batch, strict=True):
        assert len(outs) == params.n
        for choice in outs:
            assert choice[3] in ("stop", "length"), (params, choice)
            assert all(math.isfinite(lp) or lp == -math.inf for _, lp in choice[5])
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    same(run(engine, [prompt], greedy()), [[ref]])  # and it serves as before


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": math.nan},
        {"temperature": 1e300},
        {"top_p": math.nan},
        {"temperature": math.inf},
        {"logit_bias": {0: math.nan}},
    ],  # fmt: skip
)
def test_what_the_api_refuses_the_engine_refuses(engine, bad):
    with pytest.raises(ValueError):
        engine.add_request("bad", repetitive_prompts()[0], SamplingParams(max_tokens=4, **bad))
    assert not engine.has_unfinished_requests()
