"""An online request is admitted at once, with no watch for the client's disconnect (two
tasks and an asyncio.wait a request); a flex one, which may wait in its queue, is watched."""

from __future__ import annotations

import httpx
import pytest
from router_fakes import start_fake_worker, start_gateway

from services.router import serving
from tests.waits import until

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]


async def test_only_a_flex_admission_watches_the_client(etcd, monkeypatch) -> None:
    watched: list[str] = []
    plain = serving.until_disconnect

    async def spy(request, work, **kw):  # noqa: ANN001, ANN003, ANN202
        watched.append(getattr(getattr(work, "cr_code", None), "co_name", type(work).__name__))
        return await plain(request, work, **kw)

    monkeypatch.setattr(serving, "until_disconnect", spy)
    worker = await start_fake_worker(etcd.endpoint, "adm1", "w1")
    gw = await start_gateway(etcd.endpoint, "adm1")
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
            await until(lambda: gw.gateway.pool.candidates(), what="a usable worker")
            req = {"model": "fake-model", "prompt": "a", "max_tokens": 2}
            for body in (req, {**req, "stream": True}):
                watched.clear()
                r = await c.post("/v1/completions", json=body)
                assert r.status_code == 200
                assert "_admit" not in watched and watched  # the output's wait is still watched
            watched.clear()
            r = await c.post("/v1/completions", json={**req, "service_tier": "flex"})
            assert r.status_code == 200
            assert "_admit" in watched
    finally:
        await gw.stop()
        await worker.stop()
