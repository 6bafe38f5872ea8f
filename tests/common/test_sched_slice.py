"""services/common/sched_slice.py: a service's event loop runs on the scheduler slice that
EPDSERVE_SCHED_SLICE_US asks for (the threads it starts keep it), on the kernel's default when
it is unset or 0, and a thread can take the default back. Skipped where the kernel reports no slice (before Linux 6.12)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from services.common import event_loop, sched_slice

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    sched_slice.slice_ns() is None, reason="the kernel reports no scheduler slice"
)


async def _slices() -> tuple[int | None, int | None]:
    """The loop thread's slice, and a thread's it starts."""
    seen: list[int | None] = []
    thread = threading.Thread(target=lambda: seen.append(sched_slice.slice_ns()))
    thread.start()
    await asyncio.to_thread(thread.join, 10)
    return sched_slice.slice_ns(), seen[0]


def test_the_loop_runs_on_the_asked_slice_and_gives_it_back(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(sched_slice.ENV, "100")
    before = sched_slice.slice_ns()
    loop_slice, started = event_loop.run(_slices())
    assert loop_slice == started == 100_000
    assert sched_slice.slice_ns() == before  # the caller's thread as it was


@pytest.mark.parametrize("value", [None, "0"])
def test_unset_or_zero_leaves_the_default(monkeypatch: pytest.MonkeyPatch, value: str | None):
    if value is None:
        monkeypatch.delenv(sched_slice.ENV, raising=False)
    else:
        monkeypatch.setenv(sched_slice.ENV, value)
    before = sched_slice.slice_ns()
    assert event_loop.run(_slices()) == (before, before)


def test_a_long_running_thread_takes_the_default_back() -> None:
    def run() -> None:
        default = sched_slice.slice_ns()
        assert sched_slice.short_slice(200)
        seen.append(sched_slice.slice_ns())
        assert sched_slice.default_slice()
        seen.append(sched_slice.slice_ns() == default)

    seen: list[object] = []
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert seen == [200_000, True]


def test_a_process_started_meanwhile_gets_the_default() -> None:
    """A process inherits the slice of the thread that starts it: tensor-parallel ranks
    spawned from a loop's executor computed on 100 us (tp_ranks.py starts them inside
    ``default_slice_meanwhile``). The thread's own slice comes back after."""
    code = "from services.common import sched_slice; print(sched_slice.slice_ns())"

    def run() -> None:
        default = sched_slice.slice_ns()
        assert sched_slice.short_slice(200)
        with sched_slice.default_slice_meanwhile():
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 timeout=60, check=True, env={"PYTHONPATH": str(ROOT)})  # fmt: skip
        seen.extend([int(out.stdout), default, sched_slice.slice_ns()])

    seen: list[int | None] = []
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert seen[0] == seen[1] and seen[2] == 200_000, seen
