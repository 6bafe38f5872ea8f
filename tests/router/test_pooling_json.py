"""The pooling APIs' JSON bodies: the same bytes as Starlette's JSONResponse, built on the
router's preparation threads a list item at a time, so that a large embeddings answer does
not stop the event loop (services/router/api/pooling.py, json_body)."""

from __future__ import annotations

import asyncio
import math
import random
import time

import pytest
from starlette.responses import JSONResponse

from services.router.api.pooling import _json_size, json_body
from services.router.offload import Offload


def embeddings(n: int, dim: int) -> dict:
    rng = random.Random(0)
    data = [{"object": "embedding", "index": i, "embedding": [rng.uniform(-1, 1) for _ in range(dim)]}
            for i in range(n)]  # fmt: skip
    return {
        "object": "list",
        "data": data,
        "model": "m-é",
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }


@pytest.mark.parametrize("result", [
    embeddings(3, 5),
    {"object": "list", "data": [], "model": "m", "usage": {"prompt_tokens": 0, "total_tokens": 0}},
    {"id": "rerank-1", "model": "m", "results": [{"index": 1, "relevance_score": 0.5,
     "document": {"text": "ünï \"q\" \u2028"}}], "usage": {"total_tokens": 7}},
    {"data": [{"embedding": "AAAAPw=="}], "model": "m", "usage": {"total_tokens": 1}, "x": None},
])  # fmt: skip
def test_same_bytes_as_starlette(result: dict) -> None:
    assert json_body(result) == JSONResponse(result).body


def test_nan_is_refused_as_starlette_refuses_it() -> None:
    bad = embeddings(2, 3)
    bad["data"][1]["embedding"][0] = math.nan
    with pytest.raises(ValueError):
        JSONResponse(bad)
    with pytest.raises(ValueError):
        json_body(bad)


def test_the_event_loop_runs_while_a_large_body_is_built() -> None:
    """2,048 x 256 floats: the loop gets the GIL between list items, so no wait of the loop
    is more than a small part of the build. The old code dumped the body in one call on the
    loop (one wait as long as the build; in a thread, one json.dumps holds the GIL as long)."""
    big = embeddings(2048, 256)
    offload = Offload(1)

    async def main() -> tuple[float, float]:
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not done.is_set():
                await asyncio.sleep(0.001)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        start = time.monotonic()
        body = await offload.run(_json_size(big), json_body, big)
        took = time.monotonic() - start
        done.set()
        await task
        assert body == JSONResponse(big).body
        return max(gaps), took

    try:
        longest, took = asyncio.run(main())
    finally:
        offload.close()
    assert _json_size(big) > offload.inline_below  # it went to the pool
    # NOTE: relative, not a time bound: the longest wait of the loop against the whole build.
    assert longest < took / 3, (longest, took)
