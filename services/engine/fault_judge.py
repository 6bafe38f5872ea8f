"""Whose fault is a failed step: the requests' (they fail alone) or the engine's (it dies).

The rule (vLLM's, with one step more): an exception that escapes a step is the engine's; an
exception while running, sampling or checking one request fails that request alone
(executor.py isolates the culprit). A client controls its own requests, so a run of failed
requests proves nothing about the engine: nine bad requests in one batch, or nine sent one at a
time to an idle worker, used to count as "the engine failing in a row" and ended the worker.

``FaultJudge`` therefore counts *steps*, not requests, and only steps in which every
sequence failed (one sequence that ran and sampled proves the model, the sampler and the
device work). When ``max_failed_steps`` such steps come in a row it does not conclude yet: it
runs a self-check, a one-token greedy request the engine builds itself and no client can
shape, through the same forward pass and sampler. If that passes, the requests were at fault
and the count starts again; if it raises, the engine is broken and ``end_step`` raises, so the
engine reports itself dead and the worker's supervisor restarts it. The count does not decay
with idle time: with the self-check it no longer has to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

# Steps in a row in which every sequence failed before the engine checks itself.
MAX_FAILED_STEPS = 8


class EngineFault(RuntimeError):
    """The engine, not its requests, is at fault: its own self-check failed."""


class FaultJudge:
    """Counts failed steps and decides when the engine is at fault.

    ``failure`` (the callback the executor, the sampler's caller and the pooler get) returns
    a failed request's error text and never raises; ``end_step`` is called once per step that
    ran something, and raises ``EngineFault`` when the self-check fails.
    """

    def __init__(
        self,
        self_check: Callable[[], bool],
        max_failed_steps: int = MAX_FAILED_STEPS,
    ) -> None:
        if max_failed_steps < 1:
            raise ValueError(f"max_failed_steps must be >= 1, got {max_failed_steps}")
        # Runs a request the engine makes itself; raises when the engine cannot serve, returns
        # False when it could not run now (no free KV block): then the next failed step retries.
        self.self_check = self_check
        self.max_failed_steps = max_failed_steps
        self.failed_steps = 0  # steps in a row in which every sequence failed
        self.failures = 0  # request failures in the current step
        self.self_checks = 0  # self-checks run (a number for tests and logs)

    def failure(self, what: str, exc: BaseException) -> str:
        logger.exception("a request failed while %s; ending it alone", what)
        self.failures += 1
        return f"the engine failed {what}: {type(exc).__name__}: {exc}"

    def end_step(self, any_succeeded: bool) -> None:
        """After a step: ``any_succeeded`` when at least one sequence ran (and sampled, if it
        was due to) without failing."""
        failures, self.failures = self.failures, 0
        if any_succeeded or not failures:
            self.failed_steps = 0
            return
        self.failed_steps += 1
        if self.failed_steps < self.max_failed_steps:
            return
        self.self_checks += 1
        try:
            ran = self.self_check()
        except Exception as exc:
            raise EngineFault(
                f"{self.failed_steps} steps in a row failed every request and the engine's own "
                f"self-check failed too: the engine, not the requests, is at fault: {exc!r}"
            ) from exc
        if ran:
            logger.warning("%d steps in a row failed every request, but the engine's self-check "
                           "passed: the requests were at fault", self.failed_steps)  # fmt: skip
            self.failed_steps = 0
