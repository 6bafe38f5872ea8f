"""What each engine step computed, one line a step, for finding out how a served load is batched.

Off unless ``EPDSERVE_STEP_TRACE`` names a path prefix: each engine process then writes
``<prefix>.<pid>`` (tab-separated, a header line first) with, per step that ran the model:
when its forward pass started (``time.monotonic()`` seconds), how long the forward pass,
sampling and the output checks took,
its decode rows (sequences past their prompt), prompt tokens, sequences, and the sequences
left waiting after it. That shows, while serving, whether running decodes share steps with
prefill chunks (they then wait for the whole chunk: inter-token latency) and whether requests
run in waves. A line is one small write of the step thread (line-buffered, so a killed
worker's trace is whole up to its last step).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from services.engine.scheduler_output import SchedulerOutput

ENV = "EPDSERVE_STEP_TRACE"
HEADER = "start_s\tstep_s\tdecode_rows\tprompt_tokens\tseqs\twaiting\n"


class StepTrace:
    """Appends one line per step to an open file."""

    def __init__(self, path: str) -> None:
        self._file: TextIO = open(path, "w", buffering=1)  # noqa: SIM115 - closed by close()
        self._file.write(HEADER)
        self._started = 0.0
        self._rows = self._prompt = 0

    @classmethod
    def from_env(cls) -> StepTrace | None:
        prefix = os.environ.get(ENV)
        return cls(f"{prefix}.{os.getpid()}") if prefix else None

    def before(self, sched: SchedulerOutput) -> None:
        """Note the step's composition; call after ``schedule``, before the counters move."""
        self._started = time.monotonic()
        self._prompt = sched.num_prompt_tokens
        self._rows = sum(
            1 for s in sched.scheduled if s.seq.num_computed_tokens >= s.seq.num_prompt_tokens
        )

    def after(self, sched: SchedulerOutput, waiting: int) -> None:
        now = time.monotonic()
        self._file.write(
            f"{self._started:.4f}\t{now - self._started:.4f}\t{self._rows}\t{self._prompt}\t"
            f"{len(sched.scheduled)}\t{waiting}\n"
        )

    def close(self) -> None:
        self._file.close()
