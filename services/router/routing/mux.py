"""The router's side of GenerateMux: a worker's Generate and PD Decode calls as requests on
one shared bidirectional stream (RouterConfig.worker_mux), the worker's side is worker/mux.py.

``MuxStub.Generate`` and ``MuxStub.Decode`` return a ``MuxCall``, which behaves as the
grpc.aio call it replaces
for everything the router does with one: iterate its messages, ``cancel()`` it (a cancel
frame: the worker aborts the request), its deadline, its status and the failure kind in its
trailing metadata, its done callbacks. So the watchdog (watch.py), the judgement of failures
(retry.py) and migration see the same call. A shared stream that breaks (the worker died,
its channel closed, the stream failed) ends every request on it with UNAVAILABLE and no
failure kind: "died", which migration takes; the next request opens a new stream.

Flow control per request: one slow consumer (a slow HTTP client) must neither hold back the
others on the stream (HTTP/2's window is the whole stream's) nor pile its output up here.
Each request runs at most ``WINDOW`` messages ahead of what its consumer took; the consumer
grants more with a credit frame every ``WINDOW // 2`` messages, so a request of up to that
many messages costs no credit frame at all. A paused request waits on the worker, as a call
of its own waits on a full HTTP/2 window, and its deadline still runs.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from services.common.grpc_utils import FAILURE_KEY
from services.common.proto import worker_pb2 as pb

log = logging.getLogger(__name__)

_CLOSE = object()  # the outbox's item that ends the frames of a stream
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# Messages a request may run ahead of its consumer. A message is one engine step's output of
# the request (its new tokens, logprobs): 256 of them is at most a few hundred KiB.
WINDOW = 256


class MuxCall:
    """One request on a shared stream, with the interface of a grpc.aio unary-stream call."""

    def __init__(self, stream: _Stream, call_id: int, timeout: float | None) -> None:
        self._stream = stream
        self.id = call_id
        self._loop = asyncio.get_running_loop()
        self._messages: collections.deque[pb.GenerateResponse] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._status: tuple[grpc.StatusCode, str, str] | None = None  # code, details, kind
        self._callbacks: list[Callable[[Any], None]] = []
        self._timer = None if timeout is None else self._loop.call_later(timeout, self._expire)
        self._taken = self._credited = 0  # messages the consumer took / granted to the worker

    # -- what the router's code uses of a grpc.aio call --------------------------------
    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]:
        return self

    async def __anext__(self) -> pb.GenerateResponse:
        while not self._messages:
            if self._status is not None:
                if self._status[0] == grpc.StatusCode.OK:
                    raise StopAsyncIteration
                raise self._error()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._taken += 1
        if self._taken - self._credited >= WINDOW // 2 and self._status is None:
            self._credited = self._taken
            self._stream.outbox.put_nowait(pb.MuxRequest(id=self.id, credit=self._taken))
        return self._messages.popleft()

    def cancel(self) -> bool:
        """Give the request up: the worker aborts it. False when it had ended already."""
        if self._status is not None:
            return False
        self._end(grpc.StatusCode.CANCELLED, "Locally cancelled by application!", "")
        self._stream.send_cancel(self.id)
        return True

    def cancelled(self) -> bool:
        return self._status is not None and self._status[0] == grpc.StatusCode.CANCELLED

    def done(self) -> bool:
        return self._status is not None

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._status is not None:
            callback(self)
        else:
            self._callbacks.append(callback)

    async def code(self) -> grpc.StatusCode:
        await self._ended()
        assert self._status is not None
        return self._status[0]

    async def details(self) -> str:
        await self._ended()
        assert self._status is not None
        return self._status[1]

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        await self._ended()
        return self._trailers()

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata()

    # -- fed by the stream -------------------------------------------------------------
    def deliver(self, frame: pb.MuxResponse) -> None:
        if self._status is not None:
            return  # cancelled or expired here: a late frame
        if frame.HasField("message"):
            self._messages.append(frame.message)
        if frame.HasField("end"):
            end = frame.end
            self._end(_CODES.get(end.code, grpc.StatusCode.UNKNOWN), end.details, end.failure_kind)
        self._wake()

    def fail(self, details: str) -> None:
        """The shared stream broke: the worker is gone as far as this request knows."""
        self._end(grpc.StatusCode.UNAVAILABLE, details, "")

    # -- inside --------------------------------------------------------------------------
    def _expire(self) -> None:
        self._timer = None
        if self._status is None:
            self._end(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", "")
            self._stream.send_cancel(self.id)

    def _end(self, code: grpc.StatusCode, details: str, kind: str) -> None:
        if self._status is not None:
            return
        self._status = (code, details, kind)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stream.forget(self.id)
        self._wake()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            self._loop.call_soon(callback, self)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _ended(self) -> None:
        if self._status is None:
            done = self._loop.create_future()

            def wake(_call: object) -> None:
                if not done.done():
                    done.set_result(None)

            self._callbacks.append(wake)
            await done

    def _trailers(self) -> grpc.aio.Metadata:
        assert self._status is not None
        kind = self._status[2]
        return grpc.aio.Metadata((FAILURE_KEY, kind)) if kind else grpc.aio.Metadata()

    def _error(self) -> grpc.aio.AioRpcError:
        assert self._status is not None
        code, details, _ = self._status
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), self._trailers(), details)


class _Stream:
    """One open GenerateMux stream: the frames to send and the requests on it."""

    def __init__(self) -> None:
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.calls: dict[int, MuxCall] = {}
        self.reader: asyncio.Task[None] | None = None

    def send_cancel(self, call_id: int) -> None:
        self.outbox.put_nowait(pb.MuxRequest(id=call_id, cancel=True))

    def forget(self, call_id: int) -> None:
        self.calls.pop(call_id, None)

    async def frames(self) -> AsyncIterator[pb.MuxRequest]:
        while (frame := await self.outbox.get()) is not _CLOSE:
            yield frame


class MuxChannel:
    """The shared GenerateMux stream to one worker, opened at the first request and again
    after it breaks. NOTE: it has no close of its own: closing the worker's channel
    (WorkerHandle.close) cancels the stream, whose reader then fails its requests as died."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub  # the worker's plain WorkerServiceStub
        self._ids = itertools.count(1)
        self._stream: _Stream | None = None

    def start(
        self, request: pb.GenerateRequest | pb.DecodeRequest, timeout: float | None,
        traceparent: str,
    ) -> MuxCall:  # fmt: skip
        stream = self._stream or self._open()
        call = MuxCall(stream, next(self._ids), timeout)
        stream.calls[call.id] = call
        frame = pb.MuxRequest(id=call.id, timeout_s=timeout or 0.0, traceparent=traceparent,
                              window=WINDOW)  # fmt: skip
        if isinstance(request, pb.DecodeRequest):
            frame.decode.CopyFrom(request)
        else:
            frame.start.CopyFrom(request)
        stream.outbox.put_nowait(frame)
        return call

    def _open(self) -> _Stream:
        stream = _Stream()
        call = self._stub.GenerateMux(stream.frames())
        stream.reader = asyncio.get_running_loop().create_task(self._read(stream, call))
        self._stream = stream
        return stream

    async def _read(self, stream: _Stream, call: Any) -> None:
        why = "the worker ended the shared stream"
        try:
            async for batch in call:
                for frame in batch.frames:
                    target = stream.calls.get(frame.id)
                    if target is not None:
                        target.deliver(frame)
        except grpc.aio.AioRpcError as exc:
            why = f"the shared stream to the worker broke: {exc.code().name} {exc.details()}"
        except asyncio.CancelledError:
            # grpc.aio's, when the channel closes under the stream.
            why = "the shared stream to the worker was cancelled (its channel closed)"
        except Exception as exc:  # noqa: BLE001 - whatever broke it, its requests are lost
            why = f"the shared stream to the worker failed: {exc!r}"
        finally:
            if self._stream is stream:
                self._stream = None  # the next request opens a new stream
            stream.outbox.put_nowait(_CLOSE)
            call.cancel()
            lost = list(stream.calls.values())
            for target in lost:
                target.fail(why)
            if lost:
                log.warning("%s; %d request(s) on it fail as died", why, len(lost))


class MuxStub:
    """A worker's stub whose Generate and Decode calls go over the shared stream; the other
    methods are the plain stub's."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub
        self.mux = MuxChannel(stub)

    def __getattr__(self, method: str) -> Any:
        return getattr(self._stub, method)

    def Generate(  # noqa: N802 - gRPC method name
        self, request: pb.GenerateRequest, *, timeout: float | None = None,
        metadata: Any = None, **_: Any,
    ) -> MuxCall:  # fmt: skip
        traceparent = next((str(v) for k, v in metadata or () if k == "traceparent"), "")
        return self.mux.start(request, timeout, traceparent)

    def Decode(  # noqa: N802 - gRPC method name
        self, request: pb.DecodeRequest, *, timeout: float | None = None,
        metadata: Any = None, **_: Any,
    ) -> MuxCall:  # fmt: skip
        traceparent = next((str(v) for k, v in metadata or () if k == "traceparent"), "")
        return self.mux.start(request, timeout, traceparent)
