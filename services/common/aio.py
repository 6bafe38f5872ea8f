"""asyncio helpers shared by the services' background loops."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

# How long a stop waits for a cancelled task to end before cancelling it again, and then
# giving up on it: a task that swallows its cancellation (library code waiting on a peer)
# must not hang the stop of the whole process.
STOP_WAIT_S = 5.0


async def cancel_and_wait(*tasks: asyncio.Task | None, timeout: float = STOP_WAIT_S) -> None:
    """Cancel ``tasks`` (None entries are skipped) and wait until each has ended: the stop
    of a background loop. An exception other than the cancellation propagates. A task still
    running ``timeout`` seconds after its cancel is cancelled once more, and after a further
    second it is left behind with a warning."""
    live = [t for t in tasks if t is not None]
    if not live:
        return
    for t in live:
        t.cancel()
    _, pending = await asyncio.wait(live, timeout=timeout)
    if pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
        for t in pending:
            log.warning("task %s did not stop %.0f s after its cancel; left behind",
                        t.get_name(), timeout + 1.0)  # fmt: skip
    for t in live:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
