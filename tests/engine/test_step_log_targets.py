"""EPDSERVE_STEP_LOG pointing where a trace cannot go: the engine's trace turns itself off
with a warning and never blocks or raises (a trace must never stop an engine)."""

from __future__ import annotations

import os
import threading

import pytest

from services.engine.step_log import StepLog


def _opened_within(path: str, seconds: float = 10.0) -> StepLog:
    out: list[StepLog] = []
    t = threading.Thread(target=lambda: out.append(StepLog(path)), daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"opening the step log at {path} blocked"  # old code: a FIFO blocked for ever
    return out[0]


def test_a_fifo_without_a_reader_does_not_block_the_engine(tmp_path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    log = _opened_within(str(fifo))
    log.write({"a": 1})  # off: no error
    assert log._file is None
    # Unblock the old code's open() if it is still waiting, so the test process can end.
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    os.close(fd)


def test_a_fifo_whose_reader_stops_reading_turns_the_log_off(tmp_path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # never reads
    try:
        log = _opened_within(str(fifo))
        done = threading.Event()

        def fill() -> None:
            for _ in range(100_000):  # far more than a pipe's 64 KiB
                log.write({"pad": "x" * 100})
            done.set()

        threading.Thread(target=fill, daemon=True).start()
        assert done.wait(30), "a write to a full pipe blocked the step thread"
        assert log._file is None
    finally:
        os.close(reader)


@pytest.mark.parametrize("target", ["/dev/full", "/proc/self/status", "dir", "missing/dir/f"])
def test_unwritable_targets_turn_the_log_off(tmp_path, target) -> None:
    path = target if target.startswith("/") else str(tmp_path / target)
    if target == "dir":
        os.mkdir(path)
    log = _opened_within(path)
    log.write({"a": 1, "nan": float("nan")})
    log.write({"a": 2})
    assert log._file is None
