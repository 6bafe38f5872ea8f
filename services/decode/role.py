"""Decode role of a worker: reserve KV blocks, expose them to the prefill worker's writes,
then decode from the first token the prefill worker sampled."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from services.common.proto import worker_pb2 as pb
from services.decode.kv_receiver import KVReceiver, Reservation
from services.engine.async_engine import AsyncLLMEngine
from services.engine.outputs import RequestOutput
from services.worker.convert import (
    layout_to_proto,
    logprobs_from_proto,
    params_from_proto,
    resume_from_proto,
)
from services.worker.image_inputs import image_keys_from_proto


class DecodeRole:
    def __init__(self, engine: AsyncLLMEngine, receiver: KVReceiver, session_id: str) -> None:
        self.engine = engine
        self.receiver = receiver
        self.session_id = session_id

    async def reserve(self, request: pb.ReserveRequest) -> pb.ReserveResponse:
        params = params_from_proto(request.params)
        r = await self.receiver.reserve(
            request.request_id,
            list(request.prompt_token_ids),
            params,
            resume_from_proto(request),
            image_keys_from_proto(request.images),
            request.writer_address,
        )
        return pb.ReserveResponse(
            session_id=self.session_id,
            layout=layout_to_proto(self.receiver.layout),
            block_ids=r.target_ids,
            cached_tokens=r.cached_tokens,
            deadline_ms=max(1, int((r.deadline - time.monotonic()) * 1000)),
            deadline_unix_ms=int(r.deadline_unix * 1000),
        )

    def start(self, request: pb.DecodeRequest) -> AsyncIterator[RequestOutput]:
        """Claim the reservation (KeyError if gone) and stream the request's outputs."""
        return self._decode(self.receiver.claim(request.request_id), request)

    async def _decode(
        self, r: Reservation, request: pb.DecodeRequest
    ) -> AsyncIterator[RequestOutput]:
        try:
            await self.receiver.copy_in(r)
        except BaseException:
            # Not started: nothing else frees the reserved blocks (cancelled included).
            await self.engine.call(lambda e: e.free_reserved(r.request_id))
            raise
        first_lp = (
            logprobs_from_proto(request.first_logprobs)
            if request.HasField("first_logprobs")
            else None
        )
        async for out in self.engine.start_reserved(
            request.request_id, request.first_token_id, first_lp
        ):
            yield out

    async def release(self, request_id: str) -> bool:
        if request_id not in self.receiver.reservations:
            return False
        await self.receiver.release(request_id)
        return True
