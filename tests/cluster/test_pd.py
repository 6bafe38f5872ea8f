"""PD disaggregation with real processes: prefill and decode workers moving KV with the real
Mooncake transfer engine, against a co-located worker on the same model."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from cluster_helpers import TINY_NAME, load_report, start_cluster

from services.cli.cluster_spec import ModelGroup
from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc
from tests.deps import MOONCAKE, require

require("mooncake.engine", MOONCAKE)
pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

# Prompts of mixed lengths; the last ones share a long prefix with the first (cache hits).
BASE = "The history of the printing press begins in the fifteenth century when " * 6
PROMPTS = [
    BASE,
    "Hello",
    "Write a haiku about autumn leaves",
    BASE + "and then the book trade grew",
    BASE + "so the scribes had to find new work",
    "1 2 3 4 5 6 7 8 9 10 11 12",
]


def wait_all_blocks_free(addresses: list[str], timeout: float = 45.0) -> dict[str, tuple[int, int]]:
    deadline = time.monotonic() + timeout
    while True:
        seen = {a: load_report(a) for a in addresses}
        counts = {a: (r.num_free_blocks, r.num_total_blocks) for a, r in seen.items()}
        if all(f == t for f, t in counts.values()) or time.monotonic() > deadline:
            return counts
        time.sleep(0.5)


# The co-located reference: a mixed worker of the same model in pd_cluster, under its own
# served name (the router keeps a pool per model, so the name fixes the path). Its requests
# do not speculate (REFERENCE), as the co-located cluster it replaces did not.
MIXED_NAME = "tiny-llama-mixed"
REFERENCE = {"model": MIXED_NAME, "speculative": False}


def complete(url: str, prompt: str, max_tokens: int = 12, **extra: object) -> dict:
    r = httpx.post(
        url + "/v1/completions",
        json={"model": TINY_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
              "ignore_eos": True, "logprobs": 2, **extra},
        timeout=120,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def concurrently(fn, args_list):
    with ThreadPoolExecutor(max_workers=len(args_list)) as pool:
        return list(pool.map(lambda a: fn(*a), args_list))


@pytest.fixture(scope="class")
def pd_cluster(tiny_model_dir):
    """A PD pair (workers[0], [1]) and the co-located reference, a mixed worker (workers[2])
    serving the same model as MIXED_NAME."""
    # Its workers speculate (n-gram from a 1-token match, so that short outputs draft too):
    # the decode side's output must still equal the co-located worker's, which does not.
    spec = ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, '
            '"adaptive": false}')  # fmt: skip
    model = tiny_model_dir("llama")
    c = start_cluster(model, workers=0, prefill=1, decode=1,
                      more_models=[ModelGroup(str(model), MIXED_NAME, mixed=1)],
                      engine_overrides={"speculative_config": spec})  # fmt: skip
    yield c
    c.stop()


@pytest.fixture(scope="class")
def staged_pd_cluster(tiny_model_dir):
    """PD through pinned host staging slots on both sides (what a GPU worker with the
    non-CUDA Mooncake wheel does), forced on the CPU, with two tensor-parallel ranks per
    worker: each rank stages its own heads out and in (test_cancel_storm.py stages at TP=1)."""
    c = start_cluster(
        tiny_model_dir("llama"), workers=0, prefill=1, decode=1,
        worker_overrides={"kv_staging": "on", "kv_staging_bytes": 4 << 20},
        engine_overrides={"tensor_parallel_size": 2},
    )  # fmt: skip
    yield c
    c.stop()


PD_CLUSTERS = ["pd_cluster", "staged_pd_cluster"]


def staging_slots(cluster) -> list[tuple[float, float]]:
    """(free, total) staging slots of every worker, from its /metrics."""
    out = []
    for w in cluster.workers:
        text = httpx.get(f"http://127.0.0.1:{w.ready_field('metrics_port')}/metrics").text
        values = {
            line.split("{")[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("epdserve:kv_staging_slots")
        }
        out.append((values["epdserve:kv_staging_slots_free"], values["epdserve:kv_staging_slots"]))
    return out


def worker_addresses(cluster) -> list[str]:
    return [w.ready_field("address") for w in cluster.workers]


# NOTE: one cluster at a time, or two where a test compares them (the CI machine's memory):
# each class's clusters stop after its last test, before the next class starts its own.
class TestPDPairs:
    @pytest.mark.parametrize("pd", PD_CLUSTERS)
    def test_pd_equals_colocated(self, pd, request):
        url = request.getfixturevalue("pd_cluster").base_url
        mixed = request.getfixturevalue("pd_cluster").workers[2]
        pd_cluster = request.getfixturevalue(pd)
        expected = concurrently(lambda p: complete(url, p, **REFERENCE), [(p,) for p in PROMPTS])
        for round_ in range(2):  # the second round hits the decode worker's prefix cache
            got = concurrently(complete, [(pd_cluster.base_url, p) for p in PROMPTS])
            for e, g, p in zip(expected, got, PROMPTS, strict=True):
                ge, gg = e["choices"][0], g["choices"][0]
                assert gg["text"] == ge["text"], (round_, p)
                assert gg["logprobs"]["tokens"] == ge["logprobs"]["tokens"]
                for a, b in zip(
                    gg["logprobs"]["token_logprobs"], ge["logprobs"]["token_logprobs"], strict=True
                ):
                    assert abs(a - b) < 1e-4
                assert g["usage"]["prompt_tokens"] == e["usage"]["prompt_tokens"]
                assert g["usage"]["completion_tokens"] == 12
        decode = load_report(pd_cluster.workers[1].ready_field("address"))
        assert decode.role == pb.ROLE_DECODE
        assert decode.prefix_cache_hit_rate > 0  # repeated prompts: their blocks did not move again
        if pd == "pd_cluster":
            assert decode.spec_num_drafts > 0, decode
        # The reference did not speculate (its worker can: same engine).
        reference = load_report(mixed.ready_field("address"))
        assert reference.role == pb.ROLE_MIXED and reference.spec_num_drafts == 0, reference

    def test_stream_and_chat_in_pd(self, pd_cluster):
        body = {"model": TINY_NAME, "messages": [{"role": "user", "content": "Tell me a story"}],
                "max_tokens": 10, "temperature": 0, "stream": True, "stop": ["zzz"]}  # fmt: skip

        def stream_text(**extra: object) -> str:
            parts = []
            with httpx.stream("POST", pd_cluster.base_url + "/v1/chat/completions",
                              json={**body, **extra}, timeout=60) as r:  # fmt: skip
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        import json

                        for ch in json.loads(line[6:])["choices"]:
                            parts.append(ch["delta"].get("content") or "")
            return "".join(parts)

        assert stream_text() == stream_text(**REFERENCE)

    @pytest.mark.parametrize("pd", PD_CLUSTERS)
    def test_no_block_leaks_after_aborts(self, pd, request):
        """100 requests, every third one abandoned by its client mid-stream (with staging: no
        staging slot is left held either)."""
        pd_cluster = request.getfixturevalue(pd)
        url = pd_cluster.base_url
        addresses = worker_addresses(pd_cluster)
        before = wait_all_blocks_free(addresses)
        assert all(f == t for f, t in before.values()), before

        def one(i: int) -> str:
            body = {"model": TINY_NAME, "prompt": PROMPTS[i % len(PROMPTS)] + f" {i}",
                    "max_tokens": 40 if i % 3 == 0 else 6, "temperature": 0, "ignore_eos": True,
                    "stream": True}  # fmt: skip
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                if r.status_code != 200:
                    return f"status {r.status_code}"
                for n, _ in enumerate(r.iter_lines()):
                    if i % 3 == 0 and n >= 2:
                        return "abandoned"  # leaving the block closes the connection
            return "done"

        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(one, range(100)))
        assert results.count("done") == 66 and results.count("abandoned") == 34, results
        after = wait_all_blocks_free(addresses)
        assert after == before, (before, after)
        if pd == "staged_pd_cluster":
            slots = staging_slots(pd_cluster)
            assert all(free == total > 0 for free, total in slots), slots


def kill_when_busy(
    address: str, victim, watching: threading.Event, timeout: float, sig: int = signal.SIGKILL
) -> int:
    """Send ``sig`` to ``victim`` at the first load report (every 10 ms) that shows a request
    in flight; returns that count (0: none seen before ``timeout``)."""

    async def watch() -> int:
        async with grpc.aio.insecure_channel(address) as ch:
            call = pb_grpc.WorkerServiceStub(ch).StreamLoad(
                pb.LoadReportRequest(interval_ms=10), timeout=timeout
            )
            try:
                async for report in call:
                    watching.set()
                    if report.num_inflight > 0:
                        victim.signal(sig)
                        return report.num_inflight
            except grpc.aio.AioRpcError:
                pass
            return 0

    return asyncio.run(watch())


@pytest.fixture(scope="class")
def two_prefill_cluster(tiny_model_dir):
    """2 prefill + 1 decode, prompts prefilled in chunks of 16 tokens (a long prefill to kill
    a worker in), shared by the kill tests (each restarts what one before it killed)."""
    c = start_cluster(
        tiny_model_dir("llama"), workers=0, prefill=2, decode=1, policy="round_robin",
        engine_overrides={"max_model_len": 512, "kv_cache_bytes": 32 << 20,
                          "max_num_seqs": 16, "max_num_batched_tokens": 16},
    )  # fmt: skip
    yield c
    for w in c.workers:
        w.signal(signal.SIGCONT)
    c.stop()


def every_worker_routed(c) -> None:
    """Restart (same instance id) any worker an earlier test killed, then wait until the
    router can route to every worker, so that a victim does get its share of the requests."""
    for w in c.workers:
        if not w.alive():
            w.restart()
    deadline = time.monotonic() + 120
    health: dict = {}
    while time.monotonic() < deadline:
        for w in c.workers:
            assert w.returncode() is None, w.describe_failure()
        health = httpx.get(c.base_url + "/health", timeout=5).json()
        ready = all(w.is_ready() for w in c.workers)  # a restarted one: its ready line read
        if ready and health["workers"] == health["ready"] == len(c.workers):
            return
        time.sleep(0.1)
    raise AssertionError(f"not every worker routed in 120 s: {health}")


class TestPrefillKilled:
    # NOTE: stopped first: the stopped worker goes on after SIGCONT, so the killed case that
    # follows needs no restart (a restart costs about what a fresh cluster does: a model load).
    @pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["stopped", "killed"])
    def test_kill_prefill_worker_in_flight(self, two_prefill_cluster, sig):
        """2 prefill + 1 decode; kill -9 (or stop: a hung worker) one prefill worker with
        requests in flight."""
        c = two_prefill_cluster
        every_worker_routed(c)
        victim = c.workers[0]
        try:
            decode_addr = c.workers[2].ready_field("address")
            long_prompt = "word " * 450
            victim_addr = victim.ready_field("address")

            def one(i: int) -> tuple[int, dict]:
                r = httpx.post(
                    c.base_url + "/v1/completions",
                    json={"model": TINY_NAME, "prompt": long_prompt + str(i), "max_tokens": 8,
                          "temperature": 0, "ignore_eos": True},
                    timeout=120,
                )  # fmt: skip
                return r.status_code, r.json()

            with ThreadPoolExecutor(max_workers=13) as pool:
                # Kill it while it holds requests (prefill of a long prompt in small chunks): the
                # whole batch takes well under a second here, so watch its load stream.
                watching = threading.Event()
                watcher = pool.submit(kill_when_busy, victim_addr, victim, watching, 60.0, sig)
                assert watching.wait(30), "no load report from the victim"
                futures = [pool.submit(one, i) for i in range(12)]
                inflight_at_kill = watcher.result()
                results = [f.result() for f in futures]
            victim.signal(signal.SIGCONT)  # a stopped one goes on (its late writes are fenced)
            # Every request hit by the kill is retried on the surviving prefill worker with the
            # same (healthy) decode worker: the client sees no error (README, PD retry).
            assert [status for status, _ in results] == [200] * 12, results
            for _, body in results:
                assert body["choices"][0]["finish_reason"] == "length"
                assert body["usage"]["completion_tokens"] == 8
            # The kill did hit requests in flight (the victim reported them just before).
            assert inflight_at_kill > 0
            # Released reservations stay quarantined until their write deadline has passed.
            counts = wait_all_blocks_free([decode_addr], timeout=120.0)
            free, total = counts[decode_addr]
            assert free == total, counts
            # The cluster keeps serving on the remaining pair.
            assert one(99)[0] == 200
        finally:
            victim.signal(signal.SIGCONT)
