"""The decode side's claim of a staged reservation: the copy from the staging slots into the
reserved blocks runs off the event loop, and its slots go back only once the copy is over,
whatever happens to the request meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from services.decode.kv_receiver import GRAMMAR_BUILD_ALLOWANCE_S, KVReceiver, Reservation
from services.engine.kv_staging import KVStaging
from services.engine.sampling_params import SamplingParams, StructuredOutputsParams

pytestmark = pytest.mark.asyncio


class SlowStaging(KVStaging):
    """Staging whose copy-in waits for the test to let it go."""

    def __init__(self) -> None:
        super().__init__(torch.zeros(2, 2, 8, 4, 1, 4), "fp", 4)
        self.go = threading.Event()
        self.copied: list[tuple[list[int], list[int]]] = []

    def stage_in(self, slots: list[int], block_ids: list[int]) -> None:
        assert self.go.wait(10), "the test never released the copy"
        super().stage_in(slots, block_ids)
        self.copied.append((slots, block_ids))


def staged_reservation(staging: KVStaging) -> Reservation:
    # Four prompt blocks, the first one cached on this worker: three slots carry the rest.
    r = Reservation("r", [5, 6, 7, 2], cached_tokens=4, deadline=0.0)
    r.slots = staging.allocate(3)
    staging.buffer[:, :, r.slots] = torch.arange(1.0, 4.0).view(1, 1, 3, 1, 1, 1)
    return r


async def until(pred, what: str) -> None:
    for _ in range(1000):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


async def test_copy_in_leaves_the_loop_free_and_frees_the_slots_after_the_copy() -> None:
    staging = SlowStaging()
    receiver = KVReceiver(engine=None, layout=None, reserve_timeout_s=5, staging=staging)  # type: ignore[arg-type]
    r = staged_reservation(staging)
    copy = asyncio.create_task(receiver.copy_in(r))
    ticks = 0
    while ticks < 5:  # the loop keeps running while the copy waits in its thread
        await asyncio.sleep(0.01)
        ticks += 1
    assert not copy.done() and staging.num_free == 1
    staging.go.set()
    await asyncio.wait_for(copy, 10)
    assert staging.copied == [([0, 1, 2], [6, 7, 2])] and staging.num_free == 4
    assert staging.kv_cache[:, :, [6, 7, 2], 0, 0, 0].flatten(0, 1).tolist() == [[1, 2, 3]] * 4
    assert r.slots == []


async def test_a_cancelled_claim_frees_the_slots_only_when_the_copy_ends() -> None:
    staging = SlowStaging()
    receiver = KVReceiver(engine=None, layout=None, reserve_timeout_s=5, staging=staging)  # type: ignore[arg-type]
    copy = asyncio.create_task(receiver.copy_in(staged_reservation(staging)))
    await asyncio.sleep(0.05)
    copy.cancel()
    with pytest.raises(asyncio.CancelledError):
        await copy
    # The thread still reads the slots: handing them out now would let a new transfer
    # overwrite what is being copied.
    assert staging.num_free == 1
    staging.go.set()
    await until(lambda: staging.num_free == 4, "slots back after the copy")
    assert staging.copied == [([0, 1, 2], [6, 7, 2])]


class SlowReserveEngine:
    """An engine double whose ``call`` runs the command only once the test lets it, as the
    real step thread runs a queued command even when its caller was cancelled meanwhile."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.reserved: dict[str, list[int]] = {}
        self.quarantined: list[int] = []
        self.released: list[int] = []

    async def prepare(self, params) -> None:
        return None

    def call(self, fn):
        async def run():
            await self.go.wait()
            return fn(self)

        return asyncio.shield(asyncio.ensure_future(run()))

    def reserve(self, rid, prompt, params, resume, images, lora=None):
        self.reserved[rid] = [1, 2, 3]
        return [1, 2, 3], 0

    def free_reserved(self, rid, quarantine=False):
        blocks = self.reserved.pop(rid)
        if quarantine:
            self.quarantined += blocks
        return blocks

    def release_quarantined(self, blocks):
        self.released += blocks


async def test_a_reserve_whose_caller_is_cancelled_is_released_not_leaked() -> None:
    """The router gave up on the request while its Reserve was queued on the step thread:
    the engine reserves anyway, and the receiver must free what it reserved. Before, the
    reservation was never recorded, and its blocks were held forever (2-5 blocks per run of
    the cancellation storm test)."""
    engine = SlowReserveEngine()
    receiver = KVReceiver(engine, layout=None, reserve_timeout_s=60, write_grace_s=0.01)  # type: ignore[arg-type]
    call = asyncio.create_task(receiver.reserve("r", [1, 2, 3, 4], SamplingParams()))
    await asyncio.sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    engine.go.set()
    await until(lambda: engine.quarantined == [1, 2, 3], "the orphan reservation freed")
    assert "r" not in receiver.reservations and not engine.reserved
    await until(lambda: receiver.quarantine, "its blocks quarantined")
    await asyncio.sleep(0.05)
    await receiver.release_quarantined(float("inf"))
    assert engine.released == [1, 2, 3]


async def test_a_release_whose_caller_is_cancelled_still_quarantines_the_blocks() -> None:
    engine = SlowReserveEngine()
    engine.go.set()
    receiver = KVReceiver(engine, layout=None, reserve_timeout_s=60, write_grace_s=0.01)  # type: ignore[arg-type]
    await receiver.reserve("r", [1, 2, 3, 4], SamplingParams())
    engine.go.clear()
    release = asyncio.create_task(receiver.release("r"))
    await asyncio.sleep(0.05)
    release.cancel()
    with pytest.raises(asyncio.CancelledError):
        await release
    engine.go.set()
    await until(lambda: receiver.quarantine, "the blocks reach the quarantine")
    await receiver.release_quarantined(float("inf"))
    assert engine.released == [1, 2, 3]


async def test_a_constrained_request_s_window_leaves_room_for_the_writer_s_grammar_build() -> None:
    """The prefill worker compiles a constrained request's grammar inside the reservation's
    window (a cold worker's first one: 21.6 s at load 14), so such a reservation lasts
    GRAMMAR_BUILD_ALLOWANCE_S longer; a plain one keeps reserve_timeout_s."""
    engine = SlowReserveEngine()
    engine.go.set()
    receiver = KVReceiver(engine, layout=None, reserve_timeout_s=2)  # type: ignore[arg-type]
    t0, u0 = time.monotonic(), time.time()
    plain = await receiver.reserve("plain", [1, 2, 3], SamplingParams())
    schema = StructuredOutputsParams(json='{"type": "object"}')
    constrained = await receiver.reserve(
        "json", [1, 2, 3], SamplingParams(structured_outputs=schema)
    )
    assert t0 + 2 <= plain.deadline < t0 + 3
    assert (
        t0 + 2 + GRAMMAR_BUILD_ALLOWANCE_S
        <= constrained.deadline
        < t0 + 3 + GRAMMAR_BUILD_ALLOWANCE_S
    )
    assert constrained.deadline_unix - u0 >= 2 + GRAMMAR_BUILD_ALLOWANCE_S
