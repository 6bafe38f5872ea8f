"""A prefill worker stopped in the middle of a KV push must not write into blocks the decode
worker gave to another request: while it is stopped its expired reservation's blocks stay
quarantined (another request is refused), and once it continues and fences its push they go
to another request, whose output equals its reference."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
import torch
from cluster_helpers import start_cluster, wait_for

from services.common.convert import params_to_proto
from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc
from services.engine import LLM, SamplingParams
from tests.deps import MOONCAKE, require

require("mooncake.engine", MOONCAKE)
pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

BUDGET = 2  # tokens per engine step: the push of a prompt takes ~200 steps
PROMPT_LEN = 400
BLOCK = 16  # the engine's default block size
BLOCK_BYTES = BLOCK * 512  # the tiny model's KV per token (2 layers, 2 heads of 16, fp32)
# The decode cache holds one prompt and a spare block: a second prompt can only get its
# blocks from the first one's freed reservation.
NUM_BLOCKS = -(-(PROMPT_LEN + 1) // BLOCK) + 1
RESERVE_TIMEOUT_S = 3.0
GRACE_S = 1.0
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    c = start_cluster(
        tiny_model_dir("llama"), workers=0, prefill=2, decode=1,
        engine_overrides={
            "max_num_batched_tokens": BUDGET, "kv_cache_bytes": NUM_BLOCKS * BLOCK_BYTES,
        },
        worker_overrides={"reserve_timeout_s": RESERVE_TIMEOUT_S, "kv_write_grace_s": GRACE_S},
    )  # fmt: skip
    yield c
    c.stop()


def load_stream(address: str, stop: threading.Event, on_report) -> threading.Thread:
    """Call ``on_report`` with each of the worker's load reports (every 20 ms) until ``stop``."""

    def run() -> None:
        with grpc.insecure_channel(address) as ch:
            call = pb_grpc.WorkerServiceStub(ch).StreamLoad(
                pb.LoadReportRequest(interval_ms=20), timeout=120
            )
            for report in call:
                on_report(report)
                if stop.is_set():
                    call.cancel()
                    return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def reserve(stub, rid: str, prompt: list[int], params, writer) -> pb.ReserveResponse:
    """Reserve ``prompt``'s blocks on the decode worker for a push by ``writer`` (the router
    names the prefill worker in the request)."""
    return stub.Reserve(
        pb.ReserveRequest(request_id=rid, prompt_token_ids=prompt, params=params,
                          writer_address=writer.ready_field("address")), timeout=30,
    )  # fmt: skip


def free_blocks(stub: pb_grpc.WorkerServiceStub) -> tuple[int, int]:
    call = stub.StreamLoad(pb.LoadReportRequest(interval_ms=50), timeout=10)
    report = next(iter(call))
    call.cancel()
    return report.num_free_blocks, report.num_total_blocks


def test_stopped_prefill_cannot_write_into_reused_blocks(cluster, tiny_model_dir) -> None:
    g = torch.Generator().manual_seed(15)
    prompt_a, prompt_b = (
        torch.randint(10, 49000, (PROMPT_LEN,), generator=g).tolist() for _ in "ab"
    )
    # The reference: the same engine, co-located, chunked the same way.
    llm = LLM(str(tiny_model_dir("llama")), max_num_batched_tokens=BUDGET, max_model_len=512)
    expected = list(llm.generate([prompt_b], GREEDY)[0].outputs[0].token_ids)
    del llm

    by_role: dict[str, list] = {}
    for w in cluster.workers:
        by_role.setdefault(w.ready_field("role"), []).append(w)
    (decode,), (p1, p2) = by_role["decode"], by_role["prefill"]
    channels = [grpc.insecure_channel(w.ready_field("address")) for w in (decode, p1, p2)]
    d_stub, p1_stub, p2_stub = (pb_grpc.WorkerServiceStub(ch) for ch in channels)
    params = params_to_proto(GREEDY)
    assert free_blocks(d_stub) == (NUM_BLOCKS, NUM_BLOCKS)
    stopped = False
    try:
        res_a = reserve(d_stub, "a", prompt_a, params, p1)
        assert res_a.deadline_unix_ms > 0 and 0 < res_a.deadline_ms <= RESERVE_TIMEOUT_S * 1000

        # Prefill A on p1 and stop p1 once its engine runs A: the push is under way, chunk
        # by chunk, layer by layer (a write may be in flight in Mooncake's transport).
        outcome: dict[str, object] = {}

        def prefill_a() -> None:
            try:
                outcome["response"] = p1_stub.Prefill(
                    pb.PrefillRequest(request_id="a", prompt_token_ids=prompt_a, params=params,
                                      target=res_a), timeout=120,
                )  # fmt: skip
            except grpc.RpcError as e:
                outcome["error"] = e

        running = threading.Event()
        done_watching = threading.Event()
        load_stream(
            p1.ready_field("address"), done_watching,
            lambda r: running.set() if r.num_running else None,
        )  # fmt: skip
        thread_a = threading.Thread(target=prefill_a, daemon=True)
        thread_a.start()
        assert running.wait(60), "p1 never ran the prefill"
        p1.signal(signal.SIGSTOP)
        stopped = True
        done_watching.set()
        assert "response" not in outcome and "error" not in outcome, "A's push ended too soon"

        # The reservation expires, and its blocks stay out of reach while p1 may still write
        # into them: another request cannot get them.
        wait_for(
            lambda: "a" not in d_stub.ListRequests(pb.ListRequestsRequest(), timeout=10).reserved_ids,
            60, "A's reservation expired", 0.2,
        )  # fmt: skip
        time.sleep(2 * GRACE_S)  # past any time-based grace
        assert free_blocks(d_stub)[0] < NUM_BLOCKS - 1
        with pytest.raises(grpc.RpcError) as refused:
            reserve(d_stub, "b0", prompt_b, params, p2)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value

        # p1 continues: what it had under way lands in the quarantined blocks, it fences its
        # push when the decode worker asks, and only then are the blocks free.
        p1.signal(signal.SIGCONT)
        stopped = False
        wait_for(lambda: free_blocks(d_stub)[0] == NUM_BLOCKS, 60, "A's blocks freed", 0.2)
        thread_a.join(120)
        assert not thread_a.is_alive()
        error = outcome.get("error")
        assert isinstance(error, grpc.RpcError), "A's push must fail: its reservation is gone"
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert "KV transfer failed" in (error.details() or ""), error.details()

        # Another request gets A's blocks, and its output is its reference.
        res_b = reserve(d_stub, "b", prompt_b, params, p2)
        reused = set(res_b.block_ids) & set(res_a.block_ids)
        assert len(reused) >= len(res_b.block_ids) // 2, "B must get most of A's blocks"
        first_b = p2_stub.Prefill(
            pb.PrefillRequest(request_id="b", prompt_token_ids=prompt_b, params=params,
                              target=res_b), timeout=120,
        ).first_token_id  # fmt: skip
        tokens: list[int] = []
        for resp in d_stub.Decode(
            pb.DecodeRequest(request_id="b", first_token_id=first_b), timeout=120
        ):
            for delta in resp.outputs:
                tokens.extend(delta.token_ids)
        assert tokens == expected, "B's KV was overwritten"
        wait_for(lambda: free_blocks(d_stub)[0] == NUM_BLOCKS, 30, "B's blocks freed", 0.2)
    finally:
        if stopped:
            p1.signal(signal.SIGCONT)
        for ch in channels:
            ch.close()
