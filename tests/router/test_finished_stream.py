"""The router answers a request at its worker's ``finished`` message, without waiting for the
call's status (0.17 ms a request: benchmarks/RESULTS.md, "gateway's added latency"), and does
not cancel that call: the worker ends it on its own."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from router_fakes import FakeEngine, start_fake_worker, start_gateway

from tests.waits import until

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]


class LingeringEngine(FakeEngine):
    """Holds each stream open after its last (finished) output until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.ended: list[str] = []

    async def generate(self, request_id, prompt_token_ids, params, resume=None, lora=None):  # noqa: ANN001, ANN201
        async for out in super().generate(request_id, prompt_token_ids, params, resume, lora):
            yield out
        await self.release.wait()
        self.ended.append(request_id)


async def test_answered_at_the_finished_message(etcd) -> None:
    engine = LingeringEngine()
    worker = await start_fake_worker(etcd.endpoint, "fin1", "w1", engine)
    # NOTE: a call of its own per request: the worker's mux (worker/mux.py) sends the finished
    # message with the request's end, in one frame, so there is no status to wait for there.
    gw = await start_gateway(etcd.endpoint, "fin1", worker_mux=False)
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            await until(lambda: gw.gateway.pool.candidates(), what="a usable worker")
            req = {"model": "fake-model", "prompt": "a", "max_tokens": 3}
            # The old router waited for the status, which the worker holds back: a timeout.
            r = await asyncio.wait_for(c.post("/v1/completions", json=req), 10)
            assert r.status_code == 200
            assert r.json()["choices"][0]["text"] == "w0 w1 w2 "
            async with c.stream("POST", "/v1/completions", json={**req, "stream": True}) as s:
                lines = await asyncio.wait_for(_lines(s), 10)
            assert lines[-1] == "data: [DONE]" and len(lines) == 4
            assert engine.ended == [] and engine.aborted == []  # the worker still holds both
            engine.release.set()
            await until(lambda: len(engine.ended) == 2, what="the worker's streams to end")
            assert engine.aborted == []  # never cancelled: the engine was not asked to abort
            handle = next(iter(gw.gateway.pool.handles.values()))
            assert handle.inflight == 0
    finally:
        await gw.stop()
        await worker.stop()


async def _lines(response: httpx.Response) -> list[str]:
    return [line async for line in response.aiter_lines() if line]
