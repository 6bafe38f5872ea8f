"""A router told to stop (SIGTERM: uvicorn's shutdown) with requests in flight: short ones
finish, the rest end after the grace period with a 503 in their API's format (an error event
on a stream), and their generations are aborted on the worker."""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import pytest
from router_fakes import FakeEngine, FakeTokenizer, sse_events, start_fake_worker, until_healthy

from services.common.net import free_port
from services.router.config import RouterConfig
from services.router.gateway import Gateway
from services.router.main import GatewayServer, server_config
from services.router.server import build_app
from services.router.shutdown import SHUTDOWN_MARGIN_S
from tests.waits import until

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

GRACE_S = 1.5


def _chat(max_tokens: int, stream: bool) -> tuple[str, dict]:
    return "/v1/chat/completions", {
        "model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens, "stream": stream,
    }  # fmt: skip


def _messages(max_tokens: int, stream: bool) -> tuple[str, dict]:
    return "/v1/messages", {
        "model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens, "stream": stream,
    }  # fmt: skip


async def test_sigterm_ends_requests_in_flight_cleanly(etcd) -> None:
    engine = FakeEngine(max_model_len=100_000, step_s=0.02)  # 50 tokens a second
    worker = await start_fake_worker(etcd.endpoint, "shutdown", "w1", engine)
    port = free_port()
    cfg = RouterConfig(port=port, cluster="shutdown", etcd=etcd.endpoint, shutdown_grace_s=GRACE_S,
                       load_report_interval_ms=50, request_timeout_s=30)  # fmt: skip
    gw = Gateway(cfg, FakeTokenizer())
    uvi = server_config(build_app(gw), cfg, "warning")
    # The grace is the config's (it was a constant, 10 s), and uvicorn's own limit follows it.
    assert uvi.timeout_graceful_shutdown == math.ceil(GRACE_S + SHUTDOWN_MARGIN_S)
    server = GatewayServer(uvi, gw)
    task = asyncio.create_task(server.serve())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            await until(lambda: server.started, what="the gateway's server started")
            await until_healthy(c)
            long = [_chat(5000, False), _chat(5000, True), _messages(5000, False),
                    _messages(5000, True)]  # fmt: skip
            short = _chat(20, False)  # ~0.4 s: finishes within the grace
            calls = [asyncio.create_task(c.post(path, json=body)) for path, body in long]
            while len(engine.started) < len(long):
                await asyncio.sleep(0.02)
            calls.append(asyncio.create_task(c.post(*short[:1], json=short[1])))
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            server.should_exit = True  # what uvicorn's SIGTERM handler does
            chat, chat_stream, msg, msg_stream, done = await asyncio.gather(*calls)
            waited = time.monotonic() - t0
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)
        await worker.stop()

    assert done.status_code == 200 and done.json()["choices"][0]["finish_reason"] == "length"
    # Before: uvicorn cancelled them after its 10 s into a plain-text 500 and cut streams.
    assert GRACE_S - 0.2 < waited < GRACE_S + 5
    assert chat.status_code == 503, chat.text
    assert chat.json()["error"]["code"] == "router_shutting_down"
    assert chat.json()["error"]["type"] == "service_unavailable"
    assert msg.status_code == 503, msg.text
    assert msg.json() == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": msg.json()["error"]["message"]},
    }
    assert chat_stream.status_code == 200
    events = sse_events(chat_stream.text)
    assert events[-1][1]["error"]["code"] == "router_shutting_down"
    assert len(events) > 10  # tokens were streamed before the end
    assert msg_stream.status_code == 200
    events = sse_events(msg_stream.text)
    assert events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "overloaded_error"
    # The generations were aborted on the worker, not left running.
    assert len(engine.aborted) >= len(long)


async def test_a_failing_step_of_stop_skips_none_of_the_rest(etcd) -> None:
    """Gateway.stop(): a step that raises (here the first, the model swapper's) is reported
    after every later step ran; the worker pool's channels and the threads were left open."""
    gw = Gateway(RouterConfig(port=free_port(), cluster="stop-steps", etcd=etcd.endpoint),
                 FakeTokenizer())  # fmt: skip
    await gw.start()
    ran: list[str] = []

    async def broken() -> None:
        raise RuntimeError("swapper broke")

    def recorded(name: str, step):
        def call(*args, **kwargs):
            ran.append(name)
            return step(*args, **kwargs)

        return call

    gw.swapper.stop = broken  # type: ignore[method-assign]
    for obj, name in [(gw.watcher, "stop"), (gw.kv_index, "stop"), (gw.pool, "close"),
                      (gw.tracing, "shutdown"), (gw.offload, "close")]:  # fmt: skip
        setattr(obj, name, recorded(f"{type(obj).__name__}.{name}", getattr(obj, name)))
    with pytest.raises(RuntimeError, match="swapper broke"):
        await asyncio.wait_for(gw.stop(), 15)
    assert ran == ["MembershipWatcher.stop", "KVIndexClient.stop", "WorkerPool.close",
                   "Tracing.shutdown", "Offload.close"]  # fmt: skip
