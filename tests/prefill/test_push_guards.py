"""What a KV push refuses to do: write from memory that is not registered, follow a reservation
that does not fit the caches, or write anything once the reservation's deadline is past (also
when the process was stopped with writes queued)."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from services.common.mooncake_agent import TransferError
from services.common.proto import worker_pb2 as pb
from services.engine.kv_layout import KVLayout
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler_output import ScheduledSeq
from services.engine.sequence import Sequence
from services.engine.speculative.handoff import DraftStates
from services.engine.speculative.states_push import StatesArena
from services.prefill.kv_sender import KVSender, PushTarget
from services.prefill.role import write_deadline
from tests.deps import MOONCAKE, require

BLOCK = 4
SLAB = 64


def layout(base: int = 1 << 20, **kw) -> KVLayout:
    fields = dict(num_layers=2, num_blocks=8, slab_bytes=SLAB, fingerprint="f")
    return KVLayout(base_addr=base, **{**fields, **kw})  # type: ignore[arg-type]


class FakeAgent:
    """Records writes; ``hold`` makes the next write wait (a process stopped mid-push)."""

    def quiesced(self) -> bool:
        return True

    def __init__(self) -> None:
        self.writes: list[list[int]] = []
        self.hold: threading.Event | None = None
        self.entered = threading.Event()

    def check_local(self, addrs: list[int], lens: list[int]) -> None:
        pass

    def write(self, session, srcs, dsts, lens, deadline=None) -> None:
        self.entered.set()
        if self.hold is not None:
            assert self.hold.wait(10)
            self.hold = None
        self.writes.append(dsts)


@pytest.fixture
def sender():
    s = KVSender(FakeAgent(), layout(), BLOCK, min_write_bytes=1)  # type: ignore[arg-type]
    yield s
    s.close()


def target(**kw) -> PushTarget:
    fields = dict(
        session="127.0.0.1:9", layout=layout(1 << 30), dst_blocks=[3, 4, 5], skip_blocks=0,
        num_tokens=12,
    )  # fmt: skip
    return PushTarget(**{**fields, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"dst_blocks": [3, -1, 5]}, "outside the cache"),
        ({"dst_blocks": [3, 4, 8]}, "outside the cache"),
        ({"dst_blocks": [3, 4, 1 << 33]}, "outside the cache"),
        ({"dst_blocks": [3, 4]}, "reserved for a prompt of 3 blocks"),
        ({"skip_blocks": 4}, "reserved for a prompt"),
        ({"skip_blocks": -1}, "reserved for a prompt"),
        ({"layout": layout(1 << 30, fingerprint="g")}, "incompatible"),
        ({"layout": layout(1 << 30, num_layers=3)}, "does not match"),
        ({"layout": layout(1 << 30, slab_bytes=SLAB // 2)}, "does not match"),
    ],
)
def test_a_bad_reservation_is_refused_before_any_write(sender, bad, match) -> None:
    with pytest.raises(TransferError, match=match):
        sender.add("r", target(**bad))
    assert "r" not in sender.targets and sender.agent.writes == []


def scheduled(num_new: int, computed: int = 0) -> ScheduledSeq:
    seq = Sequence("r", list(range(100, 112)), SamplingParams(max_tokens=1))
    seq.block_table = [0, 1, 2]
    seq.num_computed_tokens = computed
    return ScheduledSeq(seq, num_new)


def test_nothing_is_written_past_the_deadline_even_if_queued_before(sender) -> None:
    agent: FakeAgent = sender.agent
    agent.hold = threading.Event()
    sender.add("r", target(deadline=time.monotonic() + 0.3))
    sender.on_layer_done(0, [scheduled(8)])  # written: the sender then "stops" in the write
    assert agent.entered.wait(5)
    sender.on_layer_done(1, [scheduled(8)])  # queued behind it, before the deadline
    time.sleep(0.4)
    agent.hold.set()  # the process resumes past the deadline
    for _ in range(100):
        if agent.writes:
            break
        time.sleep(0.01)
    time.sleep(0.2)  # time enough for the queued write, were it to be made
    with pytest.raises(TransferError, match="deadline"):
        sender.wait("r", timeout=5)
    assert len(agent.writes) == 1
    # Later chunks of the same request are not even queued.
    sender.on_layer_done(0, [scheduled(4, computed=8)])
    time.sleep(0.1)
    assert len(agent.writes) == 1


def test_a_push_before_its_deadline_writes_everything(sender) -> None:
    sender.add("r", target(deadline=time.monotonic() + 30))
    for layer in range(2):
        sender.on_layer_done(layer, [scheduled(12)])
    assert sender.wait("r", timeout=5).error is None
    assert len(sender.agent.writes) == 2


def test_the_wait_ends_at_the_deadline(sender) -> None:
    agent: FakeAgent = sender.agent
    agent.hold = threading.Event()
    sender.add("r", target(deadline=time.monotonic() + 0.2))
    sender.on_layer_done(0, [scheduled(12)])
    start = time.monotonic()
    with pytest.raises(TransferError, match="deadline"):
        sender.wait("r", timeout=30)
    assert time.monotonic() - start < 10
    agent.hold.set()


def test_a_fence_stops_the_push_and_returns_once_its_writes_landed(sender) -> None:
    agent: FakeAgent = sender.agent
    agent.hold = threading.Event()
    sender.add("r", target(deadline=time.monotonic() + 30))
    sender.on_layer_done(0, [scheduled(8)])
    assert agent.entered.wait(5)  # a write is under way (or the process stopped in it)
    sender.on_layer_done(1, [scheduled(8)])  # queued behind it
    assert not sender.fence("r", timeout=0.2)  # not yet: that write may still land
    agent.hold.set()
    assert sender.fence("r", timeout=5)
    assert len(agent.writes) == 1  # the queued one was dropped
    sender.on_layer_done(0, [scheduled(4, computed=8)])
    with pytest.raises(TransferError, match="fenced"):
        sender.wait("r", timeout=5)
    assert len(agent.writes) == 1 and sender._pushes == {}


def test_a_fenced_request_is_refused_when_its_push_comes_later(sender) -> None:
    # The decode worker released the reservation while the Prefill was still on its way.
    assert sender.fence("late", timeout=1, until_unix=time.time() + 30)
    with pytest.raises(TransferError, match="fenced"):
        sender.add("late", target())
    assert sender.agent.writes == []
    # Past the released reservation's deadline a push under the same id is a new one (its
    # own deadline guards it): a retry or a migration may reuse the id.
    assert sender.fence("again", timeout=1, until_unix=time.time() - 1)
    sender.add("again", target())
    sender.discard("again")


def test_a_second_push_into_a_delivered_reservation_is_refused(sender) -> None:
    """A Prefill sent twice for one reservation: after the first push, the decode worker
    writes its own tokens into the last prompt block, and a second push overwrote them (a
    real PD pair decoded differently from token 13 on; the old sender took the push)."""
    sender.add("r", target(deadline=time.monotonic() + 30))
    for layer in range(2):
        sender.on_layer_done(layer, [scheduled(12)])
    sender.wait("r", timeout=5)
    with pytest.raises(TransferError, match="already delivered"):
        sender.add("r", target(deadline=time.monotonic() + 30))
    assert len(sender.agent.writes) == 2
    # Past that reservation's deadline, the id is free again (a new reservation's push).
    sender.add("old", target(deadline=time.monotonic() + 0.05))
    sender.wait("old", timeout=5)
    time.sleep(0.1)
    sender.add("old", target(deadline=time.monotonic() + 30))
    sender.discard("old")


def test_the_prefill_deadline_is_the_earlier_of_wall_clock_and_relative() -> None:
    now = time.monotonic()
    rel = write_deadline(pb.ReserveResponse(deadline_ms=5000))
    assert now + 4.9 < rel < time.monotonic() + 5.1
    # The request waited 4 s on its way (a stopped process): 1 s is left, not 5.
    late = pb.ReserveResponse(deadline_ms=5000, deadline_unix_ms=int((time.time() + 1) * 1000))
    assert write_deadline(late) < time.monotonic() + 1.1
    # A wall clock behind the decode worker's cannot stretch the relative deadline.
    skewed = pb.ReserveResponse(deadline_ms=5000, deadline_unix_ms=int((time.time() + 60) * 1000))
    assert write_deadline(skewed) < time.monotonic() + 5.1
    assert write_deadline(pb.ReserveResponse()) == math.inf


@pytest.fixture
def agent():
    require("mooncake.engine", MOONCAKE)
    from services.common.mooncake_agent import MooncakeAgent, MooncakeConfig

    return MooncakeAgent(MooncakeConfig())


def test_the_agent_writes_only_from_registered_memory(agent) -> None:
    buf = torch.zeros(1024, dtype=torch.uint8)
    base = int(buf.data_ptr())
    agent.register(base, 512)
    with pytest.raises(TransferError, match="outside the registered memory"):
        agent.write("127.0.0.1:9", [base + 256], [1 << 30], [512])  # runs past the region
    with pytest.raises(TransferError, match="outside the registered memory"):
        agent.read("127.0.0.1:9", [base + 600], [1 << 30], [8])
    agent.unregister(base)
    with pytest.raises(TransferError, match="outside the registered memory"):
        agent.write("127.0.0.1:9", [base], [1 << 30], [8])


def test_the_agent_submits_nothing_past_the_deadline(agent) -> None:
    buf = torch.zeros(1024, dtype=torch.uint8)
    agent.register(int(buf.data_ptr()), 1024)
    with pytest.raises(TransferError, match="deadline after 0 of 2 ranges"):
        agent.write(
            "127.0.0.1:9", [int(buf.data_ptr())] * 2, [1 << 30] * 2, [8, 8],
            deadline=time.monotonic() - 1,
        )  # fmt: skip
    assert agent.bytes_sent == 0


def test_a_source_cache_larger_than_its_registered_region_is_refused(agent) -> None:
    cache = torch.zeros(2, 2, 8, SLAB // 4, dtype=torch.float32)
    lay = layout(int(cache.data_ptr()))
    agent.register(lay.base_addr, lay.total_bytes - SLAB)
    with pytest.raises(TransferError, match="outside the registered memory"):
        KVSender(agent, lay, BLOCK)


def test_draft_states_go_with_the_push_its_fence_and_its_wait(sender) -> None:
    """An EAGLE-3 head's states are written on the request's push (states_push.py): a fence
    waits for that write as for the KV's (a write made beside the push would be fenced at
    once and could land in a region the decode worker handed to another request), and the
    region they are written from goes back once the push is over."""
    agent: FakeAgent = sender.agent
    arena = StatesArena(4, torch.float32, nbytes=1024)
    sender.add("r", target(deadline=time.monotonic() + 30))
    for layer in range(2):
        sender.on_layer_done(layer, [scheduled(12)])
    for _ in range(500):
        if len(agent.writes) == 2:
            break
        time.sleep(0.01)
    assert len(agent.writes) == 2
    agent.hold, agent.entered = threading.Event(), threading.Event()
    assert sender.push_states("r", arena, 1 << 40, DraftStates(5, [1, 2, 3], torch.ones(3, 4)))
    assert agent.entered.wait(5)  # the states' write is under way (or the process stopped in it)
    assert arena.free_bytes == 1024 - 48
    assert not sender.fence("r", timeout=0.2)  # not yet: that write may still land
    agent.hold.set()
    assert sender.fence("r", timeout=5)
    assert agent.writes[-1] == [1 << 40]
    with pytest.raises(TransferError, match="fenced"):
        sender.wait("r", timeout=5)
    assert arena.free_bytes == 1024


def test_draft_states_are_not_pushed_without_room_to_push_from(sender) -> None:
    arena = StatesArena(4, torch.float32, nbytes=32)  # two rows
    sender.add("r", target(deadline=time.monotonic() + 30))
    assert not sender.push_states("r", arena, 1 << 40, DraftStates(0, [1, 2, 3], torch.ones(3, 4)))
    assert arena.free_bytes == 32
    assert sender.wait("r", timeout=5).error is None
