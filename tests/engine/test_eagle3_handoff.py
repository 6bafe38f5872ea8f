"""EAGLE-3 under PD: the prefill engine's target states go to the decode engine with the KV
(speculative/handoff.py, through its proto form), so the decode side drafts exactly as a
co-located engine does: the same drafts, the same acceptance, the same tokens."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from services.common.proto import worker_pb2 as pb
from services.engine import LLM, SamplingParams
from services.engine.resume import Resume
from services.engine.speculative import handoff
from services.engine.speculative.handoff import DraftStates
from tests.engine.conftest import KV_BYTES
from tests.engine.test_speculative import copy_bias, repetitive_prompts, run
from tests.engine.test_speculative_draft import biased_eagle3_head


@pytest.fixture(scope="module")
def head(tiny_model_dir, tmp_path_factory) -> tuple[str, str]:
    model = str(tiny_model_dir("llama"))
    return model, biased_eagle3_head(model, tmp_path_factory.mktemp("eagle3"))


def eagle_engine(model: str, head: str, **kwargs):
    cfg = {"method": "eagle3", "model": head, "num_speculative_tokens": 3,
           "disable_by_batch_size": 0, "adaptive": False}  # fmt: skip
    # NOTE: no prefix caching unless asked: each prompt runs several times, each time from its
    # first token (a prefill-side hit has a test of its own below).
    kwargs.setdefault("enable_prefix_caching", False)
    return LLM(model, dtype="float32", block_size=4, kv_cache_bytes=KV_BYTES,
               speculative_config=json.dumps(cfg), **kwargs).engine  # fmt: skip


def spec_counts(engine) -> tuple:
    s = engine.stats().spec
    return (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens,
            tuple(s.proposed_per_position), tuple(s.accepted_per_position))  # fmt: skip


def handoff_run(a, b, prompt, params, send: bool, resume: Resume | None = None) -> list[int]:
    """PD in one process, as tests/engine/test_correctness.kv_handoff, with the draft states
    sent through their proto form when ``send``; ``resume``: a migrated request (its outputs
    so far computed by the prefill engine too, as services/prefill/role.py asks)."""
    done = list(resume.output_token_ids) if resume else []
    first_params = dataclasses.replace(params, max_tokens=len(done) + 1)
    a.add_request("r", prompt, first_params, hold_kv=True, resume=resume)
    first = None
    while a.has_unfinished_requests():
        for out in a.step():
            first = out.outputs[0].token_ids[0]
    states = a.held_draft_states("r")
    assert states is not None and states.start == 0 and states.tokens == prompt + done
    msg = pb.PrefillResponse()
    handoff.to_proto(states, msg.draft_states)
    wire = pb.DecodeRequest.FromString(
        pb.DecodeRequest(draft_states=msg.draft_states).SerializeToString()
    )
    blocks, _ = a.held_blocks("r")
    data = a.read_kv(blocks)
    a.release_held("r")
    dst, cached = b.reserve("r", prompt, params, resume)
    assert cached == 0
    b.write_kv(dst, data[:, :, : len(dst)])
    got = handoff.from_proto(wire.draft_states) if send else None
    tokens = list(b.start_reserved("r", first, None, got).outputs[0].token_ids)
    while b.has_unfinished_requests():
        for out in b.step():
            tokens.extend(out.outputs[0].token_ids)
    return tokens


def decode_with_states(a, b, prompt, params, states: DraftStates | None) -> list[int]:
    """PD in one process with ``states`` given to the decode engine as they are (a peer's,
    not the prefill engine's); no output of the decode may end in an error."""
    a.add_request("x", prompt, dataclasses.replace(params, max_tokens=1), hold_kv=True)
    while a.has_unfinished_requests():
        first = [o.outputs[0].token_ids[0] for o in a.step()][-1]
    data = a.read_kv(a.held_blocks("x")[0])
    a.release_held("x")
    dst, _ = b.reserve("x", prompt, params)
    b.write_kv(dst, data[:, :, : len(dst)])
    tokens = list(b.start_reserved("x", first, None, states).outputs[0].token_ids)
    while b.has_unfinished_requests():
        for out in b.step():
            assert out.outputs[0].finish_reason != "error", out
            tokens.extend(out.outputs[0].token_ids)
    return tokens


def test_pd_decode_side_drafts_as_a_colocated_engine(head):
    """Per prompt: the co-located engine's tokens and speculation counters (drafts,
    accepted, per position) equal the decode engine's given the states; without them (the
    old hand-off) its first decode drafts nothing and the counters differ."""
    model, head_dir = head
    colocated, prefill, decode = (eagle_engine(model, head_dir) for _ in range(3))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logit_bias=copy_bias())
    accepted = 0
    for prompt in repetitive_prompts()[:3]:
        before = spec_counts(colocated)
        ref = run(colocated, [prompt], params)[0][0][1]
        want = tuple(x - y if isinstance(x, int) else tuple(p - q for p, q in zip(x, y, strict=True))
                     for x, y in zip(spec_counts(colocated), before, strict=True))  # fmt: skip
        for send in (True, False):
            before = spec_counts(decode)
            assert tuple(handoff_run(prefill, decode, prompt, params, send)) == ref
            got = tuple(x - y if isinstance(x, int) else tuple(p - q for p, q in zip(x, y, strict=True))
                        for x, y in zip(spec_counts(decode), before, strict=True))  # fmt: skip
            assert (got == want) == send, (prompt[:4], send, got, want)
        accepted += want[2]
    assert accepted > 0  # drafts were accepted (and rejected): the counters say something
    for e in (colocated, prefill, decode):
        assert e.block_manager.num_free_blocks == e.block_manager.num_blocks


def test_migrated_request_drafts_as_on_a_colocated_engine(head):
    """Migration: a request resumed on a new worker. Co-located, its prefill computes the
    prompt and the migrated outputs and files their states as any prefill does; through a
    PD pair the prefill worker sends them all. Both draft and accept as the other, and end
    as the undisturbed request."""
    model, head_dir = head
    colocated, prefill, decode = (eagle_engine(model, head_dir) for _ in range(3))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logit_bias=copy_bias())
    prompt = repetitive_prompts()[1]
    ref = run(colocated, [prompt], params)[0][0][1]
    resume = Resume(tuple(ref[:5]))
    before = spec_counts(colocated)
    got = run(colocated, [prompt], params, resume=resume)[0][0][1]
    assert tuple(ref[:5]) + got == ref
    want = delta(spec_counts(colocated), before)
    assert want[0] > 0
    before = spec_counts(decode)
    assert tuple(ref[:5]) + tuple(handoff_run(prefill, decode, prompt, params, True, resume)) == ref
    assert delta(spec_counts(decode), before) == want


def delta(after: tuple, before: tuple) -> tuple:
    return tuple(x - y if isinstance(x, int) else tuple(p - q for p, q in zip(x, y, strict=True))
                 for x, y in zip(after, before, strict=True))  # fmt: skip


def test_imported_states_run_in_chunks_of_the_step_budget(head, monkeypatch):
    """A prompt's states imported at once are run through the head at most the engine's step
    budget (max_num_batched_tokens, here 16) of rows a step, as its prefill chunks were:
    the first drafts come once they are all run; tokens as without speculation."""
    from services.engine.speculative.eagle3 import Eagle3Proposer

    model, head_dir = head
    rows: list[int] = []
    real = Eagle3Proposer._run

    def spy(self, batch, hidden):
        rows.extend(b.num_new_tokens for b in batch)
        return real(self, batch, hidden)

    monkeypatch.setattr(Eagle3Proposer, "_run", spy)
    prefill, decode = (eagle_engine(model, head_dir, max_num_batched_tokens=16) for _ in range(2))
    plain = LLM(model, dtype="float32", block_size=4, kv_cache_bytes=KV_BYTES,
                enable_prefix_caching=False).engine  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logit_bias=copy_bias())
    prompt = repetitive_prompts()[0]  # 35 tokens
    ref = run(plain, [prompt], params)[0][0][1]
    rows.clear()
    assert tuple(handoff_run(prefill, decode, prompt, params, True)) == ref
    # The prompt's 35 states in passes of 16, 16, then 3 with the first decodes' own (before:
    # one pass of 35; and the prefill engine had run its head on all but the last chunk's).
    assert rows[:2] == [16, 16] and max(rows) == 16
    assert decode.stats().spec.num_drafts > 0


def test_prefill_side_prefix_hit_sends_the_states_kept_with_its_blocks(head):
    """A prompt whose first blocks hit the prefill worker's prefix cache (a prompt run
    before, and one sharing its first 4 blocks) still sends the head's states from position
    0, kept with the blocks (kept_states.py), and the decode worker drafts and accepts exactly
    as after a miss (a co-located engine without caching). On the code before, the states
    started at the hit (handoff_run's start == 0 fails: start 20) and the decode worker's
    head ran over the rest only, its KV at the hit positions whatever its blocks held."""
    model, head_dir = head
    colocated, decode = eagle_engine(model, head_dir), eagle_engine(model, head_dir)
    prefill = eagle_engine(model, head_dir, enable_prefix_caching=True)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logit_bias=copy_bias())
    first = repetitive_prompts()[1]  # 24 tokens
    shared = first[:16] + repetitive_prompts()[0][:12]
    for prompt in (first, first, shared):
        before = spec_counts(colocated)
        ref = run(colocated, [prompt], params)[0][0][1]
        want = delta(spec_counts(colocated), before)
        hits, before = prefill.block_manager.hit_tokens, spec_counts(decode)
        assert tuple(handoff_run(prefill, decode, prompt, params, True)) == ref
        assert delta(spec_counts(decode), before) == want
    assert prefill.block_manager.hit_tokens - hits == 16  # the last one hit its 4 blocks
    assert prefill.block_manager.hit_tokens >= 16 + 20  # and the second run of the first


def test_kept_states_end_at_a_missing_or_different_block():
    """KeptStates: a hit's states go back block by block while the blocks are kept with the
    same tokens; an evicted block (the budget holds two) or one with other tokens ends them."""
    from services.engine.speculative.kept_states import KeptStates

    kept = KeptStates(block_size=2, max_bytes=2 * 2 * 3 * 4)
    tokens, hashes = [1, 2, 3, 4, 5, 6, 7], [11, 12, 13]
    rows = torch.arange(21, dtype=torch.float32).view(7, 3)
    whole = kept.complete(DraftStates(0, tokens, rows), tokens, hashes)
    assert whole.start == 0 and torch.equal(whole.hidden, rows) and len(kept) == 2  # 11 evicted
    hit = kept.complete(DraftStates(5, tokens[5:], rows[5:]), tokens, hashes)
    assert hit.start == 2 and hit.tokens == tokens[2:] and torch.equal(hit.hidden, rows[2:])
    other = [1, 2, 3, 9, 5, 6, 7]  # block 1 differs (a hash collision, as the manager checks)
    miss = kept.complete(DraftStates(4, other[4:], rows[4:]), other, hashes)
    assert miss.start == 4 and torch.equal(miss.hidden, rows[4:])
    part = kept.complete(DraftStates(3, tokens[3:], rows[3:]), tokens, hashes)
    assert part.start == 2 and torch.equal(part.hidden, rows[2:])  # block 1's first row
    assert kept.nbytes <= kept.max_bytes


def test_malformed_states_are_refused_or_ignored(head):
    """A message that does not describe its rows is a ValueError; states that do not fit
    the request (wrong width, past its positions) are ignored: the request runs on."""
    msg = pb.DraftStates(start=0, tokens=[1, 2], hidden=b"\0" * 12, width=2, dtype="float32")
    with pytest.raises(ValueError, match="not 2 rows"):
        handoff.from_proto(msg)
    with pytest.raises(ValueError, match="dtype"):
        handoff.from_proto(pb.DraftStates(tokens=[1], hidden=b"\0" * 4, width=1, dtype="int8"))
    model, head_dir = head
    prefill, decode = eagle_engine(model, head_dir), eagle_engine(model, head_dir)
    prompt = repetitive_prompts()[0]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ref = handoff_run(prefill, decode, prompt, params, send=False)
    hidden = prefill.executor.drafter.head.model.fc.out_features
    for bad in (DraftStates(0, [5] * 3, torch.zeros(3, hidden + 1)),
                DraftStates(len(prompt) - 1, [5] * 3, torch.zeros(3, hidden))):  # fmt: skip
        assert decode_with_states(prefill, decode, prompt, params, bad) == ref


def test_states_over_the_cap_keep_their_last_rows():
    states = DraftStates(3, list(range(10)), torch.arange(40, dtype=torch.float32).view(10, 4))
    cut = states.last(max_bytes=3 * 16 + 5)
    assert cut.start == 10 and cut.tokens == [7, 8, 9]
    assert torch.equal(cut.hidden, states.hidden[7:])


def test_export_never_fails_the_request():
    """The prefill side's export: a failing read or an unsendable dtype sends nothing (the
    request goes on); states of a sendable dtype are sent, cut to the cap."""
    import asyncio

    async def fails():
        raise RuntimeError("engine said no")

    async def returns(states):
        return states

    assert asyncio.run(handoff.export(fails, pb.DraftStates())) is None
    odd = DraftStates(0, [1, 2], torch.zeros(2, 4, dtype=torch.float64))
    assert asyncio.run(handoff.export(lambda: returns(odd), pb.DraftStates())) is None
    assert asyncio.run(handoff.export(lambda: returns(None), pb.DraftStates())) is None
    good = DraftStates(0, [1, 2], torch.ones(2, 4))
    msg = asyncio.run(handoff.export(lambda: returns(good), pb.DraftStates()))
    assert msg is not None and list(msg.tokens) == [1, 2] and len(msg.hidden) == 32


def test_non_finite_or_huge_states_from_a_peer_change_no_token(head):
    """A peer's states of the right shape but garbage values (NaN, inf, 1e30): only the drafts
    suffer. Greedy tokens equal the run without states; a sampled request (whose draws
    differ with other drafts: rejection sampling keeps the distribution, not the draws)
    completes without an error."""
    model, head_dir = head
    prefill, decode = eagle_engine(model, head_dir), eagle_engine(model, head_dir)
    prompt = repetitive_prompts()[0]
    width = prefill.executor.drafter.head.model.fc.out_features
    cases = [(value, params) for value in (float("nan"), float("inf"), 1e30) for params in (
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True))]  # fmt: skip
    for value, params in cases:
        ref = handoff_run(prefill, decode, prompt, params, send=False)
        bad = DraftStates(0, list(prompt), torch.full((len(prompt), width), value))
        tokens = decode_with_states(prefill, decode, prompt, params, bad)
        if params.temperature == 0:
            assert tokens == ref
        else:
            assert len(tokens) == 8 and all(0 <= t < 49152 for t in tokens)
