"""Request migration at the engine level: a request resumed from the tokens another engine
generated continues exactly as the undisturbed request (tokens, text, logprobs, seeds)."""

from __future__ import annotations

import pytest
import torch

from services.engine import LLM, SamplingParams
from services.engine.llm_engine import LLMEngine
from services.engine.resume import Resume

PROMPT = torch.randint(10, 49000, (21,), generator=torch.Generator().manual_seed(5)).tolist()


def run_stream(engine: LLMEngine, rid: str, params: SamplingParams, resume: Resume | None = None):
    """(token ids, text deltas, logprobs) streamed by one request, a list entry per step."""
    engine.add_request(rid, PROMPT, params, resume=resume)
    tokens: list[int] = []
    deltas: list[tuple[int, str]] = []  # (tokens so far, text so far) after each step
    logprobs = []
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            c = out.outputs[0]
            tokens += c.token_ids
            text += c.text
            logprobs += c.logprobs or []
            deltas.append((len(tokens), text))
    return tokens, text, logprobs, deltas


PARAMS = {
    "greedy_logprobs": SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, logprobs=2),
    "seeded_penalties": SamplingParams(
        temperature=1.0,
        top_p=0.9,
        seed=7,
        max_tokens=14,
        ignore_eos=True,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        repetition_penalty=1.2,
        min_tokens=10,
    ),  # fmt: skip
}


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> LLMEngine:
    return LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=4).engine


@pytest.mark.parametrize("name", sorted(PARAMS))
@pytest.mark.parametrize("k", [1, 6])
def test_resume_continues_the_undisturbed_request(engine, name, k):
    params = PARAMS[name]
    ref_tokens, ref_text, ref_lps, steps = run_stream(engine, f"ref-{name}-{k}", params)
    # What a client had after the step that delivered the k-th token.
    emitted = next(text for n, text in steps if n >= k)
    assert ref_tokens[:k] and len(ref_tokens) > k
    resume = Resume(tuple(ref_tokens[:k]), emitted_chars=len(emitted))
    tokens, text, lps, _ = run_stream(engine, f"res-{name}-{k}", params, resume)
    assert ref_tokens[:k] + tokens == ref_tokens
    assert emitted + text == ref_text
    if params.logprobs:
        assert [lp.token_id for lp in lps] == [lp.token_id for lp in ref_lps[k:]]
        for a, b in zip(lps, ref_lps[k:], strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    engine.block_manager.check_invariants()


def test_resume_sends_text_the_old_worker_held_back(engine):
    """A stop string held text back on the old worker; the new one sends it (no gap)."""
    base = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref_tokens, ref_text, _, _ = run_stream(engine, "held-ref", base)
    stop = ref_text[-3:] + "\x00"  # can never match, but makes every step hold 3 chars back
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
    tokens, text, _, steps = run_stream(engine, "held-ref2", params)
    assert (tokens, text) == (ref_tokens, ref_text)
    k = 5
    emitted = next(t for n, t in steps if n >= k)
    resume = Resume(tuple(tokens[:k]), emitted_chars=len(emitted))
    more, more_text, _, _ = run_stream(engine, "held-res", params, resume)
    assert tokens[:k] + more == ref_tokens
    assert emitted + more_text == ref_text


def test_resume_through_a_kv_handoff(tiny_model_dir):
    """PD migration: prefill engine A computes prompt + migrated tokens and samples the next
    one; decode engine B reserves for prompt + migrated tokens and continues."""
    model = str(tiny_model_dir("llama"))
    a = LLM(model, dtype="float32", block_size=4).engine
    b = LLM(model, dtype="float32", block_size=4).engine
    params = PARAMS["seeded_penalties"]
    ref_tokens, _, _, _ = run_stream(a, "ref", params)
    k = 5
    resume = Resume(tuple(ref_tokens[:k]), emitted_chars=0)
    first_params = SamplingParams(**{**vars(params), "max_tokens": k + 1, "min_tokens": k + 1})
    a.add_request("r", PROMPT, first_params, hold_kv=True, resume=resume)
    first = None
    while a.has_unfinished_requests():
        for out in a.step():
            first = out.outputs[0].token_ids[0]
    blocks, computed = a.held_blocks("r")
    assert computed == len(PROMPT) + k
    data = a.read_kv(blocks)
    a.release_held("r")
    dst, cached = b.reserve("r", PROMPT, params, resume)
    skip = cached // 4
    b.write_kv(dst[skip:], data[:, :, skip : len(dst)])
    tokens = list(b.start_reserved("r", first).outputs[0].token_ids)
    while b.has_unfinished_requests():
        for out in b.step():
            tokens.extend(out.outputs[0].token_ids)
    assert ref_tokens[:k] + tokens == ref_tokens
    for e in (a, b):
        e.block_manager.check_invariants()
        assert e.block_manager.num_free_blocks == e.block_manager.num_blocks


@pytest.mark.parametrize(
    "resume, n, message",
    [
        (Resume((1,) * 14), 1, "max_tokens"),
        (Resume((10**9,)), 1, "resumed token ids"),
        (Resume((1, 2)), 2, "n = 1"),
    ],
)
def test_bad_resume_is_a_value_error(engine, resume, n, message):
    params = SamplingParams(temperature=0, max_tokens=14, n=n)
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", PROMPT, params, resume=resume)
