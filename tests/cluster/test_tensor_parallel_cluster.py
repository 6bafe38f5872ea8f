"""Two mixed workers, each driving two tensor-parallel ranks (gloo) of a mixture-of-experts
model with expert parallelism, speculating (n-gram: the driver proposes, both ranks verify):
greedy text equals a one-device engine without speculation; flipped to a prefill and a decode
worker, each rank pushing its own KV heads into the decode worker's rank (Mooncake), the text
equals the co-located workers', the decode worker verified drafts, and a reservation for a
prefill worker of another size is refused; `epdserve experts rebalance` re-places a worker's
experts under load without failing or changing a request, and saves the placement; a SIGSTOP
of one rank process under load takes its worker out of routing until SIGCONT, and a kill -9
of one takes its worker down, neither failing a request (the router retries or migrates them
to the other worker)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from cluster_helpers import (
    TINY_NAME,
    children,
    cli,
    load_report,
    set_roles,
    start_cluster,
    wait_for,
    workers,
)
from test_failover import Traffic

from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc
from services.common.sched_slice import ENV as SLICE_ENV
from services.engine import LLM, SamplingParams
from services.engine.eplb import load_placements, placements_from_json

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

PROMPTS = ["Hello", "The capital of France is", "1, 2, 3,"]
# Drafts from a 1-token match, fixed length: short outputs draft too.
NGRAM = (
    '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "adaptive": false}'
)
# A worker whose engine is stuck this long in one step (a stopped rank) stops its load reports.
ENGINE_STALL_S = 5.0
SLICE_US = 100  # EPDSERVE_SCHED_SLICE_US of this module's processes


@pytest.fixture(scope="module")
def placement_file(tmp_path_factory) -> Path:
    """The workers' --eplb-placement: absent at start-up (contiguous experts)."""
    return tmp_path_factory.mktemp("eplb") / "placement.json"


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, placement_file):
    with pytest.MonkeyPatch.context() as mp:
        # The event loops on a short slice (off by default), so that the test of the ranks'
        # slice below can fail: ranks spawned from a loop's executor must not inherit it.
        mp.setenv(SLICE_ENV, str(SLICE_US))
        c = start_cluster(
            tiny_model_dir("qwen2_moe"), workers=2, policy="round_robin",
            engine_overrides={"tensor_parallel_size": 2, "enable_expert_parallel": True,
                              "eplb_placement": str(placement_file), "speculative_config": NGRAM},
            worker_overrides={"engine_stall_s": ENGINE_STALL_S},
        )  # fmt: skip
    yield c
    c.stop()


def completion(c: httpx.Client, prompt: str, max_tokens: int = 12) -> tuple[int, str]:
    body = {"model": TINY_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    r = c.post("/v1/completions", json=body)
    return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text


def rank_processes(pid: int) -> list[int]:
    """The worker's rank processes (multiprocessing's resource tracker is a child too)."""
    out = []
    for child in children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            out.append(child)
    return out


def short_sliced_threads(pid: int) -> list[str]:
    """The threads of process ``pid`` on the event loops' short scheduler slice
    (services/common/sched_slice.py), as /proc/PID/task/TID/sched says (empty where the kernel
    has no per-task slice)."""
    short = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            lines = (task / "sched").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("se.slice") and int(line.split(":")[1]) == SLICE_US * 1000:
                short.append(task.name)
    return short


def test_tp2_workers_equal_one_device(cluster, tiny_model_dir) -> None:
    assert all(len(rank_processes(w.proc.pid)) == 1 for w in cluster.workers)
    # A rank computes its shard as the step thread does: on the kernel's default slice, not
    # the 100 us of the event loop's thread, whose executor spawned it (inherited: 1813f75).
    # The loop asked for it (else the check below could not fail):
    assert any(short_sliced_threads(w.proc.pid) for w in cluster.workers) or not any(
        Path(f"/proc/{w.proc.pid}/sched").read_text().count("se.slice") for w in cluster.workers
    )
    for w in cluster.workers:
        (rank,) = rank_processes(w.proc.pid)
        assert not short_sliced_threads(rank), (rank, short_sliced_threads(rank))
    llm = LLM(str(tiny_model_dir("qwen2_moe")), device="cpu", dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = [o.outputs[0].text for o in llm.generate(PROMPTS, params)]
    with httpx.Client(base_url=cluster.base_url, timeout=60) as c:
        for _ in range(2):  # round robin: both workers answer
            for prompt, text in zip(PROMPTS, want, strict=True):
                body = {"model": TINY_NAME, "prompt": prompt, "max_tokens": 8,
                        "temperature": 0, "ignore_eos": True}  # fmt: skip
                r = c.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == text


def test_pd_with_tp2_equals_colocated_tp2(cluster) -> None:
    # Several blocks per prompt (and a partly filled last one), so that every rank pushes
    # runs of blocks; the decoded tokens read all of it on both ranks.
    prompts = [*PROMPTS, "one two three four five six seven " * 6]
    with httpx.Client(base_url=cluster.base_url, timeout=60) as c:

        def texts() -> list[tuple[int, str]]:
            return [completion(c, prompt) for prompt in prompts]

        colocated = texts()
        assert all(code == 200 for code, _ in colocated), colocated
        set_roles(cluster, {"worker-0": "prefill", "worker-1": "decode"})
        try:
            assert texts() == colocated  # no mixed worker left: every request went PD
            decode = workers(cluster)["worker-1"]
            assert load_report(decode["address"]).spec_num_drafts > 0
            with grpc.insecure_channel(decode["address"]) as ch, pytest.raises(grpc.RpcError) as e:
                pb_grpc.WorkerServiceStub(ch).Reserve(
                    pb.ReserveRequest(request_id="tp-mismatch", prompt_token_ids=[1, 2, 3],
                                      params=pb.SamplingParams(max_tokens=2),
                                      role_epoch=decode["epoch"], writer_tensor_parallel_size=1),
                    timeout=10,
                )  # fmt: skip
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "tensor-parallel size mismatch" in e.value.details(), e.value.details()
        finally:
            set_roles(cluster, {"worker-0": "mixed", "worker-1": "mixed"})


def test_experts_rebalance_under_load_changes_no_output(cluster, placement_file) -> None:
    prompt = "one two three four five six seven " * 3
    with httpx.Client(base_url=cluster.base_url, timeout=60) as c:
        want = completion(c, prompt, 24)
        assert want[0] == 200, want
        results: list[tuple[int, str]] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=cluster.base_url, timeout=60) as lc:
                while not stop.is_set():
                    results.append(completion(lc, prompt, 24))

        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(results) >= 2, 60, "requests before the re-placement")
            # Two spare slots: the hottest experts get a replica on the other rank.
            r = cli(cluster, "experts", "rebalance", "worker-0", "--slots", "10", "--json")
            n = len(results)
            wait_for(lambda: len(results) >= n + 4, 60, "requests after the re-placement")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    # Every request answered, and with the same tokens, on the old and the new placement.
    assert results and set(results) == {want}, [x for x in results if x != want][:3]
    placed = placements_from_json(answer["placement"])
    assert placed[0].slots_per_rank == 5 and answer["saved_to"] == str(placement_file)
    assert load_placements(str(placement_file)) == placed
    assert len(answer["imbalance_before"]) == len(answer["imbalance_after"]) == 1
    # Bad input is the API's 400 with the reason, and the worker keeps serving.
    bad = cli(cluster, "experts", "rebalance", "worker-0", "--slots", "3")
    assert bad.returncode == 1 and "400" in bad.stderr and "cannot hold" in bad.stderr, bad.stderr
    with httpx.Client(base_url=cluster.base_url, timeout=60) as c:
        assert completion(c, prompt, 24) == want


def ready_workers(c) -> int:
    """Workers the router routes to now (/health's ready count)."""
    return httpx.get(c.base_url + "/health", timeout=10).json()["ready"]


def test_sigstop_of_a_rank_takes_its_worker_out_of_routing_until_sigcont(cluster) -> None:
    """A stopped rank leaves its worker's driver waiting in a collective while the process
    answers: past --engine-stall-s its load reports stop, the router routes around it and
    moves what it held, and after SIGCONT it serves again. Before, it kept reporting (and
    stayed in routing) until gloo's 300 s collective timeout ended the worker. Meanwhile the
    liveness probe `epdserve up` runs of it fails (up kills and restarts it after
    --liveness-failures such probes): before, it passed, and a rank stopped for good left its
    worker out of routing, never restarted, for ever."""
    victim = cluster.workers[1]
    pid = victim.proc.pid
    (rank,) = rank_processes(pid)
    with Traffic(cluster.base_url) as traffic:
        wait_for(lambda: len(traffic.statuses) >= 2, 60, "traffic flowing")
        os.kill(rank, signal.SIGSTOP)
        try:
            wait_for(lambda: ready_workers(cluster) == 1, 90, "the stuck worker out of routing")
            wait_for(lambda: victim.probe(3.0) is False, 30, "up's liveness probe failing")
        finally:
            os.kill(rank, signal.SIGCONT)
        wait_for(lambda: ready_workers(cluster) == 2, 60, "the worker back in routing")
        assert victim.probe(3.0) is True
        done = len(traffic.statuses)
        wait_for(lambda: len(traffic.statuses) >= done + 4, 60, "traffic after SIGCONT")
    assert victim.alive() and victim.proc.pid == pid  # the same process serves again
    assert set(traffic.statuses) == {200}, (traffic.statuses, traffic.failures)


def test_kill_9_of_a_rank_fails_no_request(cluster) -> None:
    victim = cluster.workers[0]
    pid = victim.proc.pid
    (rank,) = rank_processes(pid)
    with Traffic(cluster.base_url) as traffic:
        time.sleep(1.0)
        signal_sent = time.monotonic()
        os.kill(rank, signal.SIGKILL)
        # The whole worker goes down (never half a group serving) ...
        wait_for(lambda: victim.proc.poll() is not None or victim.proc.pid != pid, 30,
                 "the worker of the killed rank to exit")  # fmt: skip
        assert time.monotonic() - signal_sent < 30
        time.sleep(2.0)
    # ... and no request failed: the router retried or migrated them to the other worker.
    assert traffic.statuses and set(traffic.statuses) == {200}, (
        traffic.statuses,
        traffic.failures,
        "\n".join(cluster.router.tail),
    )
    assert traffic.statuses[-5:] == [200] * 5


def test_a_worker_whose_rank_exits_never_reports_draining(cluster) -> None:
    """SIGTERM of a rank: its group is down, the engine dies and the worker exits 1 (`up`
    restarts it). Its load reports must not say draining on the way out: a router takes a
    draining worker for one leaving on purpose and does not wait for its restart, so on
    `epdserve up` with one TP worker 8 of 8 and then 2 of 8 streams failed with
    `no_workers` at once after a rank's SIGTERM (a rank's kill -9, racing the other way, lost
    none). The last test of the module: the worker is not restarted."""
    victim = cluster.workers[1]
    (rank,) = rank_processes(victim.proc.pid)
    address = workers(cluster)[victim.name]["address"]
    with grpc.insecure_channel(address) as ch:
        reports = pb_grpc.WorkerServiceStub(ch).StreamLoad(
            pb.LoadReportRequest(interval_ms=20), timeout=60
        )
        assert not next(reports).draining
        os.kill(rank, signal.SIGTERM)
        draining = 0
        with contextlib.suppress(grpc.RpcError):  # the worker went away (or the 60 s bound)
            for report in reports:
                draining += report.draining
    assert draining == 0
    wait_for(lambda: not victim.alive(), 30, "the worker to exit")
    assert victim.returncode() == 1
