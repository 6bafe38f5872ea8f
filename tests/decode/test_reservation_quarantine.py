"""Blocks (or staging slots) of a reservation freed before Decode claimed it stay out of every
pool until its deadline plus the write grace: a prefill worker may still be writing into them,
and another request must not get them before then."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from services.decode.kv_receiver import KVReceiver
from services.engine import LLM, SamplingParams
from services.engine.block_manager import BlockManager
from services.engine.kv_staging import KVStaging
from services.engine.sequence import Sequence

BS = 4


def reserved_seq(bm: BlockManager, tokens: list[int]) -> Sequence:
    """A decode reservation: the prefix-cache hit, then fresh blocks for the rest."""
    seq = Sequence("r", tokens, SamplingParams())
    hit = bm.get_computed_blocks(seq)
    assert bm.allocate_slots(seq, seq.num_tokens - hit.num_blocks * BS, hit)
    bm.note_lookup(seq, hit.num_blocks * BS)
    return seq


def test_quarantined_blocks_are_handed_out_only_after_their_time() -> None:
    bm = BlockManager(6, BS)
    cached = Sequence("c", list(range(9)), SamplingParams())  # two full blocks cached
    assert bm.allocate_slots(cached, 9)
    cached.num_computed_tokens = 9
    bm.cache_full_blocks(cached)
    bm.free(cached)
    seq = reserved_seq(bm, [*range(8), 50, 51, 52, 53, 54])  # hits 2 blocks, writes 2
    hits, written = seq.block_table[:2], seq.block_table[2:]
    assert len(written) == 2 and bm.num_free_blocks == 2  # 1 never used + 1 evictable
    bm.free_quarantined(seq, first=2, until=100.0)
    bm.check_invariants()
    assert set(bm.quarantined) == set(written) and seq.block_table == []
    assert all(h in bm.evictable for h in hits)  # hits are never written: cached as before
    assert bm.num_free_blocks == 4
    # Everything that can be handed out is, and none of it is a quarantined block.
    other = Sequence("o", list(range(200, 216)), SamplingParams())
    assert bm.allocate_slots(other, 16)
    assert not set(other.block_table) & set(written)
    assert not bm.allocate_slots(Sequence("p", [1], SamplingParams()), 1)
    bm.free(other)
    assert bm.release_quarantined(99.9) == 0
    assert bm.release_quarantined(100.0) == 2
    bm.check_invariants()
    assert bm.num_free_blocks == 6 and not bm.quarantined


def test_the_engine_quarantines_a_released_reservation(tiny_model_dir) -> None:
    engine = LLM(str(tiny_model_dir("llama")), block_size=BS).engine
    total = engine.block_manager.num_free_blocks
    blocks, cached = engine.reserve("a", list(range(10, 30)), SamplingParams(max_tokens=1))
    assert cached == 0 and len(blocks) == 5
    engine.free_reserved("a", quarantine_until=time.monotonic() + 0.3)
    assert set(engine.block_manager.quarantined) == set(blocks)
    assert engine.release_quarantined() == 0
    assert engine.block_manager.num_free_blocks == total - 5
    time.sleep(0.35)
    assert engine.release_quarantined() == 5
    assert engine.block_manager.num_free_blocks == total
    engine.block_manager.check_invariants()
    # Without a quarantine (a claimed reservation: its writes are done) they go back at once.
    engine.reserve("b", list(range(10, 30)), SamplingParams(max_tokens=1))
    engine.free_reserved("b")
    assert engine.block_manager.num_free_blocks == total


class FakeEngine:
    """The receiver's view of the engine: ``call`` runs on a stand-in for the step thread."""

    def __init__(self) -> None:
        self.freed: list[tuple[str, float | None]] = []
        self.released = 0

    async def prepare(self, params) -> None:
        pass

    async def call(self, fn):
        return fn(self)

    def reserve(self, request_id, prompt, params, resume, images):
        return [7, 8, 9], 0

    def free_reserved(self, request_id: str, quarantine_until: float | None = None) -> None:
        self.freed.append((request_id, quarantine_until))

    def release_quarantined(self) -> int:
        self.released += 1
        return 0


@pytest.mark.asyncio
async def test_a_release_before_the_deadline_quarantines_until_deadline_plus_grace() -> None:
    engine = FakeEngine()
    receiver = KVReceiver(engine, None, reserve_timeout_s=5, write_grace_s=2)  # type: ignore[arg-type]
    r = await receiver.reserve("a", [1, 2, 3], SamplingParams())
    assert r.deadline_unix == pytest.approx(time.time() + 5, abs=0.5)
    await receiver.release("a")  # the router gave up at once: the push may go on until r.deadline
    ((rid, until),) = engine.freed
    assert rid == "a" and until == pytest.approx(r.deadline + 2)
    await receiver.release_quarantined(until - 0.01)
    assert engine.released == 0
    await receiver.release_quarantined(until)
    assert engine.released == 1


@pytest.mark.asyncio
async def test_an_expired_reservation_is_quarantined_and_then_released_by_the_reaper() -> None:
    engine = FakeEngine()
    receiver = KVReceiver(engine, None, reserve_timeout_s=0.2, write_grace_s=0.3)  # type: ignore[arg-type]
    receiver.start()
    try:
        r = await receiver.reserve("a", [1, 2, 3], SamplingParams())
        for _ in range(200):
            if engine.freed:
                break
            await asyncio.sleep(0.01)
        ((_, until),) = engine.freed
        assert until >= r.deadline + 0.3 and receiver.expired == 1
        assert engine.released == 0
        for _ in range(200):
            if engine.released:
                break
            await asyncio.sleep(0.01)
        assert engine.released == 1 and time.monotonic() >= until
    finally:
        await receiver.stop()


@pytest.mark.asyncio
async def test_staging_slots_are_quarantined_not_the_blocks() -> None:
    # With staging the prefill worker writes the slots; the blocks are only written by the
    # copy-in of a claimed reservation.
    engine = FakeEngine()
    staging = KVStaging(torch.zeros(2, 2, 8, 4, 1, 4), "fp", 4)
    receiver = KVReceiver(engine, None, 5, staging=staging, write_grace_s=1)  # type: ignore[arg-type]
    r = await receiver.reserve("a", [1, 2, 3], SamplingParams())
    assert len(r.slots) == 3 and staging.num_free == 1
    await receiver.release("a")
    assert engine.freed == [("a", None)]
    assert staging.num_free == 1  # the slots wait
    await receiver.release_quarantined(r.deadline + 0.5)
    assert staging.num_free == 1
    await receiver.release_quarantined(r.deadline + 1)
    assert staging.num_free == 4
