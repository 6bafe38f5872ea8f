"""The router's event loop keeps running while one request is being prepared: a prompt that
takes long to tokenize (or a grammar that takes long to compile) is worked on by the
preparation threads (services/router/offload.py), while other streams and /health go on.

The doubles block until the test releases them (a blocking wait, as a slow encode blocks its
thread), so nothing here depends on timing: with the work on the loop, the test's own
coroutines cannot run until the double gives up, and the checks below see it finished."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import httpx
import pytest
import pytest_asyncio
from router_fakes import FakeEngine, FakeTokenizer, start_fake_worker, start_gateway, until_healthy

from services.router.config import RouterConfig
from services.router.features import structured
from services.router.offload import INLINE_BELOW, Offload, text_size

pytestmark = [pytest.mark.timeout(90)]

MODEL = "fake-model"
BIG = 100_000  # characters of a prompt the double tokenizes slowly (well past INLINE_BELOW)
GIVE_UP_S = 10.0  # a double left blocked this long carries on (the old code's case)
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


class Gate:
    """A blocking step the test controls: ``started`` once a thread is in it, ``finished``
    once it has gone through (released, or after GIVE_UP_S)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()

    def block(self) -> None:
        self.started.set()
        self.release.wait(timeout=GIVE_UP_S)
        self.finished.set()


class SlowTokenizer(FakeTokenizer):
    """A FakeTokenizer whose encode of a text of BIG characters or more blocks at ``gate``
    (completions encode, chat templates render then encode: both go through it)."""

    def __init__(self) -> None:
        self.gate = Gate()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) >= BIG:
            self.gate.block()
            text = text[:16]  # the double's answer: a short prompt the fake engine takes
        return super().encode(text, add_special_tokens)


_n = 0


@pytest_asyncio.fixture
async def env(etcd):
    global _n
    _n += 1
    cluster = f"loop{_n}"
    engine = FakeEngine(max_model_len=8192, step_s=0.02)
    worker = await start_fake_worker(etcd.endpoint, cluster, "w1", engine=engine)
    tokenizer = SlowTokenizer()
    gw = await start_gateway(etcd.endpoint, cluster, tokenizer=tokenizer)
    client = httpx.AsyncClient(base_url=gw.url, timeout=60)
    await until_healthy(client)
    yield client, tokenizer
    tokenizer.gate.release.set()
    await client.aclose()
    await asyncio.wait_for(gw.stop(), 15)
    await asyncio.wait_for(worker.stop(), 15)


async def _wait(event: threading.Event) -> None:
    for _ in range(int(GIVE_UP_S * 100) + 500):
        if event.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the slow step never started")


async def _small_stream(client: httpx.AsyncClient, chunks: list[str]) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2000, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                chunks.append(line)


async def _check_loop_runs_while_blocked(
    client: httpx.AsyncClient, gate: Gate, path: str, body: dict[str, Any]
) -> None:
    """While ``body`` sent to ``path`` is held at ``gate``, /health answers and a running
    small stream gets chunks; then the held request completes."""
    chunks: list[str] = []
    small = asyncio.create_task(_small_stream(client, chunks))
    try:
        for _ in range(1000):
            if chunks or small.done():
                break
            await asyncio.sleep(0.01)
        assert chunks, "the small stream did not start"
        held = asyncio.create_task(client.post(path, json=body))
        await _wait(gate.started)
        before = len(chunks)
        health = await client.get("/health")
        for _ in range(1000):
            if len(chunks) >= before + 3 or gate.finished.is_set():
                break
            await asyncio.sleep(0.01)
        went_on = len(chunks) - before
        still_held = not gate.finished.is_set()
        gate.release.set()
        assert still_held, "the gateway answered only once the held request's work was done"
        assert health.status_code == 200
        assert went_on >= 3, f"only {went_on} chunks of the small stream while the other was held"
        r = await held
        assert r.status_code == 200, r.text
    finally:
        small.cancel()
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await small


BIG_TEXT = "x" * BIG
HELD_BODIES = {
    "completions": ("/v1/completions", {"prompt": BIG_TEXT, "max_tokens": 2}),
    "chat": ("/v1/chat/completions",
             {"messages": [{"role": "user", "content": BIG_TEXT}], "max_tokens": 2}),
    "messages": ("/v1/messages",
                 {"messages": [{"role": "user", "content": BIG_TEXT}], "max_tokens": 2}),
    "tokenize": ("/tokenize", {"prompt": BIG_TEXT}),
}  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(HELD_BODIES))
async def test_a_slow_prompt_does_not_stop_other_streams(env, case: str) -> None:
    client, tokenizer = env
    path, body = HELD_BODIES[case]
    await _check_loop_runs_while_blocked(client, tokenizer.gate, path, {"model": MODEL, **body})


GRAMMAR_BODIES = {
    "response_format": ("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}},
    }),
    "output_config": ("/v1/messages", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}},
    }),
}  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(GRAMMAR_BODIES))
async def test_a_slow_grammar_does_not_stop_other_streams(env, monkeypatch, case: str) -> None:
    client, _ = env
    gate = Gate()
    real_check = structured.check

    def slow_check(params: Any) -> None:
        gate.block()
        real_check(params)

    monkeypatch.setattr(structured, "check", slow_check)
    path, body = GRAMMAR_BODIES[case]
    await _check_loop_runs_while_blocked(client, gate, path, {"model": MODEL, **body})


# -- Offload itself -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_small_work_runs_inline_large_or_unsized_work_on_the_pool() -> None:
    pool = Offload(2)
    try:
        here = threading.get_ident()
        assert await pool.run(INLINE_BELOW - 1, threading.get_ident) == here
        assert await pool.run(INLINE_BELOW, threading.get_ident) != here
        assert await pool.run(None, threading.get_ident) != here
        assert await pool.run(None, lambda a, b=0: a + b, 2, b=3) == 5
    finally:
        pool.close()


@pytest.mark.asyncio
async def test_errors_come_back_and_a_cancelled_caller_drops_queued_work() -> None:
    pool = Offload(1)
    gate, ran = Gate(), threading.Event()
    try:
        with pytest.raises(ValueError, match="bad"):
            await pool.run(None, int, "bad")
        busy = asyncio.create_task(pool.run(None, gate.block))
        await _wait(gate.started)
        queued = asyncio.create_task(pool.run(None, ran.set))
        await asyncio.sleep(0.05)
        queued.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await queued
        gate.release.set()
        await busy
        assert await pool.run(None, lambda: "after") == "after"  # the one thread is free
        assert not ran.is_set()
    finally:
        gate.release.set()
        pool.close()


def test_the_pool_size_is_checked() -> None:
    with pytest.raises(ValueError, match="preprocess_threads"):
        RouterConfig(preprocess_threads=0)
    with pytest.raises(ValueError, match="at least one thread"):
        Offload(0)


def test_text_size_counts_the_text_the_template_renders() -> None:
    messages = [
        {"role": "system", "content": "abc"},
        {"role": "user", "content": [{"type": "text", "text": "de"}, {"type": "image"}, "x"]},
        {"role": "assistant", "content": None},
    ]
    assert text_size(messages) == 5
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert text_size(messages, tools) == 5 + len(
        '[{"type": "function", "function": {"name": "f"}}]'
    )
