"""The decode side of an EAGLE-3 head's states pushed with the KV (states_push.py): a region of
a registered buffer per reservation, read and freed when claimed, quarantined with the blocks
when released unclaimed, so that a writer's late write never lands in another request's
states; the gRPC path where there is no region."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.common.proto import worker_pb2 as pb
from services.decode.kv_receiver import KVReceiver
from services.decode.role import DecodeRole
from services.engine.sampling_params import SamplingParams
from services.engine.speculative import handoff
from services.engine.speculative.handoff import MAX_BYTES, DraftStates
from services.engine.speculative.states_push import Region, StatesArena, fits
from tests.decode.test_reservation_quarantine import FakeEngine, FakeFence, until
from tests.deps import MOONCAKE, require

ROW = 16  # 4 float32 values


def test_the_arena_hands_out_contiguous_regions_and_merges_them_back() -> None:
    arena = StatesArena(4, torch.float32, nbytes=10 * ROW)
    a, b, c = (arena.allocate_rows(n) for n in (3, 3, 3))
    assert (a, b, c) == (Region(0, 48), Region(48, 48), Region(96, 48))
    assert arena.allocate_rows(2) is None  # one row left
    arena.free(b)
    assert arena.allocate_rows(4) is None  # 3 + 1 rows free, not together
    arena.free(a)
    assert arena.allocate_rows(6) == Region(0, 96)  # a and b merged
    with pytest.raises(AssertionError, match="twice"):
        arena.free(c)
        arena.free(c)
    big = StatesArena(4, torch.float32, nbytes=MAX_BYTES + ROW)
    assert big.allocate_rows(10**9) == Region(0, MAX_BYTES)  # a prompt's last MAX_BYTES
    assert arena.allocate_rows(0) is None


def test_states_are_cut_and_cast_to_what_the_region_takes() -> None:
    states = DraftStates(10, [1, 2, 3], torch.arange(12.0).reshape(3, 4))
    target = pb.DraftStatesTarget(addr=1, capacity=2 * 8, width=4, dtype="bfloat16")
    cut = fits(target, states)
    assert cut is not None and cut.start == 11 and cut.tokens == [2, 3]
    assert cut.hidden.dtype == torch.bfloat16 and cut.hidden[0, 0].item() == 4.0
    assert fits(pb.DraftStatesTarget(capacity=99, width=5, dtype="float32"), states) is None
    assert fits(pb.DraftStatesTarget(capacity=99, width=4, dtype="int8"), states) is None
    assert fits(pb.DraftStatesTarget(capacity=8, width=4, dtype="float32"), states) is None


@pytest.mark.asyncio
async def test_a_released_reservations_region_waits_for_the_writers_fence() -> None:
    engine, fence = FakeEngine(), FakeFence()
    arena = StatesArena(4, torch.float32, nbytes=2 * 3 * ROW)  # two prompts of 3 tokens
    receiver = KVReceiver(engine, None, 30, fence=fence, states=arena)  # type: ignore[arg-type]
    try:
        a = await receiver.reserve("a", [1, 2, 3], SamplingParams(), writer="p1:50051")
        assert a.states_region == Region(0, 48)
        await receiver.release("a")  # unclaimed: its writer may be stopped mid-push
        b = await receiver.reserve("b", [1, 2, 3], SamplingParams())
        assert b.states_region == Region(48, 48)  # not a's, which may still be written
        c = await receiver.reserve("c", [1, 2, 3], SamplingParams())
        assert c.states_region is None  # no room: its states go through the router
        await fence.answers.put(None)  # a's writer fenced its push
        await until(lambda: arena.free_bytes == 48, "a's region back after the fence")
    finally:
        await receiver.stop()


@pytest.mark.asyncio
async def test_a_late_states_write_lands_in_quarantine_not_in_another_request() -> None:
    """Real Mooncake: a prefill worker's write of request a's states that lands after a's
    reservation was released (the worker was stopped mid-push) leaves request b's states,
    reserved since, as they were. Freeing a's region at the release instead hands it to b,
    and the late write overwrites b's states."""
    require("mooncake.engine", MOONCAKE)
    from services.common.mooncake_agent import MooncakeAgent, MooncakeConfig

    decode_agent, prefill_agent = MooncakeAgent(MooncakeConfig()), MooncakeAgent(MooncakeConfig())
    arena = StatesArena(4, torch.float32, nbytes=4 * 3 * ROW, register=decode_agent.register)
    source = StatesArena(4, torch.float32, nbytes=3 * ROW, register=prefill_agent.register)
    fence = FakeFence()
    receiver = KVReceiver(FakeEngine(), None, 30, fence=fence, states=arena)  # type: ignore[arg-type]
    try:
        a = await receiver.reserve("a", [1, 2, 3], SamplingParams(), writer="p1:50051")
        assert a.states_region is not None
        target = pb.DraftStatesTarget()
        arena.target(a.states_region, target)
        await receiver.release("a")
        b = await receiver.reserve("b", [4, 5, 6], SamplingParams())
        assert b.states_region is not None
        arena.put(b.states_region, torch.full((3, 4), 2.0))  # b's states, landed
        region = source.allocate_rows(3)
        assert region is not None
        source.put(region, torch.full((3, 4), 7.0))
        await asyncio.to_thread(
            prefill_agent.write, decode_agent.session_id, [source.addr(region)], [target.addr],
            [3 * ROW],
        )  # fmt: skip
        assert torch.equal(
            arena.take(b.states_region, 0, [4, 5, 6]).hidden, torch.full((3, 4), 2.0)
        )
        late = arena.take(Region(target.addr - arena.base_addr, 48), 0, [1, 2, 3])
        assert torch.equal(late.hidden, torch.full((3, 4), 7.0))  # in the quarantine
    finally:
        await receiver.stop()


class _Engine:
    def check_output_tokens(self, tokens, what) -> None:
        pass


@pytest.mark.asyncio
async def test_decode_takes_pushed_states_from_the_region_or_the_message() -> None:
    arena = StatesArena(4, torch.float32, nbytes=4 * 3 * ROW)
    receiver = KVReceiver(FakeEngine(), None, 30, states=arena)  # type: ignore[arg-type]
    role = DecodeRole(_Engine(), receiver, "127.0.0.1:1")  # type: ignore[arg-type]
    hidden = torch.arange(12.0).reshape(3, 4)
    # Pushed: the message has the tokens, the region the rows.
    r = await receiver.reserve("a", [1, 2, 3], SamplingParams())
    assert r.states_region is not None
    arena.put(r.states_region, hidden)
    msg = pb.DecodeRequest(request_id="a", draft_states=pb.DraftStates(
        start=0, tokens=[1, 2, 3], width=4, dtype="float32", pushed=True))  # fmt: skip
    states = role._draft_states(receiver.claim("a"), msg)
    assert states is not None and torch.equal(states.hidden, hidden) and states.tokens == [1, 2, 3]
    assert arena.free_bytes == arena.nbytes  # freed once read
    # Through the router (the prefill worker could not push): the message has the rows.
    r = await receiver.reserve("b", [1, 2, 3], SamplingParams())
    msg = pb.DecodeRequest(request_id="b")
    handoff.to_proto(DraftStates(0, [1, 2, 3], hidden), msg.draft_states)
    states = role._draft_states(receiver.claim("b"), msg)
    assert states is not None and torch.equal(states.hidden, hidden)
    assert arena.handoffs == {"push": 1, "grpc": 1} and arena.free_bytes == arena.nbytes
    # A pushed message whose rows overflow the region: no states (drafts only), region freed.
    await receiver.reserve("c", [1, 2, 3], SamplingParams())
    msg = pb.DecodeRequest(request_id="c", draft_states=pb.DraftStates(
        start=0, tokens=[1, 2, 3, 4], width=4, dtype="float32", pushed=True))  # fmt: skip
    assert role._draft_states(receiver.claim("c"), msg) is None
    assert arena.free_bytes == arena.nbytes
    await receiver.stop()


def test_the_arena_size_is_a_checked_worker_flag() -> None:
    from services.worker.config import WorkerConfig

    assert WorkerConfig().draft_states_bytes == 64 << 20
    assert WorkerConfig(draft_states_bytes=0).draft_states_bytes == 0  # off: through the router
    for bad in (-1, 1 << 41):
        with pytest.raises(ValueError, match="draft_states_bytes"):
            WorkerConfig(draft_states_bytes=bad)
