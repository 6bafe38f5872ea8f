"""Prefill role of a worker: compute a prompt, push its KV into the decode worker's reserved
blocks (layer by layer, see kv_sender.py), and hand back the first token."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

from services.common.proto import worker_pb2 as pb
from services.engine.async_engine import AsyncLLMEngine
from services.prefill.kv_sender import KVSender, PushTarget
from services.worker.convert import layout_from_proto, logprobs_to_proto, params_from_proto


class PrefillRole:
    def __init__(
        self, engine: AsyncLLMEngine, sender: KVSender, block_size: int, transfer_timeout_s: float
    ) -> None:
        self.engine = engine
        self.sender = sender
        self.block_size = block_size
        self.transfer_timeout_s = transfer_timeout_s

    async def run(self, request: pb.PrefillRequest) -> pb.PrefillResponse:
        """Raises ValueError (bad request), TransferError (push failed) or RuntimeError."""
        rid = request.request_id
        prompt = list(request.prompt_token_ids)
        params = params_from_proto(request.params)
        # The prefill worker samples exactly the first token; stop strings and the rest of
        # the stopping rules are the decode worker's job (it sees every token).
        first_params = dataclasses.replace(
            params, n=1, max_tokens=1, min_tokens=min(params.min_tokens, 1), stop=[]
        )
        target = request.target
        needed = (len(prompt) + self.block_size - 1) // self.block_size
        if len(target.block_ids) < needed:
            raise ValueError(
                f"reservation has {len(target.block_ids)} blocks; the prompt needs {needed}"
            )
        self.sender.add(
            rid,
            PushTarget(
                session=target.session_id,
                layout=layout_from_proto(target.layout),
                dst_blocks=list(target.block_ids),
                skip_blocks=target.cached_tokens // self.block_size,
            ),
        )
        held = False
        try:
            first = None
            cached = 0
            async for out in self.engine.generate(rid, prompt, first_params, hold_kv=True):
                if out.outputs and out.outputs[0].token_ids:
                    first = out.outputs[0]
                    cached = out.num_cached_tokens
                held = out.finished
            if first is None:
                raise RuntimeError("prefill produced no token")
            pushed = await asyncio.to_thread(self.sender.wait, rid, self.transfer_timeout_s)
            resp = pb.PrefillResponse(
                first_token_id=first.token_ids[0], cached_prompt_tokens=cached,
                kv_bytes=pushed.bytes, kv_seconds=pushed.seconds,
            )  # fmt: skip
            if first.logprobs:
                resp.first_logprobs.CopyFrom(logprobs_to_proto(first.logprobs)[0])
            return resp
        finally:
            self.sender.discard(rid)
            if held:
                # The KV is in the decode worker now (or the push failed): free our copy.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.engine.call(lambda e: e.release_held(rid)))
