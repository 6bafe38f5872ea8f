"""Prefill role of a worker: compute a prompt, push its KV into the decode worker's reserved
blocks (layer by layer, see kv_sender.py), and hand back the first token."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from typing import Any

from services.common.convert import (
    layout_from_proto,
    logprobs_to_proto,
    params_from_proto,
    resume_from_proto,
)
from services.common.mooncake_agent import TransferError
from services.common.phases import prefill_computed
from services.common.proto import worker_pb2 as pb
from services.common.role import Role
from services.engine.async_engine import AsyncLLMEngine
from services.engine.speculative import handoff, states_push
from services.engine.speculative.handoff import DraftStates
from services.engine.speculative.states_push import StatesArena
from services.prefill.kv_sender import KVSender, PushTarget
from services.prefill.rank_push import RankPushes

logger = logging.getLogger(__name__)


class PrefillRole(Role):
    name = "prefill"

    def __init__(
        self,
        engine: AsyncLLMEngine,
        sender: KVSender,
        block_size: int,
        transfer_timeout_s: float,
        ranks: RankPushes | None = None,
        states: StatesArena | None = None,
    ) -> None:
        self.engine = engine
        self.sender = sender  # rank 0's push (the whole KV with one rank)
        self.block_size = block_size
        self.transfer_timeout_s = transfer_timeout_s
        self.ranks = ranks  # the other tensor-parallel ranks' pushes
        # With an EAGLE-3 head: what its states are pushed from (states_push.py).
        self.states = states

    def start(self) -> None:
        """Nothing to start: the sender's thread runs from its construction."""

    async def stop(self) -> None:
        self.sender.close()

    async def run(
        self, request: pb.PrefillRequest, inputs: list[int] | dict[str, Any] | None = None
    ) -> pb.PrefillResponse:
        """Raises ValueError (bad request), TransferError (push failed) or RuntimeError.
        ``inputs``: the engine prompt when it is more than the token ids (images)."""
        rid = request.request_id
        prompt = list(request.prompt_token_ids)
        params = params_from_proto(request.params)
        resume = resume_from_proto(request)
        # The prefill worker samples exactly the next token (the first, or the one after a
        # migrated request's outputs); stop strings and the rest of the stopping rules are
        # the decode worker's job (it sees every token).
        done = len(resume.output_token_ids) if resume else 0
        first_params = dataclasses.replace(
            params, n=1, max_tokens=done + 1, min_tokens=min(params.min_tokens, done + 1), stop=[]
        )
        # TransferError for a reservation that does not fit
        targets = self.targets(request.target, len(prompt) + done)
        self.sender.add(rid, targets[0])
        held = False
        try:
            if self.ranks is not None:
                self.ranks.add(rid, targets[1:])
            first = None
            cached = 0
            outputs = self.engine.generate(
                rid,
                inputs or prompt,
                first_params,
                hold_kv=True,
                resume=resume,
                lora=request.lora,
            )
            async for out in outputs:
                if out.outputs and out.outputs[0].token_ids:
                    first = out.outputs[0]
                    cached = out.num_cached_tokens
                held = out.finished
            if first is None:
                raise RuntimeError("prefill produced no token")
            prefill_computed()  # what follows is the push's tail (common/phases.py)
            # Read before the finally below releases the held request (and its states).
            states = await self._draft_states(rid, request.target)
            pushed = await asyncio.to_thread(self.sender.wait, rid, self.transfer_timeout_s)
            kv_bytes, kv_seconds = pushed.bytes, pushed.seconds
            if self.ranks is not None:
                more, seconds = await asyncio.to_thread(
                    self.ranks.wait, rid, self.transfer_timeout_s
                )
                kv_bytes, kv_seconds = kv_bytes + more, max(kv_seconds, seconds)
            resp = pb.PrefillResponse(
                first_token_id=first.token_ids[0], cached_prompt_tokens=cached,
                kv_bytes=kv_bytes, kv_seconds=kv_seconds,
            )  # fmt: skip
            if first.logprobs:
                resp.first_logprobs.CopyFrom(logprobs_to_proto(first.logprobs)[0])
            if states is not None:
                resp.draft_states.CopyFrom(states)
            return resp
        finally:
            self.sender.discard(rid)
            if self.ranks is not None:
                with contextlib.suppress(Exception):  # a dead group ends the worker anyway
                    self.ranks.discard(rid)
            if held:
                # The KV is in the decode worker now (or the push failed): free our copy.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.engine.call(lambda e: e.release_held(rid)))

    async def _draft_states(self, rid: str, target: pb.ReserveResponse) -> pb.DraftStates | None:
        """An EAGLE-3 head's states for the decode worker (before the caller releases the
        held request): pushed into the region the reservation names, with the KV (the
        message then carries their tokens only), or else in the message, through the router.
        None without a head, or on any failure (logged): only the drafts depend on them."""
        get = lambda: self.engine.call(lambda e: e.held_draft_states(rid))  # noqa: E731
        if self.states is None or not target.HasField("draft_target"):
            return await handoff.export(get, pb.DraftStates())
        arena, dst = self.states, target.draft_target
        try:
            states = await get()
            if states is None:
                return None
            cut = states_push.fits(dst, states)
            if cut is not None and await asyncio.to_thread(
                self.sender.push_states, rid, arena, dst.addr, cut
            ):
                return pb.DraftStates(start=cut.start, tokens=cut.tokens, width=dst.width,
                                      dtype=dst.dtype, pushed=True)  # fmt: skip
        except Exception:  # noqa: BLE001 - drafts only: the request must not fail for them
            logger.warning("EAGLE-3 draft states not pushed", exc_info=True)
            return None
        logger.info("request %s: EAGLE-3 draft states go through the router (%s)", rid,
                    "no room to push them from" if cut is not None else "the region does not "
                    "fit them")  # fmt: skip
        return await handoff.export(lambda: _ready(states), pb.DraftStates())

    async def fence(self, request: pb.FenceKVPushRequest, timeout: float) -> bool:
        """See ``KVSender.fence``: True once no write of the request's push can land."""
        until = request.deadline_unix_ms / 1000
        rid = request.request_id
        fenced = await asyncio.to_thread(self.sender.fence, rid, timeout, until)
        if self.ranks is not None:
            fenced = await asyncio.to_thread(self.ranks.fence, rid, timeout, until) and fenced
        return fenced

    def targets(self, target: pb.ReserveResponse, num_tokens: int) -> list[PushTarget]:
        """One push target per tensor-parallel rank (rank i writes into the decode worker's
        rank i) for the KV of ``num_tokens`` tokens; TransferError for a reservation that
        does not fit this worker (another tensor-parallel size, a bad layout or block)."""
        size = self.ranks.size if self.ranks is not None else 1
        if len(target.tp_ranks) + 1 != size:
            raise TransferError(
                f"tensor-parallel size mismatch: the decode worker has "
                f"{len(target.tp_ranks) + 1} ranks and this prefill worker {size}; PD needs "
                "the same size on both sides"
            )
        deadline = write_deadline(target)
        out = []
        for session, layout in [(target.session_id, target.layout)] + [
            (r.session_id, r.layout) for r in target.tp_ranks
        ]:
            try:
                kv_layout = layout_from_proto(layout)
            except ValueError as e:
                raise TransferError(f"invalid reservation from the decode worker: {e}") from None
            t = PushTarget(
                session=session,
                layout=kv_layout,
                dst_blocks=list(target.block_ids),  # the same blocks on every rank
                skip_blocks=target.cached_tokens // self.block_size,
                num_tokens=num_tokens,  # tokens whose KV goes to the decode worker
                deadline=deadline,
            )
            self.sender.check(t)
            out.append(t)
        return out


def write_deadline(target: pb.ReserveResponse) -> float:
    """The ``time.monotonic()`` from which no KV may be written into ``target``: the earlier
    of the decode worker's wall-clock deadline (which counts the time the request spent
    reaching this worker, also while this process was stopped) and its relative one counted
    from now (a clock skew between the hosts cannot stretch the push past it by more than
    the request's transit)."""
    now = time.monotonic()
    deadline = now + target.deadline_ms / 1000 if target.deadline_ms else math.inf
    if target.deadline_unix_ms:
        deadline = min(deadline, now + target.deadline_unix_ms / 1000 - time.time())
    return deadline


async def _ready(states: DraftStates) -> DraftStates:
    return states
