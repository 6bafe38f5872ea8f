"""Scheduler with real Sequence and BlockManager objects (no model): budgets, chunked prefill,
preemption by recompute, prefix-cache reuse, finishing from either queue."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.engine.block_hash import hash_prompt_blocks
from services.engine.block_manager import BlockManager
from services.engine.kv_tiers import KVTierManager
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler
from services.engine.scheduler_output import ScheduledSeq, SchedulerOutput
from services.engine.sequence import Sequence, SequenceStatus

BS = 4


def make_sched(
    num_blocks: int = 64,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 1024,
    caching: bool = True,
    block_size: int = BS,
) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    return Scheduler(bm, max_num_seqs, max_num_batched_tokens, max_model_len)


_req = iter(range(10**9))


def make_seq(prompt: list[int] | int, start: int = 1000) -> Sequence:
    if isinstance(prompt, int):
        prompt = list(range(start, start + prompt))
    return Sequence(f"req-{next(_req)}", prompt, SamplingParams())


def step(sched: Scheduler, goals: dict[int, int] | None = None, token: int = 7) -> SchedulerOutput:
    """One engine step without a model: every sampling sequence gets ``token`` appended and
    finishes once it has ``goals[seq_id]`` output tokens."""
    out = sched.schedule()
    sched.postprocess(out)
    for item in out.scheduled:
        if item.samples:
            item.seq.append_token(token)
            if goals is not None and item.seq.num_output_tokens >= goals.get(
                item.seq.seq_id, 1 << 30
            ):
                sched.finish(item.seq, "length")
    return out


def summary(out: SchedulerOutput) -> list[tuple[Sequence, int]]:
    return [(s.seq, s.num_new_tokens) for s in out.scheduled]


# ---- admission -----------------------------------------------------------------------------------


def test_add_rejects_prompt_at_context_limit() -> None:
    sched = make_sched(max_model_len=16)
    with pytest.raises(ValueError, match="16"):
        sched.add(make_seq(16))
    sched.add(make_seq(15))
    assert len(sched.waiting) == 1


def test_empty_scheduler() -> None:
    sched = make_sched()
    assert not sched.has_work
    out = sched.schedule()
    assert out.is_empty and out.scheduled == [] and out.preempted == []
    assert out.num_batched_tokens == 0


def test_single_sequence_prefill_then_decode() -> None:
    sched = make_sched()
    seq = make_seq(10)
    sched.add(seq)
    assert sched.has_work
    assert sched.num_waiting_prompt_tokens == 10
    out = step(sched)
    assert summary(out) == [(seq, 10)]
    assert out.scheduled[0].samples
    assert seq.status == SequenceStatus.RUNNING
    assert sched.running == [seq] and not sched.waiting
    assert seq.num_computed_tokens == 10
    assert seq.num_tokens == 11
    assert sched.num_waiting_prompt_tokens == 0
    for _ in range(3):
        out = step(sched)
        assert summary(out) == [(seq, 1)]
        assert out.scheduled[0].samples
    assert seq.num_computed_tokens == 13
    assert seq.num_tokens == 14
    assert len(seq.block_table) == 4  # ceil(13 / 4)


def test_scheduled_seq_samples_flag_fixed_at_schedule_time() -> None:
    seq = make_seq(10)
    assert ScheduledSeq(seq, 10).samples
    assert not ScheduledSeq(seq, 9).samples
    seq.num_computed_tokens = 4
    assert ScheduledSeq(seq, 6).samples
    assert not ScheduledSeq(seq, 5).samples


# ---- ordering and budgets ------------------------------------------------------------------------


def test_decode_first_ordering() -> None:
    sched = make_sched(max_num_batched_tokens=8)
    a, b = make_seq(4, 100), make_seq(4, 200)
    sched.add(a)
    sched.add(b)
    out = step(sched)
    assert summary(out) == [(a, 4), (b, 4)]
    c = make_seq(20, 300)
    sched.add(c)
    out = step(sched)
    # Running decodes come first (oldest first); the new prompt gets what is left.
    assert summary(out) == [(a, 1), (b, 1), (c, 6)]
    assert out.num_batched_tokens == 8
    assert [s.samples for s in out.scheduled] == [True, True, False]


def test_token_budget_respected_and_prefill_chunked_across_steps() -> None:
    sched = make_sched(max_num_batched_tokens=8)
    seq = make_seq(21)
    sched.add(seq)
    chunks = []
    while not seq.num_output_tokens:
        out = step(sched)
        assert out.num_batched_tokens <= 8
        chunks.append((out.scheduled[0].num_new_tokens, out.scheduled[0].samples))
        assert seq.num_computed_tokens == sum(c for c, _ in chunks)
        assert len(seq.block_table) == sched.bm.blocks_needed(seq.num_computed_tokens)
        # A prompt in a chunked prefill is still queued prefill work for the load report
        # (routing, rebalancing): it read 0 once the prompt was admitted into the batch.
        left = 21 - seq.num_computed_tokens if seq.in_prefill else 0
        assert sched.num_waiting_prompt_tokens == left
    assert chunks == [(8, False), (8, False), (5, True)]
    assert seq.status == SequenceStatus.RUNNING


def test_budget_splits_across_many_prompts() -> None:
    sched = make_sched(max_num_batched_tokens=10, max_num_seqs=16)
    seqs = [make_seq(6, 100 * i) for i in range(5)]
    for s in seqs:
        sched.add(s)
    out = step(sched)
    # 6 + 4 (the second prompt chunked); the rest keep waiting.
    assert summary(out) == [(seqs[0], 6), (seqs[1], 4)]
    assert list(sched.waiting) == seqs[2:]
    out = step(sched)
    # Decode seqs[0], finish seqs[1]'s prompt, start seqs[2].
    assert summary(out) == [(seqs[0], 1), (seqs[1], 2), (seqs[2], 6), (seqs[3], 1)]
    assert out.num_batched_tokens == 10


def test_max_num_seqs_respected() -> None:
    sched = make_sched(max_num_seqs=2)
    seqs = [make_seq(3, 100 * i) for i in range(5)]
    goals = {s.seq_id: 2 for s in seqs}
    for s in seqs:
        sched.add(s)
    out = step(sched, goals)
    assert [s.seq for s in out.scheduled] == seqs[:2]
    assert len(sched.running) == 2
    assert list(sched.waiting) == seqs[2:]
    out = step(sched, goals)  # both reach 2 output tokens and finish
    assert [s.seq for s in out.scheduled] == seqs[:2]
    assert all(s.is_finished for s in seqs[:2])
    assert sched.running == []
    out = step(sched, goals)
    assert [s.seq for s in out.scheduled] == seqs[2:4]
    assert len(sched.running) <= 2


def test_waiting_blocks_head_of_line_when_cache_full() -> None:
    sched = make_sched(num_blocks=4, caching=False)
    a = make_seq(12)  # 3 blocks
    b = make_seq(8, 500)  # 2 blocks: does not fit next to a
    c = make_seq(2, 900)  # would fit, but arrival order is kept
    for s in (a, b, c):
        sched.add(s)
    out = step(sched)
    assert summary(out) == [(a, 12)]
    assert list(sched.waiting) == [b, c]
    assert b.block_table == [] and c.block_table == []
    sched.bm.check_invariants()


# ---- preemption ----------------------------------------------------------------------------------


def _two_seqs_filling_cache(caching: bool):
    sched = make_sched(num_blocks=4, caching=caching)
    a, b = make_seq(7, 100), make_seq(7, 200)
    sched.add(a)
    sched.add(b)
    step(sched)  # prefill both: 2 blocks each, 8 tokens after sampling
    step(sched)  # decode: token 8 fits, 9 tokens now
    assert a.num_computed_tokens == b.num_computed_tokens == 8
    assert sched.bm.num_free_blocks == 0
    return sched, a, b


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_by_recompute(caching: bool) -> None:
    sched, a, b = _two_seqs_filling_cache(caching)
    b_tokens = list(b.token_ids)
    out = step(sched)
    # a needs a third block; the newest running sequence (b) gives its blocks up.
    assert out.preempted == [b]
    assert summary(out) == [(a, 1)]
    assert sched.num_preemptions == 1
    assert b.status == SequenceStatus.WAITING
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.block_hashes == []
    assert list(sched.waiting) == [b]
    assert sched.running == [a]
    assert b.token_ids == b_tokens  # generated tokens are kept and recomputed later
    assert len(a.block_table) == 3
    sched.bm.check_invariants()

    # a finishes; b comes back and recomputes its whole history (prompt + outputs).
    sched.finish(a, "length")
    out = step(sched)
    assert out.preempted == []
    (item,) = out.scheduled
    assert item.seq is b and item.samples
    if caching:
        # b's first block survived in the prefix cache (its second was evicted for a).
        assert item.num_new_tokens == 9 - 4
        assert b.num_cached_tokens == 0  # only the first lookup of a prompt counts
    else:
        assert item.num_new_tokens == 9
    assert b.num_computed_tokens == 9
    assert b.num_tokens == 10
    assert b.status == SequenceStatus.RUNNING
    sched.bm.check_invariants()


def test_preemption_puts_victim_at_front_of_waiting() -> None:
    sched, a, b = _two_seqs_filling_cache(caching=False)
    c = make_seq(3, 300)
    sched.add(c)
    out = step(sched)
    assert out.preempted == [b]
    # Nothing new is admitted in a step that preempted.
    assert [s.seq for s in out.scheduled] == [a]
    assert list(sched.waiting) == [b, c]
    assert c.block_table == []


def test_several_preemptions_in_one_step_keep_arrival_order() -> None:
    sched = make_sched(num_blocks=8, caching=False)
    a, b, c, d = (make_seq(7, 100 * i) for i in range(1, 5))
    for s in (a, b, c, d):
        sched.add(s)
    step(sched)  # 4 x 2 blocks: the cache is full
    step(sched)  # the 8th token of each still fits
    assert sched.bm.num_free_blocks == 0
    assert all(s.num_tokens == 9 for s in (a, b, c, d))
    out = step(sched)
    # a's new block comes from preempting d (2 blocks), b takes the other one; c finds
    # nothing left, is the newest running sequence by then, and preempts itself.
    assert out.preempted == [d, c]
    assert summary(out) == [(a, 1), (b, 1)]
    assert sched.num_preemptions == 2
    assert list(sched.waiting) == [c, d]
    assert sched.running == [a, b]
    for s in (c, d):
        assert s.block_table == [] and s.num_computed_tokens == 0
        assert s.status == SequenceStatus.WAITING
    sched.bm.check_invariants()


def test_sequence_preempts_itself_when_alone() -> None:
    sched = make_sched(num_blocks=2)
    a = make_seq(8)
    sched.add(a)
    out = step(sched)
    assert summary(out) == [(a, 8)]
    out = step(sched)
    # 9 tokens need 3 blocks; nobody else to preempt.
    assert out.preempted == [a]
    assert out.is_empty
    assert list(sched.waiting) == [a] and sched.running == []
    assert sched.bm.num_free_blocks == 2
    # It can never fit again: nothing is scheduled, nothing changes.
    out = sched.schedule()
    assert out.is_empty and out.preempted == []
    assert a.block_table == [] and a.num_computed_tokens == 0
    sched.bm.check_invariants()


# ---- prefix caching ------------------------------------------------------------------------------


def test_prefix_cache_reuse_reflected_in_num_computed_tokens() -> None:
    sched = make_sched()
    prefix = list(range(100, 116))
    a = make_seq(prefix)
    goals = {a.seq_id: 2}
    sched.add(a)
    while not a.is_finished:
        step(sched, goals)
    b = make_seq(prefix + [1, 2, 3, 4])
    sched.add(b)
    out = sched.schedule()
    (item,) = out.scheduled
    assert item.seq is b
    assert b.num_computed_tokens == 16
    assert item.num_new_tokens == 4
    assert item.samples
    assert b.num_cached_tokens == 16
    assert sched.bm.hit_rate == pytest.approx(16 / (16 + 20))
    sched.postprocess(out)
    assert b.num_computed_tokens == 20
    sched.bm.check_invariants()


def test_prefix_cache_hit_while_the_owner_still_runs() -> None:
    sched = make_sched()
    prefix = list(range(100, 112))
    a = make_seq(prefix + [0])
    sched.add(a)
    step(sched)
    b = make_seq(prefix + [5, 6])
    sched.add(b)
    out = step(sched)
    assert summary(out) == [(a, 1), (b, 2)]
    assert b.block_table[:3] == a.block_table[:3]
    for bid in a.block_table[:3]:
        assert sched.bm.blocks[bid].ref_count == 2
    sched.bm.check_invariants()


def test_recompute_after_preemption_is_not_a_prefix_cache_hit() -> None:
    sched = make_sched(num_blocks=4, max_num_batched_tokens=5)
    a, b = make_seq(3, 100), make_seq(12, 200)
    sched.add(a)
    sched.add(b)
    assert summary(step(sched)) == [(a, 3), (b, 2)]
    assert summary(step(sched)) == [(a, 1), (b, 4)]  # b's first block is full and cached
    out = step(sched)
    assert out.preempted == [b]  # preempted in the middle of its prompt
    out = step(sched)
    # b is back; its lookup finds its own first block and skips recomputing it ...
    assert summary(out) == [(a, 1), (b, 4)]
    assert b.num_computed_tokens == 8
    # ... but that is not a prefix-cache hit of its prompt, and the prompt was looked up once.
    assert b.num_cached_tokens == 0
    assert sched.bm.lookup_tokens == 3 + 12
    assert sched.bm.hit_tokens == 0


def test_identical_prompt_leaves_last_token_to_compute() -> None:
    sched = make_sched()
    prompt = list(range(100, 116))
    a = make_seq(prompt)
    sched.add(a)
    step(sched, {a.seq_id: 1})
    assert a.is_finished
    b = make_seq(prompt)
    sched.add(b)
    out = sched.schedule()
    (item,) = out.scheduled
    # 3 of 4 blocks reused: the step that computes the last token is the one that samples.
    assert b.num_computed_tokens == 12
    assert item.num_new_tokens == 4
    assert item.samples


# ---- finish ----------------------------------------------------------------------------------


def test_finish_from_running_and_waiting_frees_blocks() -> None:
    sched = make_sched(max_num_seqs=1, caching=False)
    a, b = make_seq(9, 100), make_seq(5, 200)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert sched.running == [a] and list(sched.waiting) == [b]
    assert sched.bm.num_free_blocks == 64 - 3
    sched.finish(a, "stop", 2)
    assert a.status == SequenceStatus.FINISHED and a.is_finished
    assert a.finish_reason == "stop" and a.stop_reason == 2
    assert sched.running == [] and a.block_table == []
    assert sched.bm.num_free_blocks == 64
    sched.finish(b, "abort")
    assert not sched.waiting and not sched.has_work
    assert b.finish_reason == "abort" and b.stop_reason is None
    # Finishing twice changes nothing.
    sched.finish(a, "length")
    assert a.finish_reason == "stop"
    sched.bm.check_invariants()


def test_finish_preempted_sequence_from_waiting() -> None:
    sched, a, b = _two_seqs_filling_cache(caching=True)
    step(sched)
    assert list(sched.waiting) == [b]
    sched.finish(b, "abort")
    sched.finish(a, "abort")
    assert not sched.has_work
    assert sched.bm.num_free_blocks == 4
    assert all(blk.ref_count == 0 for blk in sched.bm.blocks)
    sched.bm.check_invariants()


# ---- imported prompts (decode side of PD) ----------------------------------------------------


def test_imported_prompt_reuses_the_device_cache_then_the_host_pool() -> None:
    sched = make_sched(num_blocks=8)
    sched.tiers = KVTierManager(BS, (1,), torch.float32, host_blocks=4, pin_memory=False)
    sched.bm.feed_tiers = True
    prompt = list(range(100, 113))  # 3 blocks can be hits; the last token never is
    hashes = hash_prompt_blocks(prompt, BS)
    owner = make_seq(prompt[:4])
    assert sched.bm.allocate_slots(owner, 4)
    owner.num_computed_tokens = 4
    sched.bm.cache_full_blocks(owner)  # block 0 on the device
    sched.bm.free(owner)
    blocks = [tuple(prompt[i * BS : (i + 1) * BS]) for i in (1, 2)]
    sched.tiers.host.put(hashes[1:3], blocks, torch.zeros(2, 1))  # blocks 1, 2 in the host pool
    sched.bm.take_events()

    seq = make_seq(prompt)
    loads = sched.allocate_imported(seq)
    assert loads is not None
    assert [(x.block_id, x.hit.block_hash, x.hit.tier) for x in loads] == [
        (seq.block_table[1], hashes[1], "host"),
        (seq.block_table[2], hashes[2], "host"),
    ]
    assert len(seq.block_table) == 4 and seq.num_computed_tokens == 12
    assert seq.block_hashes == hashes[:3]
    assert [(e.kind, e.block_hashes) for e in sched.bm.take_events()] == [("stored", hashes[1:3])]
    assert not sched.waiting and not sched.running  # reserved, not scheduled
    sched.bm.free(seq)
    sched.bm.check_invariants()
    assert sched.bm.num_free_blocks == 8 and all(sched.bm.is_cached(h) for h in hashes[:3])


def test_imported_prompt_that_does_not_fit_changes_nothing() -> None:
    sched = make_sched(num_blocks=3)
    sched.tiers = KVTierManager(BS, (1,), torch.float32, host_blocks=4, pin_memory=False)
    prompt = list(range(100, 113))
    sched.tiers.host.put(
        hash_prompt_blocks(prompt, BS)[:1], [tuple(prompt[:BS])], torch.zeros(1, 1)
    )
    seq = make_seq(prompt)
    assert sched.allocate_imported(seq) is None
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert sched.bm.num_free_blocks == 3
    sched.bm.check_invariants()


def imported(sched: Scheduler, n: int, start: int) -> Sequence:
    """A PD decode sequence: its ``n``-token prompt's KV imported into reserved blocks, then
    its first token (sampled by the prefill side) appended and queued for a running slot."""
    seq = make_seq(n, start)
    assert sched.allocate_imported(seq) is not None
    seq.num_computed_tokens = seq.num_tokens
    seq.append_token(7)
    sched.add_computed(seq)
    return seq


def test_imported_sequences_queue_ahead_of_those_holding_no_blocks() -> None:
    sched = make_sched(num_blocks=16, max_num_seqs=1)
    a = make_seq(5, 100)
    sched.add(a)
    step(sched)
    d = make_seq(3, 400)
    sched.add(d)
    b = imported(sched, 6, 200)
    c = imported(sched, 6, 300)
    assert list(sched.waiting) == [b, c, d]
    assert sched.running == [a]  # max_num_seqs
    # A preempted sequence (it holds no blocks) goes behind the imported ones.
    sched._preempt(a, SchedulerOutput())
    assert list(sched.waiting) == [b, c, a, d]
    out = step(sched)
    assert summary(out) == [(b, 1)]  # its last token only: the prompt's KV is in place
    assert sched.running == [b]
    sched.bm.check_invariants()


def test_preempt_queued_frees_the_newest_sequence_holding_blocks() -> None:
    sched = make_sched(num_blocks=4, max_num_seqs=1)
    b = imported(sched, 8, 200)
    c = imported(sched, 8, 300)
    assert sched.bm.num_free_blocks == 0
    # Nothing runs; b needs a third block for its 9th token and only c holds any.
    assert sched.schedule().is_empty
    assert sched.num_blocks_held_elsewhere == 0
    assert sched.preempt_queued()
    assert c.block_table == [] and c.num_computed_tokens == 0 and b.block_table
    assert list(sched.waiting) == [b, c]
    assert summary(step(sched)) == [(b, 1)]
    assert not sched.preempt_queued()  # c holds none; b runs
    sched.bm.check_invariants()


def test_blocks_held_elsewhere_counts_blocks_of_no_queued_or_running_sequence() -> None:
    sched = make_sched(num_blocks=8)
    held = make_seq(8, 100)
    assert sched.allocate_imported(held) is not None  # a reservation: in neither queue
    b = imported(sched, 4, 200)
    assert sched.num_blocks_held_elsewhere == 2
    assert sched.fits_empty_cache(make_seq(31)) and not sched.fits_empty_cache(make_seq(32))
    sched.bm.free(held)
    assert sched.num_blocks_held_elsewhere == 0
    assert b.block_table


# ---- property-based ----------------------------------------------------------------------------


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    n = draw(st.integers(1, 8))
    base = draw(st.lists(st.integers(0, 3), min_size=1, max_size=24))
    specs = []
    for _ in range(n):
        # Prompts share prefixes of ``base`` so that the prefix cache is exercised.
        cut = draw(st.integers(0, len(base)))
        tail = draw(st.lists(st.integers(0, 3), max_size=10))
        prompt = base[:cut] + tail or [0]
        specs.append((prompt, draw(st.integers(1, 8)), draw(st.integers(0, 6))))
    longest = max(len(p) + out for p, out, _ in specs)
    # Enough blocks for any one sequence alone, possibly far fewer than for all together.
    num_blocks = -(-longest // block_size) + draw(st.sampled_from([0, 0, 1, 2, 4, 8, 16]))
    return dict(
        block_size=block_size,
        num_blocks=num_blocks,
        max_num_seqs=draw(st.integers(1, 6)),
        max_num_batched_tokens=draw(st.integers(1, 32)),
        caching=draw(st.booleans()),
        specs=specs,
        seed=draw(st.integers(0, 2**16)),
        abort_rate=draw(st.sampled_from([0.0, 0.0, 0.05])),
    )


def check_state(sched: Scheduler, kv: dict[tuple[int, int], tuple[int, ...]]) -> None:
    """The state after a step: the allocator's bookkeeping, every running sequence's blocks
    cover exactly its computed tokens, whose KV (``kv``: what the fake model wrote in each
    slot) is theirs, queued sequences hold nothing, reference counts match the holders."""
    bm, bs = sched.bm, sched.bm.block_size
    bm.check_invariants()
    holders = [0] * bm.num_blocks
    for s in sched.running:
        assert s.status == SequenceStatus.RUNNING
        assert len(s.block_table) == bm.blocks_needed(s.num_computed_tokens)
        assert s.num_uncomputed_tokens >= 1
        for bid in s.block_table:
            holders[bid] += 1
        for pos in range(s.num_computed_tokens):
            assert kv[(s.block_table[pos // bs], pos % bs)] == tuple(s.token_ids[: pos + 1])
    for s in sched.waiting:
        assert s.status == SequenceStatus.WAITING
        assert s.block_table == [] and s.num_computed_tokens == 0
    assert holders == [b.ref_count for b in bm.blocks]
    assert bm.num_free_blocks == bm.num_blocks - sum(1 for h in holders if h)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=workloads())
def test_scheduler_property(w) -> None:
    rng = random.Random(w["seed"])
    sched = make_sched(
        num_blocks=w["num_blocks"],
        max_num_seqs=w["max_num_seqs"],
        max_num_batched_tokens=w["max_num_batched_tokens"],
        caching=w["caching"],
        block_size=w["block_size"],
    )
    bm, bs = sched.bm, w["block_size"]
    pending = []  # (arrival step, seq, output goal)
    for prompt, goal, arrival in w["specs"]:
        pending.append((arrival, make_seq(prompt), goal))
    all_seqs = [s for _, s, _ in pending]
    goals = {s.seq_id: g for _, s, g in pending}
    kv: dict[tuple[int, int], tuple[int, ...]] = {}
    ever_scheduled: set[int] = set()
    samples_per_seq = {s.seq_id: 0 for s in all_seqs}

    for t in range(2000):
        for arrival, seq, _ in pending:
            if arrival == t:
                sched.add(seq)
        if t > max(a for a, _, _ in pending) and not sched.has_work:
            break
        running_before = list(sched.running)
        out = sched.schedule()

        # -- the batch --
        assert out.num_batched_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        seqs = [s.seq for s in out.scheduled]
        assert len(set(map(id, seqs))) == len(seqs)
        assert all(s in sched.running for s in seqs)
        for p in out.preempted:
            assert p in sched.waiting and p not in seqs and p in running_before
            assert p.block_table == [] and p.num_computed_tokens == 0
        if out.preempted:
            # Nothing is admitted from waiting in a step that preempted.
            assert all(s in running_before for s in seqs)
        if out.is_empty:
            assert out.preempted or not sched.has_work
        for item in out.scheduled:
            s = item.seq
            ever_scheduled.add(s.seq_id)
            assert item.num_new_tokens >= 1
            assert s.num_computed_tokens + item.num_new_tokens <= s.num_tokens
            assert item.samples == (s.num_computed_tokens + item.num_new_tokens == s.num_tokens)
            assert len(s.block_table) * bs >= s.num_computed_tokens + item.num_new_tokens
            # Fake model step: write the KV of each computed position into its slot. Only a
            # block this sequence owns alone and that is not a registered cache block.
            for pos in range(s.num_computed_tokens, s.num_computed_tokens + item.num_new_tokens):
                bid = s.block_table[pos // bs]
                assert bm.blocks[bid].ref_count == 1
                assert bm.blocks[bid].block_hash is None
                kv[(bid, pos % bs)] = tuple(s.token_ids[: pos + 1])

        sched.postprocess(out)
        for item in out.scheduled:
            if item.samples:
                samples_per_seq[item.seq.seq_id] += 1
                item.seq.append_token(rng.randrange(4))
                if item.seq.num_output_tokens >= goals[item.seq.seq_id]:
                    sched.finish(item.seq, "length")
        if w["abort_rate"] and rng.random() < w["abort_rate"]:
            live = list(sched.running) + list(sched.waiting)
            if live:
                victim = rng.choice(live)
                sched.finish(victim, "abort")
                assert victim.block_table == []

        check_state(sched, kv)
    else:
        raise AssertionError("the workload did not finish in 2000 steps")

    for s in all_seqs:
        assert s.is_finished
        assert s.block_table == []
        if s.finish_reason == "length":
            assert s.num_output_tokens == goals[s.seq_id]
            # Every output token came from exactly one sampling step.
            assert samples_per_seq[s.seq_id] == goals[s.seq_id]
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    bm.check_invariants()
    # Each prompt was looked up in the prefix cache once, however often it was preempted.
    started = [s for s in all_seqs if s.seq_id in ever_scheduled]
    assert bm.lookup_tokens == sum(s.num_prompt_tokens for s in started)
    assert bm.hit_tokens == sum(s.num_cached_tokens for s in started)
    assert all(s.num_cached_tokens < s.num_prompt_tokens for s in started)
    assert not sched._recomputing
