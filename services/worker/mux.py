"""GenerateMux: many Generate (and PD Decode) requests of one router on one bidirectional
stream.

A router with ``worker_mux`` on opens one such stream per worker and starts each request with
a frame on it, not with a call of its own: a call's start costs both sides more CPU than a
message on an open stream. Each request runs exactly as ``Generate`` or ``Decode`` runs it
(the same handler, with a per-request context whose ``abort`` ends that request alone), and
ends with a frame saying what the call's status would have said: code, details and failure
kind. The router's side is services/router/routing/mux.py.

Flow control per request: HTTP/2's window is the whole stream's, so a request whose router
side stopped reading (a slow HTTP client) would hold back every other request on it, or pile
up in the router. Instead each request may run ``window`` messages ahead of the router's
last credit; past that its handler waits (as a call's handler waits on a full HTTP/2 window)
and the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from services.common.grpc_utils import FAILURE_KEY
from services.common.phases import mux_request_span
from services.common.proto import worker_pb2 as pb

log = logging.getLogger(__name__)

_END = object()  # the outbox's last item: the router closed its side, nothing runs
# A message of frames holds what is ready up to about this many bytes (at least one frame):
# a router that read nothing for a while (stopped, starved) must not get one message over
# gRPC's 64 MiB limit, which would fail the whole stream and migrate every request on it.
MAX_BATCH_BYTES = 4 << 20


def _forget(running: dict[int, _Run], i: int, _task: object) -> None:
    running.pop(i, None)


class _Run:
    """One running request of a stream: its task and how far it may run ahead of its reader."""

    def __init__(self, window: int) -> None:
        self.task: asyncio.Task[None] | None = None
        self.window = window  # 0: no limit (a router that sends no credits)
        self.sent = 0  # messages put out, not counting the last (it goes with the end)
        self.credit = 0  # messages the router says it has taken
        self._more = asyncio.Event()

    def grant(self, credit: int) -> None:
        if credit > self.credit:  # a running count: a late or repeated credit is old news
            self.credit = credit
            self._more.set()

    async def room(self) -> None:
        """Wait until the window has room for one more message."""
        while self.window and self.sent - self.credit >= self.window:
            self._more.clear()
            await self._more.wait()


def take_ready(outbox: asyncio.Queue[Any], first: Any, max_bytes: int = MAX_BATCH_BYTES):
    """``first`` and what else is ready in ``outbox``, up to ``max_bytes`` of frames;
    returns (frames, ended): ended when the outbox's ``_END`` was reached."""
    frames: list[pb.MuxResponse] = []
    item, size = first, 0
    while True:
        if item is _END:  # only ever the last item of the outbox
            return frames, True
        frames.append(item)
        size += item.ByteSize()
        if size >= max_bytes or outbox.empty():
            return frames, False
        item = outbox.get_nowait()


class MuxAbort(grpc.aio.AbortError):
    """``MuxContext.abort``: ends one request of the stream with this status. A subclass of
    grpc.aio's AbortError, so that the handlers' status mapping (worker/errors.py) lets it
    through as it lets a real abort through."""

    def __init__(self, code: grpc.StatusCode, details: str, metadata: Any) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.metadata = tuple(metadata or ())


class MuxContext:
    """What a Generate handler uses of its ServicerContext, for one request of a stream."""

    def __init__(self, traceparent: str) -> None:
        self._metadata = (("traceparent", traceparent),) if traceparent else ()

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        raise MuxAbort(code, details, trailing_metadata)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def cancelled(self) -> bool:
        return False


def end_of(exc: BaseException | None) -> pb.MuxEnd:
    """The end frame of a request whose handler ended with ``exc`` (None: it returned)."""
    if exc is None:
        return pb.MuxEnd(code=grpc.StatusCode.OK.value[0])
    if isinstance(exc, MuxAbort):
        kind = next((str(v) for k, v in exc.metadata if k == FAILURE_KEY), "")
        return pb.MuxEnd(code=exc.code.value[0], details=exc.details, failure_kind=kind)
    if isinstance(exc, TimeoutError):
        return pb.MuxEnd(
            code=grpc.StatusCode.DEADLINE_EXCEEDED.value[0], details="Deadline Exceeded"
        )
    # What grpc.aio says of a handler's unexpected exception.
    details = f"Unexpected {type(exc)}: {exc}"
    return pb.MuxEnd(code=grpc.StatusCode.UNKNOWN.value[0], details=details)


class MuxRPCs:
    """The GenerateMux RPC of WorkerServicer (which provides ``Generate`` and ``Decode``)."""

    async def GenerateMux(  # noqa: N802 - gRPC method name
        self, frames: AsyncIterator[pb.MuxRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.MuxFrames]:
        outbox: asyncio.Queue[Any] = asyncio.Queue()
        running: dict[int, _Run] = {}
        started = 0  # the highest id started on this stream

        async def read() -> None:
            nonlocal started
            try:
                async for frame in frames:
                    run = running.get(frame.id)
                    if frame.HasField("start") or frame.HasField("decode"):
                        # The router's ids only grow on a stream (and gRPC keeps their order):
                        # a start at or below the highest is repeated or late, running or
                        # ended, and must not run the request again.
                        if frame.id <= started:
                            continue
                        started = frame.id
                        run = running[frame.id] = _Run(frame.window)
                        run.task = asyncio.create_task(self._mux_one(frame, outbox, run))
                        run.task.add_done_callback(functools.partial(_forget, running, frame.id))
                    elif run is None or run.task is None:
                        continue  # a credit or cancel for a request that has ended
                    elif frame.cancel:
                        run.task.cancel()
                    elif frame.credit:
                        run.grant(frame.credit)
            finally:
                # The router closed its side: end the stream once what runs has ended.
                # NOTE: a task ends by putting its end frame first, so it comes before _END.
                tasks = [run.task for run in running.values() if run.task is not None]
                await asyncio.gather(*tasks, return_exceptions=True)
                outbox.put_nowait(_END)

        reader = asyncio.create_task(read())
        try:
            ended = False
            while not ended:
                # What else is ready goes in the same message, within MAX_BATCH_BYTES.
                batch, ended = take_ready(outbox, await outbox.get())
                if batch:
                    yield pb.MuxFrames(frames=batch)
        finally:
            # The router is gone (cancelled the stream, died, or closed it): nothing of this
            # stream may run on. Each handler's own cleanup aborts its request in the engine.
            reader.cancel()
            tasks = [*(run.task for run in running.values() if run.task is not None), reader]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _mux_one(self, frame: pb.MuxRequest, outbox: asyncio.Queue[Any], run: _Run) -> None:
        """Run one request of a stream; its frames go to ``outbox``, the last with its end.
        Cancelled (the router's cancel frame, or the stream ending): no end is sent."""
        context = MuxContext(frame.traceparent)
        if frame.HasField("decode"):
            request: Any = frame.decode
            gen = self.Decode(request, context)  # type: ignore[attr-defined]
        else:
            request = frame.start
            gen = self.Generate(request, context)  # type: ignore[attr-defined]
        span = mux_request_span(frame.traceparent, request, frame.HasField("decode"))
        first = True
        ended = False  # the end frame went out with the finished message
        error: BaseException | None = None
        try:
            async with asyncio.timeout(frame.timeout_s if frame.timeout_s > 0 else None):
                async for msg in gen:
                    if first and span is not None:
                        span.first_message()
                    first = False
                    if ended:
                        continue  # nothing follows the end
                    if msg.finished:
                        # NOTE: it goes out with the end, one frame for both, now: before the
                        # handler runs on to its own end (its cleanup: ~27 us a request that
                        # delayed the answer). The router's relay ends with this message and
                        # reads no status after it (routing/retry.py, Attempts.relay).
                        end = end_of(None)
                        outbox.put_nowait(pb.MuxResponse(id=frame.id, message=msg, end=end))
                        ended = True
                        await asyncio.sleep(0)  # the stream's writer takes it first
                    else:
                        await run.room()
                        run.sent += 1
                        outbox.put_nowait(pb.MuxResponse(id=frame.id, message=msg))
        except asyncio.CancelledError:
            if span is not None:
                span.end(error="cancelled")
            raise
        except (MuxAbort, TimeoutError) as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - the router's error, as grpc.aio would say it
            log.exception("GenerateMux request %s failed", request.request_id)
            error = exc
        finally:
            with contextlib.suppress(Exception):
                await gen.aclose()
        if span is not None:
            span.end(error=None if error is None else f"{type(error).__name__}: {error}")
        if not ended:
            outbox.put_nowait(pb.MuxResponse(id=frame.id, end=end_of(error)))
        elif error is not None:
            log.warning("GenerateMux request %s failed after its end was sent: %r",
                        request.request_id, error)  # fmt: skip
