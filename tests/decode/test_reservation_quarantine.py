"""Blocks (or staging slots) of a reservation freed before Decode claimed it stay out of every
pool until its prefill worker fenced its push (or is gone), or, with no writer known, until
the deadline plus the write grace: another request must not get them while a write may land."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from services.decode.fence import WriterGone
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


def test_quarantined_blocks_are_handed_out_only_once_released() -> None:
    bm = BlockManager(6, BS)
    cached = Sequence("c", list(range(9)), SamplingParams())  # two full blocks cached
    assert bm.allocate_slots(cached, 9)
    cached.num_computed_tokens = 9
    bm.cache_full_blocks(cached)
    bm.free(cached)
    seq = reserved_seq(bm, [*range(8), 50, 51, 52, 53, 54])  # hits 2 blocks, writes 2
    hits, written = seq.block_table[:2], seq.block_table[2:]
    assert len(written) == 2 and bm.num_free_blocks == 2  # 1 never used + 1 evictable
    assert bm.free_quarantined(seq, first=2) == written
    bm.check_invariants()
    assert bm.quarantined == set(written) and seq.block_table == []
    assert all(h in bm.evictable for h in hits)  # hits are never written: cached as before
    assert bm.num_free_blocks == 4
    # Everything that can be handed out is, and none of it is a quarantined block.
    other = Sequence("o", list(range(200, 216)), SamplingParams())
    assert bm.allocate_slots(other, 16)
    assert not set(other.block_table) & set(written)
    assert not bm.allocate_slots(Sequence("p", [1], SamplingParams()), 1)
    bm.free(other)
    bm.release_quarantined([*hits, 5])  # not quarantined: ignored
    assert bm.quarantined == set(written)
    bm.release_quarantined(written)
    bm.check_invariants()
    assert bm.num_free_blocks == 6 and not bm.quarantined


def test_the_engine_quarantines_a_released_reservation(tiny_model_dir) -> None:
    engine = LLM(str(tiny_model_dir("llama")), block_size=BS).engine
    total = engine.block_manager.num_free_blocks
    blocks, cached = engine.reserve("a", list(range(10, 30)), SamplingParams(max_tokens=1))
    assert cached == 0 and len(blocks) == 5
    assert engine.free_reserved("a", quarantine=True) == blocks
    assert engine.block_manager.quarantined == set(blocks)
    assert engine.block_manager.num_free_blocks == total - 5
    engine.release_quarantined(blocks)
    assert engine.block_manager.num_free_blocks == total
    engine.block_manager.check_invariants()
    # Without a quarantine (a claimed reservation: its writes are done) they go back at once.
    engine.reserve("b", list(range(10, 30)), SamplingParams(max_tokens=1))
    assert engine.free_reserved("b") == []
    assert engine.block_manager.num_free_blocks == total


class FakeEngine:
    """The receiver's view of the engine: ``call`` runs on a stand-in for the step thread."""

    def __init__(self) -> None:
        self.quarantined: set[int] = set()
        self.freed: list[str] = []

    async def prepare(self, params) -> None:
        pass

    async def call(self, fn):
        return fn(self)

    def reserve(self, request_id, prompt, params, resume, images, lora=None):
        return [7, 8, 9], 0

    def free_reserved(self, request_id: str, quarantine: bool = False) -> list[int]:
        self.freed.append(request_id)
        if quarantine:
            self.quarantined |= {7, 8, 9}
            return [7, 8, 9]
        return []

    def release_quarantined(self, block_ids: list[int]) -> None:
        self.quarantined -= set(block_ids)


class FakeFence:
    """A writer that answers FenceKVPush only when the test says so (``answer``: None for a
    fence, or the exception to raise)."""

    def __init__(self) -> None:
        self.calls = 0
        self.answers: asyncio.Queue[BaseException | None] = asyncio.Queue()

    async def __call__(self, address: str, request_id: str, deadline_unix: float) -> None:
        assert address == "p1:50051" and request_id == "a"
        assert deadline_unix == pytest.approx(time.time(), abs=60)  # the reservation's
        self.calls += 1
        answer = await self.answers.get()
        if answer is not None:
            raise answer


async def until(pred, what: str, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, what
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_released_blocks_wait_for_the_writers_fence_however_long() -> None:
    engine, fence = FakeEngine(), FakeFence()
    receiver = KVReceiver(
        engine, None, reserve_timeout_s=0.2, write_grace_s=0.1, fence=fence, fence_timeout_s=60
    )  # type: ignore[arg-type]
    receiver.start()
    try:
        r = await receiver.reserve("a", [1, 2, 3], SamplingParams(), writer="p1:50051")
        assert r.deadline_unix == pytest.approx(time.time() + 0.2, abs=0.5)
        await until(lambda: engine.freed == ["a"], "expired")
        assert receiver.expired == 1 and engine.quarantined == {7, 8, 9}
        # The writer does not answer (stopped): well past deadline + grace, still held.
        await fence.answers.put(TimeoutError("deadline exceeded"))
        await until(lambda: fence.calls == 2, "asked again")
        await asyncio.sleep(0.5)
        assert engine.quarantined == {7, 8, 9}
        await fence.answers.put(None)  # it continued, drained and fenced its push
        await until(lambda: not engine.quarantined, "released after the fence")
        assert receiver.quarantine == []
    finally:
        await receiver.stop()


@pytest.mark.asyncio
async def test_a_writer_that_is_gone_releases_the_blocks() -> None:
    engine, fence = FakeEngine(), FakeFence()
    receiver = KVReceiver(engine, None, 30, fence=fence)  # type: ignore[arg-type]
    await receiver.reserve("a", [1, 2, 3], SamplingParams(), writer="p1:50051")
    await receiver.release("a")  # the router gave up at once, long before the deadline
    assert engine.quarantined == {7, 8, 9}
    await fence.answers.put(WriterGone("connection refused"))
    await until(lambda: not engine.quarantined, "released")
    await receiver.stop()


@pytest.mark.asyncio
async def test_no_fence_past_the_fence_timeout_releases_the_blocks() -> None:
    engine, fence = FakeEngine(), FakeFence()
    receiver = KVReceiver(engine, None, 0.1, fence=fence, fence_timeout_s=0.3)  # type: ignore[arg-type]
    receiver.start()
    try:
        r = await receiver.reserve("a", [1, 2, 3], SamplingParams(), writer="p1:50051")
        await until(lambda: engine.quarantined, "expired")
        await until(lambda: not engine.quarantined, "released at the fence timeout")
        assert time.monotonic() >= r.deadline + 0.3
    finally:
        await receiver.stop()


@pytest.mark.asyncio
async def test_without_a_writer_blocks_wait_for_the_deadline_plus_grace() -> None:
    engine = FakeEngine()
    receiver = KVReceiver(engine, None, reserve_timeout_s=5, write_grace_s=2)  # type: ignore[arg-type]
    r = await receiver.reserve("a", [1, 2, 3], SamplingParams())
    await receiver.release("a")  # the push may go on until r.deadline
    (q,) = receiver.quarantine
    assert q.until == pytest.approx(r.deadline + 2) and q.fence is None
    await receiver.release_quarantined(q.until - 0.01)
    assert engine.quarantined == {7, 8, 9}
    await receiver.release_quarantined(q.until)
    assert not engine.quarantined


@pytest.mark.asyncio
async def test_staging_slots_are_quarantined_not_the_blocks() -> None:
    # With staging the prefill worker writes the slots; the blocks are only written by the
    # copy-in of a claimed reservation.
    engine, fence = FakeEngine(), FakeFence()
    staging = KVStaging(torch.zeros(2, 2, 8, 4, 1, 4), "fp", 4)
    receiver = KVReceiver(engine, None, 5, staging=staging, fence=fence)  # type: ignore[arg-type]
    r = await receiver.reserve("a", [1, 2, 3], SamplingParams(), writer="p1:50051")
    assert len(r.slots) == 3 and staging.num_free == 1
    await receiver.release("a")
    assert engine.freed == ["a"] and not engine.quarantined
    await asyncio.sleep(0.05)
    assert staging.num_free == 1  # the slots wait for the fence
    await fence.answers.put(None)
    await until(lambda: staging.num_free == 4, "slots back after the fence")
    await receiver.stop()
