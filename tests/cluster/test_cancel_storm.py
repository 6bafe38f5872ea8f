"""A cancellation storm on a real PD pair (1 prefill + 1 decode worker, KV through staging
slots on both sides): 200 streaming requests, half of them abandoned by their clients at
random moments (before the response starts, which is while the prompt is prefilled and its
KV pushed; after a random number of chunks). Afterwards every KV block and staging slot is
free on both workers, no process restarted, and a follow-up batch equals its reference."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import httpx
import pytest
from cluster_helpers import TINY_NAME, load_report, start_cluster

from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc
from tests.deps import MOONCAKE, require

require("mooncake.engine", MOONCAKE)
pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

N_REQUESTS = 200
CONCURRENCY = 24
SEED = 20261122
# Long prompts make the prefill and the KV push a large share of a request's life.
BASE = "The history of the printing press begins in the fifteenth century when " * 5
REFERENCE_PROMPTS = [BASE + f"chapter {i} tells" for i in range(6)]


@pytest.fixture(scope="module")
def pd_cluster(tiny_model_dir):
    # A reservation released before its Decode (the client left during the prefill) keeps its
    # blocks quarantined until its deadline plus the write grace: short ones keep the wait
    # for "all free" short.
    c = start_cluster(
        tiny_model_dir("llama"), workers=0, prefill=1, decode=1,
        worker_overrides={"kv_staging": "on", "kv_staging_bytes": 4 << 20,
                          "reserve_timeout_s": 20.0, "kv_write_grace_s": 2.0},
    )  # fmt: skip
    yield c
    c.stop()


def pids(cluster) -> list[int]:
    return [p.proc.pid for p in [*cluster.workers, cluster.router] if p is not None]


def idle_state(cluster) -> list[tuple[int, int, float, float]]:
    """(free blocks, total blocks, free staging slots, staging slots) of every worker."""
    out = []
    for w in cluster.workers:
        r = load_report(w.ready_field("address"))
        text = httpx.get(f"http://127.0.0.1:{w.ready_field('metrics_port')}/metrics").text
        slots = {
            line.split("{")[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("epdserve:kv_staging_slots")
        }
        out.append((r.num_free_blocks, r.num_total_blocks,
                    slots["epdserve:kv_staging_slots_free"], slots["epdserve:kv_staging_slots"]))  # fmt: skip
    return out


def held_requests(cluster) -> list[tuple[list[str], list[str]]]:
    """(requests in flight, reservations) of every worker: what holds blocks, for a failure."""

    async def ask(address: str) -> tuple[list[str], list[str]]:
        async with grpc.aio.insecure_channel(address) as ch:
            r = await pb_grpc.WorkerServiceStub(ch).ListRequests(
                pb.ListRequestsRequest(), timeout=5
            )
            return list(r.request_ids), list(r.reserved_ids)

    return [asyncio.run(ask(w.ready_field("address"))) for w in cluster.workers]


def all_free(state: list[tuple[int, int, float, float]]) -> bool:
    return all(fb == tb > 0 and fs == ts > 0 for fb, tb, fs, ts in state)


def wait_all_free(cluster, timeout: float = 60.0) -> list[tuple[int, int, float, float]]:
    deadline = time.monotonic() + timeout
    while True:
        state = idle_state(cluster)
        if all_free(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


async def stream(http: httpx.AsyncClient, prompt: str, max_tokens: int, stop_after: int | None,
                 events: list[str]) -> str:  # fmt: skip
    """Stream one completion; ``stop_after`` chunks: leave then (closing the connection).
    ``events`` gets "headers" and one "chunk" per data line as they arrive."""
    body = {"model": TINY_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    text = []
    async with http.stream("POST", "/v1/completions", json=body) as r:
        events.append("headers")
        if r.status_code != 200:
            return f"status {r.status_code}: {(await r.aread())[:200]!r}"
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            events.append("chunk")
            if stop_after is not None and events.count("chunk") >= stop_after:
                return "left"
            text.append(line)
    return "done"


async def storm(base_url: str, ttft_s: float) -> list[tuple[str, str]]:
    """Run the storm; (kind, outcome) per request. Kinds: "full" (read to the end),
    "early" (cancelled after a random delay up to ~2 TTFTs: mostly before the first chunk,
    while the prompt is prefilled or its KV is pushed), "chunks" (left after 1-4 chunks)."""
    rng = random.Random(SEED)
    sem = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_keepalive_connections=0)  # a cancel closes its own connection

    async def one(i: int, http: httpx.AsyncClient) -> tuple[str, str]:
        kind = "full" if i % 2 else rng.choice(["early", "chunks"])
        prompt = BASE[: rng.randrange(40, len(BASE))] + f" request {i}"
        max_tokens = rng.randrange(4, 17)
        events: list[str] = []
        async with sem:
            if kind == "full":
                return kind, await stream(http, prompt, max_tokens, None, events)
            if kind == "chunks":
                return kind, await stream(http, prompt, max_tokens, rng.randrange(1, 5), events)
            delay = rng.uniform(0.0, 2.0 * ttft_s)
            try:
                out = await asyncio.wait_for(stream(http, prompt, max_tokens, None, events), delay)
            except TimeoutError:
                out = "cancelled before the first chunk" if "chunk" not in events else "cancelled"
            return kind, out

    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:
        return await asyncio.gather(*(one(i, http) for i in range(N_REQUESTS)))


def reference_batch(base_url: str) -> list[str]:
    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
            rs = await asyncio.gather(*(
                http.post("/v1/completions", json={
                    "model": TINY_NAME, "prompt": p, "max_tokens": 12, "temperature": 0,
                    "ignore_eos": True,
                }) for p in REFERENCE_PROMPTS
            ))  # fmt: skip
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        return [r.json()["choices"][0]["text"] for r in rs]

    return asyncio.run(run())


def test_cancellation_storm_leaves_nothing_held(pd_cluster) -> None:
    before_pids = pids(pd_cluster)
    assert len(before_pids) == 3
    state = wait_all_free(pd_cluster)
    assert all_free(state), state
    started = time.monotonic()
    reference = reference_batch(pd_cluster.base_url)
    # The batch's wall time bounds one request's TTFT under light load: it scales the delays.
    ttft_s = max(0.01, (time.monotonic() - started) / 2)

    results = asyncio.run(storm(pd_cluster.base_url, ttft_s))

    outcomes = [out for _, out in results]
    full = [out for kind, out in results if kind == "full"]
    assert full == ["done"] * (N_REQUESTS // 2), full
    cancelled = [out for kind, out in results if kind != "full"]
    assert len(cancelled) == N_REQUESTS // 2
    assert all(o in ("left", "done", "cancelled", "cancelled before the first chunk")
               for o in cancelled), outcomes  # fmt: skip
    # The storm really cut requests at the two moments it aims at.
    assert cancelled.count("cancelled before the first chunk") >= 10, outcomes
    assert cancelled.count("left") >= 10, outcomes

    after = wait_all_free(pd_cluster)
    assert after == state, (state, after, held_requests(pd_cluster))
    assert pids(pd_cluster) == before_pids
    assert all(p.alive() for p in [*pd_cluster.workers, pd_cluster.router] if p is not None)
    assert reference_batch(pd_cluster.base_url) == reference
