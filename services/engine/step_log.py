"""A JSON-lines trace of the engine's steps for co-location work (``EPDSERVE_STEP_LOG=PATH``).

One line a step: its rows and tokens split into online and offline work (and decodes), the
online decode rows' seq_ids, the measured wall time and step-thread CPU time, the step cost model's prediction, and the
offline budget's decision (the share, the pace's reference and limit). It is how a real run
shows why online TPOT moves when the simulation (benchmarks/colocation_sim.py) says it should
not. Off unless the variable names a file; a file that cannot be written turns it off with one
warning (a trace must never stop an engine).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.engine.scheduler_output import ScheduledSeq

ENV = "EPDSERVE_STEP_LOG"
log = logging.getLogger(__name__)


def split(scheduled: list[ScheduledSeq], offline: set[int]) -> dict[str, Any]:
    """Rows, tokens and decode rows of ``scheduled``, online and offline (``offline``: the
    seq_ids of the offline ones), and the seq_ids of the online decode rows (``on_ids``: a
    request's TPOT can be rebuilt from the steps' CPU times, free of the machine's waits)."""
    out: dict[str, Any] = dict.fromkeys(("on_rows", "on_tokens", "on_decodes", "off_rows",
                                         "off_tokens", "off_decodes"), 0)  # fmt: skip
    out["on_ids"] = []
    out["arr"] = []  # the prompt rows' arrival times (a wave's spread at the worker)
    out["pre_ids"] = []  # their seq_ids (a request's first token: its last prompt step's end)
    for item in scheduled:
        side = "off" if item.seq.seq_id in offline else "on"
        decode = item.seq.num_output_tokens > 0
        if not decode:
            out["arr"].append(round(item.seq.arrival_time, 4))
            out["pre_ids"].append(item.seq.seq_id)
        out[f"{side}_rows"] += 1
        out[f"{side}_tokens"] += item.num_new_tokens
        out[f"{side}_decodes"] += decode
        if decode and side == "on":
            out["on_ids"].append(item.seq.seq_id)
    return out


class StepLog:
    """Appends one JSON object a line to ``path`` (flushed per line: a killed worker keeps
    what it wrote)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: Any = None
        try:
            # NOTE: O_NONBLOCK: a FIFO with no reader made open() block for ever (the worker
            # never started); now that fails, and a reader too slow to keep up turns the log
            # off (BlockingIOError) instead of stalling the step thread. No effect on files.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)
            self._file = open(fd, "a", buffering=1)  # noqa: SIM115 (lives with the engine)
        except OSError as e:
            log.warning("%s=%s cannot be written (%s): no step log", ENV, path, e)

    @classmethod
    def from_env(cls) -> StepLog | None:
        path = os.environ.get(ENV, "")
        return cls(path) if path else None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        with self._lock:
            try:
                self._file.write(json.dumps(record) + "\n")
            except (OSError, ValueError) as e:  # disk full, closed file
                log.warning("step log %s stopped: %s", self.path, e)
                self._file = None
