"""The step thread hands the GIL to the event loop when a step's outputs leave the engine idle,
so that the loop relays them before the thread's next pass (its commands, health, stats),
not after it (benchmarks/RESULTS.md, gw13: 0.14 ms from delivery to the relay, not 0.20)."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

from services.engine import async_engine
from services.engine.async_engine import AsyncLLMEngine
from services.engine.config import EngineConfig


class PlannedEngine:
    """What the step thread uses of an LLMEngine, running ``plan``: per step, its outputs and
    whether work is left after it. The thread is stopped after the last step."""

    cpu_placement = None
    pooler = None
    blocked_on_memory = False

    def __init__(self, plan: list[tuple[list[str], bool]], stop: threading.Event) -> None:
        self.plan = plan
        self.stop = stop
        self.scheduler = SimpleNamespace(waiting=[], has_work=True)
        self.executor = SimpleNamespace(check_health=lambda: None)

    def stats(self) -> None:
        return None

    def step(self) -> list[str]:
        outputs, more = self.plan.pop(0)
        self.scheduler.has_work = more
        if not self.plan:
            self.stop.set()
        return outputs


def events_of(plan: list[tuple[list[str], bool]], monkeypatch) -> list[object]:
    events: list[object] = []
    eng = AsyncLLMEngine(EngineConfig(model="m"))
    eng.engine = PlannedEngine(plan, eng._stopping)  # type: ignore[assignment]
    eng._deliver = lambda outputs: events.append(list(outputs))  # type: ignore[method-assign]
    thread = threading.Thread(target=eng._run, name="test-step")

    def sleep(seconds: float) -> None:  # another engine's thread left by a test sleeps as ever
        if threading.current_thread() is thread:
            events.append(("gil", seconds))
        else:
            time.sleep(seconds)

    monkeypatch.setattr(
        async_engine, "time", SimpleNamespace(monotonic=time.monotonic, sleep=sleep)
    )
    eng._loop = asyncio.new_event_loop()
    try:
        thread.start()
        thread.join(10)
        assert not thread.is_alive() and eng._dead is None, eng._dead
    finally:
        eng._loop.close()
        eng._grammars.shutdown(wait=False)
    return events


def test_the_gil_goes_to_the_loop_after_the_outputs_that_leave_the_engine_idle(monkeypatch):
    """Fails on the old step thread (no hand-over at all). Not after a step with work left
    (the next step's model ops run beside the relay), nor after a step without outputs."""
    plan = [(["a1"], True), ([], True), (["a2", "b1"], False)]
    assert events_of(plan, monkeypatch) == [["a1"], ["a2", "b1"], ("gil", 0)]
    assert events_of([([], False)], monkeypatch) == []
