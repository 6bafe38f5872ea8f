"""PD retries keep a healthy decode worker (a fresh reservation per attempt), and a decode
worker refusing a reservation for lack of room is backpressure, not an error."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from fake_handles import Stream, Unary, fake_handle, fake_pool, finished, rpc_error

from services.common.proto import worker_pb2 as pb
from services.router.errors import APIError
from services.router.routing.orchestrator import Orchestrator
from services.router.routing.policies.factory import create_policy
from services.router.routing.workers import WorkerHandle

FULL = grpc.StatusCode.RESOURCE_EXHAUSTED


class PrefillStub:
    """Prefill fails with the next of ``failures`` (shared by the prefill workers), then
    answers first token 5."""

    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures
        self.calls: list[str] = []

    def Prefill(self, req: pb.PrefillRequest, timeout: float) -> Unary:  # noqa: N802
        self.calls.append(req.request_id)

        async def answer() -> pb.PrefillResponse:
            if self.failures:
                raise self.failures.pop(0)
            return pb.PrefillResponse(first_token_id=5)

        return Unary(answer)


class DecodeStub:
    """Reserve refuses with ``full`` RESOURCE_EXHAUSTED answers first (None: always)."""

    def __init__(self, full: int | None = 0, delay: float = 0.0, reserve_s: float = 0.0) -> None:
        self.full = full
        self.delay = delay  # before Decode's first message
        self.reserve_s = reserve_s  # Reserve's answer takes this long (a grammar to compile)
        self.reserved: list[str] = []
        self.writer_sizes: list[int] = []  # the prefill worker's TP size of each Reserve
        self.refused = 0
        self.released: list[str] = []
        self.decoded: list[str] = []

    def Reserve(self, req: pb.ReserveRequest, timeout: float) -> Unary:  # noqa: N802
        self.writer_sizes.append(req.writer_tensor_parallel_size)

        async def answer() -> pb.ReserveResponse:
            await asyncio.sleep(self.reserve_s)
            if self.full is None or self.refused < self.full:
                self.refused += 1
                raise rpc_error(FULL, "decode worker full, retry later", "busy")
            self.reserved.append(req.request_id)
            return pb.ReserveResponse(block_ids=[0], role_epoch=1)

        return Unary(answer)

    def Release(self, req: pb.ReleaseRequest, timeout: float) -> Unary:  # noqa: N802
        self.released.append(req.request_id)

        async def answer() -> pb.ReleaseResponse:
            return pb.ReleaseResponse(found=True)

        return Unary(answer)

    def Decode(self, req: pb.DecodeRequest, timeout: float) -> Stream:  # noqa: N802
        self.decoded.append(req.request_id)
        return Stream([finished(req.first_token_id)], self.delay)


def run(
    prefill: PrefillStub,
    decodes: list[DecodeStub],
    prefills: int = 1,
    timeout_s: float = 30.0,
    stall_s: float = 5.0,
    decode_load: pb.LoadReport | None = None,
    tp_sizes: dict[str, int] | None = None,
) -> list[pb.GenerateResponse]:
    """One request through ``prefills`` prefill workers (sharing ``prefill``) and a decode
    worker per stub in ``decodes``; ``tp_sizes``: the workers' advertised TP sizes by id."""

    async def main() -> list[pb.GenerateResponse]:
        handles: list[WorkerHandle] = [
            *(fake_handle(f"p{i}", prefill, role="prefill") for i in range(prefills)),
            *(
                fake_handle(f"d{i}", d, role="decode", load=decode_load)
                for i, d in enumerate(decodes)
            ),
        ]
        for h in handles:
            if tp_sizes and h.id in tp_sizes:
                h.info.capacity["tensor_parallel_size"] = tp_sizes[h.id]
        orch = Orchestrator(
            fake_pool(handles), create_policy("round_robin"), timeout_s=timeout_s,
            max_attempts=3, stall_timeout_s=stall_s,
        )  # fmt: skip
        try:
            params = pb.SamplingParams(max_tokens=1)
            return [m async for m in orch.generate("m", "r1", [1, 2, 3], params)]
        finally:
            for h in handles:
                await h.channel.close()

    return asyncio.run(main())


FAILURES = {
    "transfer": lambda: rpc_error(
        grpc.StatusCode.UNAVAILABLE, "KV transfer failed: peer gone", "transfer"
    ),
    "prefill-died": lambda: rpc_error(grpc.StatusCode.UNAVAILABLE, "Socket closed"),
    # Its channel closed under the call (it left the cluster): WorkerLost.
    "prefill-left": asyncio.CancelledError,
}


@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_prefill_failure_is_retried_on_the_same_healthy_decode_worker(kind) -> None:
    failure = FAILURES[kind]()
    d, p = DecodeStub(), PrefillStub([failure])
    out = run(p, [d], prefills=2)
    assert [m.outputs[0].token_ids for m in out] == [[5]]
    # Two attempts on the one decode worker, each with its own reservation; the failed
    # attempt's reservation was released.
    assert d.reserved == ["r1", "r1-a1"]
    assert d.released == ["r1"]
    assert d.decoded == ["r1-a1"]
    assert p.calls == ["r1", "r1-a1"]


def test_a_pair_has_one_tensor_parallel_size() -> None:
    # Rank i of the prefill worker writes into rank i of the decode worker.
    other_size, same_size = DecodeStub(), DecodeStub()
    out = run(PrefillStub([]), [other_size, same_size], tp_sizes={"p0": 2, "d0": 1, "d1": 2})
    assert len(out) == 1
    assert other_size.reserved == [] and same_size.reserved == ["r1"]
    assert same_size.writer_sizes == [2]


def test_full_decode_worker_makes_the_request_wait() -> None:
    d = DecodeStub(full=4)
    out = run(PrefillStub([]), [d])
    assert [m.outputs[0].token_ids for m in out] == [[5]]
    assert d.refused == 4 and d.reserved == ["r1"]


def test_full_decode_worker_sends_the_request_to_one_with_room() -> None:
    full, roomy = DecodeStub(full=None), DecodeStub()
    out = run(PrefillStub([]), [full, roomy])
    assert len(out) == 1
    assert roomy.reserved == ["r1"] and full.reserved == []


def test_decode_worker_full_past_the_request_timeout_is_an_error() -> None:
    d = DecodeStub(full=None)
    started = time.monotonic()
    with pytest.raises(APIError) as err:
        run(PrefillStub([]), [d], timeout_s=1.0)
    assert err.value.status == 503 and "full" in err.value.message
    assert d.refused > 2  # it kept asking ...
    assert time.monotonic() - started < 10.0  # ... within the request's timeout


def test_busy_decode_worker_keeps_the_request_past_the_stall_timeout() -> None:
    # Its batch is full (requests waiting): the first message may come after the stall timeout.
    d = DecodeStub(delay=1.0)
    busy = pb.LoadReport(num_waiting=3, num_running=16)
    out = run(PrefillStub([]), [d], stall_s=0.3, decode_load=busy)
    assert len(out) == 1 and d.decoded == ["r1"] and d.released == []


def test_prefill_workers_past_the_call_deadline_are_slow_not_dead() -> None:
    """A Prefill call that ends at its deadline (the reservation's, the worker's own error not
    in by then: a long prompt, a deep queue) on both prefill workers is a 504, not a poison
    request: a worker that hangs is caught by its load stream (watch.py), one past a call's
    deadline is only slow. Both counted as deaths, and the prompt (and a client's retry of
    it, for ttl_s) was refused as poison_request."""
    late = lambda: rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")  # noqa: E731
    with pytest.raises(APIError) as err:
        run(PrefillStub([late(), late()]), [DecodeStub()], prefills=2)
    assert (err.value.status, err.value.code) == (504, None), err.value.message


class FailingDecodeStub(DecodeStub):
    """Decode fails before its first message, as a worker that died then does."""

    def Decode(self, req: pb.DecodeRequest, timeout: float) -> Stream:  # noqa: N802
        self.decoded.append(req.request_id)
        error = rpc_error(grpc.StatusCode.UNAVAILABLE, "Socket closed")

        class Failing(Stream):
            async def __anext__(self) -> pb.GenerateResponse:
                raise error

        return Failing([])


def test_decode_failing_before_its_first_message_releases_and_retries_elsewhere() -> None:
    bad, good = FailingDecodeStub(), DecodeStub()
    out = run(PrefillStub([]), [bad, good])
    assert [m.outputs[0].token_ids for m in out] == [[5]]
    assert bad.decoded == ["r1"] and bad.released == ["r1"]
    assert good.reserved == ["r1-a1"] and good.released == []


def test_reservation_is_released_when_the_client_leaves_during_prefill() -> None:
    class StuckPrefill(PrefillStub):
        def Prefill(self, req: pb.PrefillRequest, timeout: float) -> Unary:  # noqa: N802
            self.calls.append(req.request_id)
            return Unary(asyncio.Event().wait)

    async def main() -> None:
        d, p = DecodeStub(), StuckPrefill([])
        handles = [fake_handle("p0", p, role="prefill"), fake_handle("d0", d, role="decode")]
        orch = Orchestrator(
            fake_pool(handles), create_policy("round_robin"), timeout_s=30.0, max_attempts=3
        )
        params = pb.SamplingParams(max_tokens=1)
        task = asyncio.create_task(anext(orch.generate("m", "r1", [1, 2, 3], params)))
        while not p.calls:
            await asyncio.sleep(0.01)
        task.cancel()  # the client went away while the prefill worker computes
        with pytest.raises(asyncio.CancelledError):
            await task
        assert d.reserved == ["r1"] and d.released == ["r1"]
        assert [h.inflight for h in handles] == [0, 0]
        for h in handles:
            await h.channel.close()

    asyncio.run(main())


def test_a_slow_reservation_is_waited_for_like_a_first_message(monkeypatch) -> None:
    """Reserve compiles the request's grammar (the first builds llguidance's tokenizer: 13.5 s
    at load 16); it was held to the 10 s of a control call and the request got 504 on a fresh
    PD cluster (test_structured_outputs). Now it gets the stall timeout, like a mixed
    worker's first message. Scaled down: control calls 0.2 s, Reserve 0.6 s, stall 5 s."""
    from services.router.routing.pd import PDSteps

    monkeypatch.setattr(PDSteps, "CONTROL_TIMEOUT_S", 0.2)
    d = DecodeStub(reserve_s=0.6)
    out = run(PrefillStub([]), [d], stall_s=5.0)
    assert [m.outputs[0].token_ids for m in out] == [[5]]
    assert d.reserved == ["r1"] and d.released == []
