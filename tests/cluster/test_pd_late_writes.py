"""A prefill worker stopped in the middle of a KV push must not write into blocks the decode
worker gave to another request: while it is stopped its expired reservation's blocks stay
quarantined (another request is refused), and once it continues and fences its push they go
to another request, whose output equals its reference.

The workers run an EAGLE-3 head (issue 20): the head's states go with the KV into a region of
the reservation, which the decode worker's arena has room for once (STATES_BYTES). That region
is quarantined with the blocks, and the next request's states land in the same memory: its
drafts and acceptance (the counters) equal a clean run's, its tokens the non-speculative
reference. The same after a kill -9 of the prefill worker mid-push (last in the module).

NOTE: greedy tokens cannot show stale states (every draft is verified by the target); the
speculation counters do (the random head's drafts follow its states), and the region's
address shows the memory changed owner."""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import grpc
import httpx
import pytest
import torch
from cluster_helpers import start_cluster, wait_for
from test_pd_eagle3 import eagle3_spec, spec_counters

from services.common.convert import params_to_proto
from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc
from services.engine import LLM, SamplingParams
from tests.deps import MOONCAKE, require

require("mooncake.engine", MOONCAKE)
pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

# Tokens per engine step: the push of a prompt takes ~100 steps, and a decoding sequence
# has room for 2 drafts beside its own token (with 2, the EAGLE-3 head never drafted).
BUDGET = 4
PROMPT_LEN = 400
BLOCK = 16  # the engine's default block size
# KV per token: the tiny model's 512 bytes (2 layers, 2 heads of 16, fp32) and the EAGLE-3
# head's 256 (1 layer), which shares the budget.
BLOCK_BYTES = BLOCK * (512 + 256)
# The decode cache holds one prompt and a spare block: a second prompt can only get its
# blocks from the first one's freed reservation.
NUM_BLOCKS = -(-(PROMPT_LEN + 1) // BLOCK) + 1
# The second prompt is short, and its output long enough, that the decode worker's head runs
# its pushed states (BUDGET rows a step) and then drafts: its drafts follow its states.
# Its blocks are more than the first prompt leaves free: most must be the first one's.
PROMPT_B_LEN = 100
# The EAGLE-3 head's states of one prompt (a row of 64 float32 a position), and a few rows:
# a second prompt's region can only be the first one's.
STATES_BYTES = (PROMPT_LEN + 8) * 64 * 4
RESERVE_TIMEOUT_S = 3.0
GRACE_S = 1.0
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
GREEDY_B = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    model = tiny_model_dir("llama")
    c = start_cluster(
        model, workers=0, prefill=2, decode=1,
        engine_overrides={
            "max_num_batched_tokens": BUDGET, "kv_cache_bytes": NUM_BLOCKS * BLOCK_BYTES,
            "speculative_config": eagle3_spec(model, tmp_path_factory),
            # Each run of a prompt from its first token: a clean run and a later one alike.
            "enable_prefix_caching": False,
        },
        worker_overrides={"reserve_timeout_s": RESERVE_TIMEOUT_S, "kv_write_grace_s": GRACE_S,
                          "draft_states_bytes": STATES_BYTES},
    )  # fmt: skip
    yield c
    c.stop()


@pytest.fixture(scope="module")
def prompts(tiny_model_dir) -> tuple[list[int], list[int], list[int]]:
    """(prompt A, prompt B, B's greedy tokens from a co-located engine without speculation,
    chunked the same way)."""
    g = torch.Generator().manual_seed(15)
    prompt_a, prompt_b = (
        torch.randint(10, 49000, (n,), generator=g).tolist() for n in (PROMPT_LEN, PROMPT_B_LEN)
    )
    llm = LLM(str(tiny_model_dir("llama")), max_num_batched_tokens=BUDGET, max_model_len=512)
    expected = list(llm.generate([prompt_b], GREEDY_B)[0].outputs[0].token_ids)
    del llm
    return prompt_a, prompt_b, expected


def load_stream(address: str, stop: threading.Event, on_report) -> threading.Thread:
    """Call ``on_report`` with each of the worker's load reports (every 20 ms) until ``stop``."""

    def run() -> None:
        with grpc.insecure_channel(address) as ch:
            call = pb_grpc.WorkerServiceStub(ch).StreamLoad(
                pb.LoadReportRequest(interval_ms=20), timeout=120
            )
            with contextlib.suppress(grpc.RpcError):  # cancelled, or the worker was killed
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


def states_free(worker) -> float:
    """The worker's free draft-states bytes (its /metrics)."""
    text = httpx.get(f"http://127.0.0.1:{worker.ready_field('metrics_port')}/metrics").text
    for line in text.splitlines():
        if line.startswith("epdserve:spec_decode_draft_states_free_bytes"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no draft-states gauge")


class Roles:
    """The decode worker and the two prefill workers, with a stub for each."""

    def __init__(self, cluster) -> None:
        by_role: dict[str, list] = {}
        for w in cluster.workers:
            by_role.setdefault(w.ready_field("role"), []).append(w)
        (self.decode,), (self.p1, self.p2) = by_role["decode"], by_role["prefill"]
        self.channels = [grpc.insecure_channel(w.ready_field("address"))
                         for w in (self.decode, self.p1, self.p2)]  # fmt: skip
        self.d, self.s1, self.s2 = (pb_grpc.WorkerServiceStub(ch) for ch in self.channels)

    def close(self) -> None:
        for ch in self.channels:
            ch.close()

    def at_rest(self) -> None:
        """Every block and the whole draft-states arena of the decode worker free again."""
        wait_for(lambda: free_blocks(self.d)[0] == NUM_BLOCKS, 60, "the blocks freed", 0.2)
        wait_for(lambda: states_free(self.decode) == STATES_BYTES, 30, "states freed", 0.2)

    def run_b(self, rid: str, prompt: list[int]) -> tuple[pb.ReserveResponse, list[int], dict]:
        """Reserve ``prompt`` on the decode worker, prefill it on p2 (KV and the head's states
        pushed), decode it: (the reservation, the tokens, the decode worker's speculation
        counters' growth)."""
        before = spec_counters(None, [self.decode])
        params = params_to_proto(GREEDY_B)
        res = reserve(self.d, rid, prompt, params, self.p2)
        first = self.s2.Prefill(
            pb.PrefillRequest(request_id=rid, prompt_token_ids=prompt, params=params,
                              target=res), timeout=120,
        )  # fmt: skip
        states = first.draft_states if first.HasField("draft_states") else None
        tokens: list[int] = []
        for resp in self.d.Decode(
            pb.DecodeRequest(request_id=rid, first_token_id=first.first_token_id,
                             draft_states=states), timeout=120,
        ):  # fmt: skip
            for delta in resp.outputs:
                tokens.extend(delta.token_ids)
        self.at_rest()
        after = spec_counters(None, [self.decode])
        return res, tokens, {k: after[k] - before[k] for k in after}


@pytest.fixture(scope="module")
def clean_b(cluster, prompts) -> dict[str, float]:
    """B once on the idle cluster: its counters' growth, which a later B's must equal."""
    roles = Roles(cluster)
    try:
        roles.at_rest()
        res, tokens, grew = roles.run_b("b-clean", prompts[1])
    finally:
        roles.close()
    assert tokens == prompts[2]
    assert res.HasField("draft_target") and res.draft_target.capacity == PROMPT_B_LEN * 64 * 4
    assert (grew["push"], grew["grpc"]) == (1, 0), grew  # the states came with the KV
    assert grew["num_drafts"] > 0, grew
    return grew


def prefill_running(roles: Roles, rid: str, res: pb.ReserveResponse, prompt: list[int]):
    """Start prefilling A on p1 (in a thread) and return once p1's engine runs it: the push is
    under way, chunk by chunk, layer by layer (a write may be in flight in Mooncake's
    transport), or once it answered (a loaded machine can starve the load reports). (the
    thread, its outcome: "response" or "error", the event that ends the load stream)."""
    outcome: dict[str, object] = {}

    def prefill_a() -> None:
        try:
            outcome["response"] = roles.s1.Prefill(
                pb.PrefillRequest(request_id=rid, prompt_token_ids=prompt,
                                  params=params_to_proto(GREEDY), target=res), timeout=120,
            )  # fmt: skip
        except grpc.RpcError as e:
            outcome["error"] = e

    running, done_watching = threading.Event(), threading.Event()
    load_stream(
        roles.p1.ready_field("address"), done_watching,
        lambda r: running.set() if r.num_running else None,
    )  # fmt: skip
    thread = threading.Thread(target=prefill_a, daemon=True)
    thread.start()
    wait_for(lambda: running.is_set() or outcome, 60, "p1 running the prefill", 0.02)
    return thread, outcome, done_watching


def b_takes_a_memory(roles, rid: str, res_a, prompts, clean) -> None:
    """B gets most of A's blocks and A's states region, and runs as on the idle cluster."""
    res_b, tokens, grew = roles.run_b(rid, prompts[1])
    reused = set(res_b.block_ids) & set(res_a.block_ids)
    assert len(reused) >= len(res_b.block_ids) // 2, "B must get most of A's blocks"
    assert res_b.draft_target.addr == res_a.draft_target.addr, "B must get A's states region"
    assert tokens == prompts[2], "B's KV was overwritten"
    assert grew == clean, "B's drafts differ from a clean run's: its states were overwritten"


def test_stopped_prefill_cannot_write_into_reused_blocks(cluster, prompts, clean_b) -> None:
    prompt_a, prompt_b, _ = prompts
    roles = Roles(cluster)
    params = params_to_proto(GREEDY)
    assert free_blocks(roles.d) == (NUM_BLOCKS, NUM_BLOCKS)
    stopped = False
    try:
        res_a = reserve(roles.d, "a", prompt_a, params, roles.p1)
        assert res_a.deadline_unix_ms > 0 and 0 < res_a.deadline_ms <= RESERVE_TIMEOUT_S * 1000
        assert res_a.draft_target.capacity == PROMPT_LEN * 64 * 4

        thread_a, outcome, watching = prefill_running(roles, "a", res_a, prompt_a)
        roles.p1.signal(signal.SIGSTOP)
        stopped = True
        watching.set()
        assert not outcome, f"A's push ended too soon: {outcome}"

        # The reservation expires, and its blocks and states region stay out of reach while
        # p1 may still write into them: another request cannot get them.
        wait_for(
            lambda: "a" not in roles.d.ListRequests(pb.ListRequestsRequest(), timeout=10).reserved_ids,
            60, "A's reservation expired", 0.2,
        )  # fmt: skip
        time.sleep(2 * GRACE_S)  # past any time-based grace
        assert free_blocks(roles.d)[0] < NUM_BLOCKS - 1
        assert states_free(roles.decode) == STATES_BYTES - res_a.draft_target.capacity
        with pytest.raises(grpc.RpcError) as refused:
            reserve(roles.d, "b0", prompt_b, params_to_proto(GREEDY_B), roles.p2)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value

        # p1 continues: what it had under way lands in the quarantine, it fences its push
        # when the decode worker asks, and only then are the blocks and the region free.
        roles.p1.signal(signal.SIGCONT)
        stopped = False
        roles.at_rest()
        thread_a.join(120)
        assert not thread_a.is_alive()
        error = outcome.get("error")
        assert isinstance(error, grpc.RpcError), "A's push must fail: its reservation is gone"
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert "KV transfer failed" in (error.details() or ""), error.details()

        b_takes_a_memory(roles, "b", res_a, prompts, clean_b)
    finally:
        if stopped:
            roles.p1.signal(signal.SIGCONT)
        roles.close()


def test_killed_prefill_leaves_its_memory_to_another_request(cluster, prompts, clean_b) -> None:
    """Last in the module (p1 stays dead): a prefill worker killed (-9) mid-push. The decode
    worker's fence is refused (the writer is gone), so A's blocks and region are freed once
    its reservation expires; B takes them and runs as on the idle cluster."""
    prompt_a = prompts[0]
    roles = Roles(cluster)
    try:
        roles.at_rest()
        # p1 let go of the first test's A (its push failed): its cache is whole again.
        wait_for(lambda: len(set(free_blocks(roles.s1))) == 1, 60, "p1's blocks freed", 0.2)
        res_a = reserve(roles.d, "a-killed", prompt_a, params_to_proto(GREEDY), roles.p1)
        thread_a, outcome, watching = prefill_running(roles, "a-killed", res_a, prompt_a)
        roles.p1.signal(signal.SIGKILL)
        watching.set()
        thread_a.join(120)
        assert not thread_a.is_alive()
        # Killed mid-push (the usual case), or its push ended just before (a loaded machine):
        # either way A's reservation is left unclaimed to a writer that is gone.
        error = outcome.get("error")
        assert isinstance(error, grpc.RpcError) or "response" in outcome, outcome
        if error is not None:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        else:
            print("p1 ended A's push before the kill", flush=True)
        roles.at_rest()
        b_takes_a_memory(roles, "b-after-kill", res_a, prompts, clean_b)
    finally:
        roles.close()
