"""The encode stage of EPD: a request's images go to encoder workers in parallel before the
request goes to prefill (or a mixed worker).

Modes follow from the workers present, per request:

- E+P+D (encoders present): each image is encoded by the least-loaded encoder; the
  encoder keeps the embeddings in registered memory and the router passes only a reference
  (``EmbeddingRef``) on, which the prefill worker reads with Mooncake.
- EP+D and mixed (no encoder): images go on as encoded bytes and the prefill (or mixed)
  worker runs the vision tower itself.

A failed encoder call is retried on another encoder; when none is left the image goes on
without a reference and the worker encodes it (so an encoder dying under load costs time,
not the request). The images' bytes always travel with the request for the same reason:
the prefill worker falls back to them if an encoder vanished before its embeddings were read.
An encoder that died or hung on the request counts towards making it poison as any worker
does (poison.py): an image that kills what encodes it stops at the second worker it killed,
encoder or not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc

from services.common.proto import worker_pb2 as pb
from services.router.errors import APIError
from services.router.routing.poison import PoisonTracker
from services.router.routing.retry import never_connected, worker_died
from services.router.routing.watch import WorkerLost, watched_unary
from services.router.routing.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)


def image_keys(images: Sequence[pb.ImageData]) -> list[pb.ImageData]:
    """Hash and grid of each image, without bytes or references: what a decode worker needs
    (prefix-cache hashes, M-RoPE positions of generated tokens)."""
    return [pb.ImageData(hash=i.hash, grid_thw=i.grid_thw) for i in images]


class EncodeStage:
    # Encoders tried for one image before the worker is left to encode it.
    ATTEMPTS = 2

    def __init__(self, pool: WorkerPool, timeout_s: float, poison: PoisonTracker) -> None:
        self.pool = pool
        self.timeout_s = timeout_s
        self.poison = poison

    async def run(
        self, model: str, request_id: str, images: Sequence[pb.ImageData]
    ) -> list[pb.ImageData]:
        """The images with embedding references where an encoder computed them."""
        if not images or not self.pool.candidates("encode", model):
            return list(images)
        return list(
            await asyncio.gather(
                *(
                    self._encode_one(model, f"{request_id}-img{i}", img)
                    for i, img in enumerate(images)
                )
            )
        )

    async def _encode_one(self, model: str, rid: str, image: pb.ImageData) -> pb.ImageData:
        tried: set[str] = set()
        for _ in range(self.ATTEMPTS):
            candidates = [h for h in self.pool.candidates("encode", model) if h.id not in tried]
            if not candidates:
                break
            handle = min(candidates, key=lambda h: (h.inflight, h.id))
            tried.add(handle.id)
            ref = await self._call(handle, rid, image)
            if ref is not None:
                out = pb.ImageData()
                out.CopyFrom(image)
                out.embedding.CopyFrom(ref)
                return out
        log.warning("no encoder could encode %s; the prefill worker will", rid)
        return image

    async def _call(
        self, handle: WorkerHandle, rid: str, image: pb.ImageData
    ) -> pb.EmbeddingRef | None:
        """The encoder's reference, or None when the encoder failed (it is then taken out of
        routing if unreachable); a bad image is the client's fault: 400; the poison APIError
        when the encoder's death makes the request poison."""
        handle.inflight += 1
        self.poison.note_current_placement(handle.process)
        try:
            resp = await watched_unary(
                handle,
                handle.stub.Encode(
                    pb.EncodeRequest(
                        request_id=rid, images=[image], role_epoch=handle.info.role_epoch
                    ),
                    timeout=self.timeout_s,
                ),
                self.timeout_s,
            )
        except WorkerLost as exc:
            log.warning("encoder %s stopped answering for %s: %s", handle.id, rid, exc)
            handle.mark_failed()
            self.poison.note_current_death(handle.process, handle.alive_at)
            return None
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise APIError(400, exc.details() or "bad image", code="invalid_image") from None
            log.warning("encoder %s failed %s: %s %s", handle.id, rid, exc.code().name,
                        exc.details())  # fmt: skip
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                handle.mark_failed()
            if worker_died(exc) and not never_connected(exc):
                self.poison.note_current_death(handle.process, handle.alive_at)
            return None
        finally:
            handle.end_request(0)  # an image, not a prompt
        return resp.embeddings[0]
