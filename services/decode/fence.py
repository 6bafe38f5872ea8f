"""The decode side's question to a prefill worker before it reuses the blocks of a reservation
released unclaimed: "write nothing more into them, and say when nothing you wrote can still
land" (its FenceKVPush call, see services/prefill/kv_sender.py ``KVSender.fence``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from services.common.grpc_utils import GrpcTLS, channel
from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc

# One call's limit: the prefill worker answers within its own wait (FENCE_WAIT_S) or the
# process does not run (stopped, hung, cut off); the caller asks again.
FENCE_CALL_S = 10.0
FENCE_WAIT_S = 5.0

# (writer's gRPC address, request id, reservation deadline as time.time()) -> returns once
# fenced; WriterGone; anything else: ask again.
Fence = Callable[[str, str, float], Awaitable[None]]


class WriterGone(Exception):
    """The writer's process is gone (its port refuses connections): its sockets closed with
    it, so none of its writes can land any more."""


def grpc_fence(tls: GrpcTLS | None = None, call_s: float = FENCE_CALL_S) -> Fence:
    """A ``Fence`` over the prefill worker's gRPC server (mutual TLS when ``tls``), each call
    given ``call_s``."""

    async def fence(address: str, request_id: str, deadline_unix: float) -> None:
        request = pb.FenceKVPushRequest(
            request_id=request_id, deadline_unix_ms=int(deadline_unix * 1000)
        )
        async with channel(address, tls) as ch:
            try:
                await pb_grpc.WorkerServiceStub(ch).FenceKVPush(request, timeout=call_s)
            except grpc.aio.AioRpcError as e:
                # NOTE: only a refused connection proves the process gone; a timeout is also
                # what a stopped process or a partition looks like, and both may still
                # deliver writes later.
                if e.code() == grpc.StatusCode.UNAVAILABLE and "refused" in (e.details() or ""):
                    raise WriterGone(e.details()) from None
                raise

    return fence
