"""The events of a streamed background response on their way to its client.

The run goes on whatever the client does (that is what ``background`` means), so it never
waits for the client: the relay holds at most ``limit`` events the client has not read. A
client that falls further behind (it stopped reading but keeps the connection) is cut off:
it gets one last event saying so (``cut_event``) and the end of the stream, while the run
goes on to its stored end (GET /v1/responses/{id}). Once the client has left, or was cut
off, nothing more is queued. Before this bound the queue held every event of the run for a
client that stopped reading (review9, finding 3).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

# Events a client may fall behind before it is cut off: a response's deltas are one event per
# detokenized piece, so this is a few thousand tokens of output, a few hundred KB at most.
MAX_EVENTS_BEHIND = 4096


class EventRelay:
    """A bounded one-way queue of SSE events: ``put`` never blocks, ``events()`` reads them."""

    def __init__(self, cut_event: Callable[[int], str], limit: int = MAX_EVENTS_BEHIND) -> None:
        """``cut_event(limit)``: the last event of a client cut off for falling ``limit``
        events behind."""
        if limit < 1:
            raise ValueError("an event relay needs room for at least one event")
        self.limit = limit
        self._cut_event = cut_event
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.open = True  # False once the client left, was cut off, or the stream ended
        self.cut = False  # the client fell ``limit`` events behind and was cut off

    @property
    def behind(self) -> int:
        """Events queued and not yet read by the client."""
        return self._queue.qsize()

    def put(self, event: str) -> None:
        """Queue ``event`` for the client (dropped once the relay is closed)."""
        if not self.open:
            return
        if self._queue.qsize() >= self.limit:
            self.open = False
            self.cut = True
            self._queue.put_nowait(self._cut_event(self.limit))
            self._queue.put_nowait(None)
            return
        self._queue.put_nowait(event)

    def end(self) -> None:
        """The run ended: the stream ends after the events queued."""
        if self.open:
            self.open = False
            self._queue.put_nowait(None)

    async def events(self) -> AsyncIterator[str]:
        """The events in order, up to the stream's end (or the cut-off)."""
        try:
            while (event := await self._queue.get()) is not None:
                yield event
        finally:  # the client left (or the stream ended): queue nothing more, free the rest
            self.open = False
            while not self._queue.empty():
                self._queue.get_nowait()
