"""``cancel_and_wait``: the stop of background loops ends, even for a task that swallows
its cancellation, and a loop's own failure is not hidden."""

from __future__ import annotations

import asyncio

import pytest

from services.common.aio import cancel_and_wait

pytestmark = pytest.mark.asyncio


async def test_cancels_and_waits_for_each_task() -> None:
    ended: list[str] = []

    async def loop(name: str) -> None:
        try:
            await asyncio.sleep(60)
        finally:
            ended.append(name)

    tasks = [asyncio.create_task(loop(n)) for n in "ab"]
    await asyncio.sleep(0)
    await cancel_and_wait(tasks[0], None, tasks[1])
    assert sorted(ended) == ["a", "b"] and all(t.cancelled() for t in tasks)


async def test_a_task_that_swallows_one_cancel_is_cancelled_again() -> None:
    async def stubborn() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            pass  # library code that "cleans up" and goes on waiting
        await asyncio.sleep(60)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task, timeout=0.2), 5)
    assert task.cancelled()


async def test_a_task_that_ignores_every_cancel_is_left_behind(caplog) -> None:
    release = asyncio.Event()

    async def deaf() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(deaf(), name="deaf-loop")
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task, timeout=0.2), 5)  # returns: no hang
    assert not task.done() and "deaf-loop did not stop" in caplog.text
    release.set()
    task.cancel()
    await asyncio.wait_for(task, 5)


async def test_a_failure_of_the_task_propagates() -> None:
    async def broken() -> None:
        raise RuntimeError("loop died")

    task = asyncio.create_task(broken())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="loop died"):
        await cancel_and_wait(task)
