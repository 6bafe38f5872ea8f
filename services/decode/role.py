"""Decode role of a worker: reserve KV blocks, expose them to the prefill worker's writes,
then decode from the first token the prefill worker sampled."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Collection, Sequence

import torch

from services.common.convert import (
    layout_to_proto,
    logprobs_from_proto,
    params_from_proto,
    resume_from_proto,
)
from services.common.proto import worker_pb2 as pb
from services.common.role import Role
from services.decode.kv_receiver import KVReceiver, Reservation
from services.engine.async_engine import AsyncLLMEngine
from services.engine.kv_layout import KVLayout
from services.engine.multimodal import ImageInputs
from services.engine.outputs import RequestOutput
from services.engine.speculative import handoff
from services.engine.speculative.handoff import DraftStates

logger = logging.getLogger(__name__)


class TPSizeMismatch(Exception):
    """A Reserve from a prefill worker of another tensor-parallel size: its rank i could not
    write into this worker's rank i (FAILED_PRECONDITION: the router tries another pair)."""


class DecodeRole(Role):
    name = "decode"

    def __init__(
        self,
        engine: AsyncLLMEngine,
        receiver: KVReceiver,
        session_id: str,
        rank_caches: Sequence[tuple[str, KVLayout]] = (),
    ) -> None:
        self.engine = engine
        self.receiver = receiver
        self.session_id = session_id  # rank 0's Mooncake session
        # (Mooncake session, KV layout) of tensor-parallel ranks 1..N-1, which the prefill
        # worker's ranks write into (services/prefill/rank_push.py).
        self.rank_caches = list(rank_caches)

    def start(self) -> None:
        self.receiver.start()

    async def stop(self) -> None:
        await self.receiver.stop()

    def held(self) -> Collection[str]:
        """The requests whose KV blocks are reserved here (made, not yet claimed or freed)."""
        return self.receiver.reservations.keys()

    async def release_held(self) -> None:
        for rid in list(self.receiver.reservations):
            with contextlib.suppress(Exception):
                await self.release(rid)

    async def reserve(self, request: pb.ReserveRequest) -> pb.ReserveResponse:
        size = len(self.rank_caches) + 1
        writer = request.writer_tensor_parallel_size
        if writer and writer != size:
            raise TPSizeMismatch(
                f"tensor-parallel size mismatch: the prefill worker has {writer} ranks and this "
                f"decode worker {size}; PD needs the same size on both sides"
            )
        params = params_from_proto(request.params)
        r = await self.receiver.reserve(
            request.request_id,
            list(request.prompt_token_ids),
            params,
            resume_from_proto(request),
            image_keys(request.images),
            request.writer_address,
            request.lora,
        )
        resp = pb.ReserveResponse(
            session_id=self.session_id,
            layout=layout_to_proto(self.receiver.layout),
            block_ids=r.target_ids,
            cached_tokens=r.cached_tokens,
            deadline_ms=max(1, int((r.deadline - time.monotonic()) * 1000)),
            deadline_unix_ms=int(r.deadline_unix * 1000),
            tp_ranks=[
                pb.RankKV(session_id=session, layout=layout_to_proto(layout))
                for session, layout in self.rank_caches
            ],
        )
        if r.states_region is not None and self.receiver.states is not None:
            self.receiver.states.target(r.states_region, resp.draft_target)
        return resp

    def decode(self, request: pb.DecodeRequest) -> AsyncIterator[RequestOutput]:
        """Claim the reservation (KeyError if gone) and stream the request's outputs. A first
        token outside the vocabulary is a ValueError before the claim: the reservation stays
        (released or expired as any other), and no forward pass fails on it (nine such
        requests in a row ended the engine as one at fault)."""
        self.engine.check_output_tokens([request.first_token_id], "first_token_id")
        r = self.receiver.claim(request.request_id)
        return self._decode(r, request, self._draft_states(r, request))

    def _draft_states(self, r: Reservation, request: pb.DecodeRequest) -> DraftStates | None:
        """An EAGLE-3 head's inputs from the prefill side: read from the reservation's region
        (pushed with the KV, landed since Prefill returned) or from the request (through the
        router); None when there are none, or on a malformed one (only the drafts suffer).
        The region is freed here, whatever comes: nothing writes it once claimed."""
        arena, region, r.states_region = self.receiver.states, r.states_region, None
        try:
            if not request.HasField("draft_states"):
                return None
            msg = request.draft_states
            if not msg.pushed:
                states = handoff.from_proto(msg)
            elif arena is None or region is None:
                raise ValueError("draft states pushed, but no region was reserved for them")
            else:
                states = arena.take(region, int(msg.start), list(msg.tokens))
            if arena is not None:
                arena.handoffs["push" if msg.pushed else "grpc"] += 1
            return states
        except ValueError as exc:
            logger.warning("request %s: %s", request.request_id, exc)
            return None
        finally:
            if arena is not None:
                arena.free(region)

    async def _decode(
        self, r: Reservation, request: pb.DecodeRequest, states: DraftStates | None
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
            request.request_id, request.first_token_id, first_lp, states
        ):
            yield out

    async def release(self, request_id: str) -> bool:
        if request_id not in self.receiver.reservations:
            return False
        await self.receiver.release(request_id)
        return True


def image_keys(images: Sequence[pb.ImageData]) -> ImageInputs | None:
    """Grids and hashes of a request's images, no pixels (a PD decode worker's view of them:
    enough to hash the prompt's blocks); None for text. NOTE: here, not in
    services/common/convert.py, because it builds a tensor and the router must not load torch."""
    if not images:
        return None
    if any(len(i.grid_thw) != 3 for i in images):
        raise ValueError("each image's grid_thw must have 3 values (t, h, w)")
    grid = torch.tensor([list(i.grid_thw) for i in images], dtype=torch.long).reshape(-1, 3)
    return ImageInputs(None, grid, content_hashes=[i.hash for i in images])
