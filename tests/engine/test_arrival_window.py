"""A wave of arrivals is prefilled in one step (EngineConfig.arrival_window_ms, issue 17): the
served benchmark's closed loop sends its 16 successors one after another, and the step thread
used to start the first alone, so its second token waited for the rest's whole prefill step."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from services.engine import AsyncLLMEngine
from services.engine.async_engine import ARRIVAL_WINDOWS
from services.engine.config import EngineConfig
from services.engine.sampling_params import SamplingParams
from tests.conftest import TINY_KV_BYTES


def first_token_steps(model: str, window_ms: float, n: int = 4, gap_s: float = 0.01) -> list[int]:
    """Requests sent ``gap_s`` apart to an idle engine: the step (its index among the steps
    that produced outputs) in which each got its first token."""
    steps: list[set[str]] = []
    cfg = EngineConfig(model=model, block_size=4, kv_cache_bytes=TINY_KV_BYTES,
                       arrival_window_ms=window_ms)  # fmt: skip

    async def run() -> list[int]:
        engine = AsyncLLMEngine(cfg)
        await engine.start()
        engine.on_step = lambda _e, outs: steps.append({o.request_id for o in outs})
        engine._last_outputs = n  # as after a wave of n that ended together: n successors due
        first: dict[str, int] = {}

        async def one(i: int) -> None:
            params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
            async for _ in engine.generate(f"r{i}", [5 + i, 6, 7, 8, 9], params):
                first.setdefault(f"r{i}", len(steps) - 1)

        try:
            tasks = []
            for i in range(n):
                tasks.append(asyncio.create_task(one(i)))
                await asyncio.sleep(gap_s)
            await asyncio.gather(*tasks)
        finally:
            await engine.shutdown()
        return [first[f"r{i}"] for i in range(n)]

    return asyncio.run(run())


def test_a_wave_sent_ten_ms_apart_gets_its_first_tokens_in_one_step(tiny_model_dir):
    """Fails on the old step thread: it stepped at the first arrival, so r0's first token came
    a step (or more) before the others'."""
    model = str(tiny_model_dir("llama"))
    got = first_token_steps(model, window_ms=100.0)
    assert len(set(got)) == 1, got


def fake_engine(waiting: int, running: int) -> SimpleNamespace:
    return SimpleNamespace(scheduler=SimpleNamespace(waiting=[0] * waiting, running=[0] * running))


def test_the_wait_is_for_waves_only_and_bounded():
    """After a step that produced 16 outputs, one arrival at an idle engine waits a window
    for the other successors (none came here). No wait: more running than waiting (a lone
    arrival beside running decodes), the whole wave here (16 of 16), or a lone client (the
    last step produced one output). Arrivals that keep coming stop the wait at
    ARRIVAL_WINDOWS windows."""
    eng = AsyncLLMEngine(EngineConfig(model="m", arrival_window_ms=40.0))
    eng._last_outputs = 16
    t = time.monotonic()
    eng._gather_arrivals(fake_engine(waiting=1, running=0))
    assert time.monotonic() - t >= 0.04
    for waiting, running, last in ((1, 2, 16), (16, 0, 16), (1, 0, 1)):
        eng._last_outputs = last
        t = time.monotonic()
        eng._gather_arrivals(fake_engine(waiting=waiting, running=running))
        assert time.monotonic() - t < 0.04, (waiting, running, last)
    eng._last_outputs = 10_000

    busy = fake_engine(waiting=1, running=0)

    def arrive(_engine) -> None:  # every pass of the wait finds one more request
        busy.scheduler.waiting.append(0)

    eng._drain_commands = arrive  # type: ignore[method-assign]
    eng._wake.set()  # the wait returns at once and finds an arrival, each time
    eng._wake.wait = lambda timeout: time.sleep(min(timeout, 0.01)) or True  # type: ignore[method-assign]
    t = time.monotonic()
    eng._gather_arrivals(busy)
    took = time.monotonic() - t
    assert ARRIVAL_WINDOWS * 0.04 <= took < ARRIVAL_WINDOWS * 0.04 + 5.0
    assert len(busy.scheduler.waiting) > 1


@pytest.mark.parametrize("bad", [-1.0, 100.5, float("nan"), float("inf")])
def test_a_bad_window_fails_in_the_config(bad):
    with pytest.raises(ValueError, match="arrival_window_ms"):
        EngineConfig(model="m", arrival_window_ms=bad)
