"""An EAGLE-3 head's inputs handed from the prefill worker to the decode worker (PD) with the
KV: ``DraftStates``, and its form in ``pb.DraftStates`` (the PrefillResponse carries it, the
router passes it on in the DecodeRequest).

Why send them rather than rebuild on the decode side: the head's KV at a position is computed
from the target's hidden states of three layers there, and the decode worker has only the
target's KV, from which no hidden state can be had short of running the target's prefill again.
(A draft model's KV, by contrast, is rebuilt on the decode side from the tokens: draft_model.py.)
What is sent is the three layers' states through the head's ``fc``: ``hidden_size`` values a
position (a third of the raw states; for the default 135M model 2.3 KB a token in float32,
against 46 KB of the target's KV). With them the decode worker's first step runs the head over
the prompt exactly as a co-located worker's first decode step does: the same drafts, the same
acceptance. A request's states are at most ``MAX_BYTES``: a longer prompt sends its last rows
(the head has no KV before them: drafts are worse there, tokens the same). The prefill worker
does not run its head on a request it exports (``Sequence.exports_draft_states``: it keeps
the states of every chunk instead, up to ``MAX_BYTES``); the decode worker runs them at most
a step's token budget a step (``Eagle3Proposer.chunk``), and drafts once they are all run.

How they travel: pushed with the KV through Mooncake into a region the decode worker
reserved for them (states_push.py), the PrefillResponse and DecodeRequest then carrying their
tokens only (``pushed``); or, where the decode worker gave no region (no head, no room), in
those messages through the router, which cost its event loop ~7 ms of CPU per 2,048-token
prompt (4.7 MB parsed and re-serialised; 2026-12-03, load ~22), its memory while the request
is between the two workers, and a hop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from services.common.proto import worker_pb2 as pb

logger = logging.getLogger(__name__)

MAX_BYTES = 16 << 20  # per request: under gRPC's 64 MiB message limit with room to spare
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DraftStates:
    """The head's inputs at positions ``[start, start + len(tokens))``."""

    start: int  # position of the first row
    tokens: list[int]  # the token at each row's position
    hidden: torch.Tensor  # [len(tokens), width], through the head's fc

    def last(self, max_bytes: int = MAX_BYTES) -> DraftStates:
        """Its last rows that fit in ``max_bytes``."""
        row = max(1, self.hidden.shape[1] * self.hidden.element_size())
        keep = min(len(self.tokens), max_bytes // row)
        cut = len(self.tokens) - keep
        return DraftStates(self.start + cut, self.tokens[cut:], self.hidden[cut:])


async def export(
    get: Callable[[], Awaitable[DraftStates | None]], msg: pb.DraftStates
) -> pb.DraftStates | None:
    """``msg`` filled with what ``get`` returns (its last ``MAX_BYTES``), off the event loop;
    None when there is nothing, or on any failure (logged): only the decode side's drafts
    depend on it, never the request, which goes on without."""
    try:
        states = await get()
        if states is None:
            return None
        await asyncio.to_thread(to_proto, states.last(), msg)
        return msg
    except Exception:  # noqa: BLE001 - drafts only: the request must not fail for them
        logger.warning("EAGLE-3 draft states not sent", exc_info=True)
        return None


def to_proto(states: DraftStates, msg: pb.DraftStates) -> None:
    """ValueError for a dtype the message cannot name."""
    hidden = states.hidden.detach().to("cpu").contiguous()
    name = next((n for n, d in DTYPES.items() if d == hidden.dtype), None)
    if name is None:
        raise ValueError(f"draft states of dtype {hidden.dtype} cannot be sent")
    msg.start, msg.width, msg.dtype = states.start, hidden.shape[1], name
    msg.tokens[:] = states.tokens
    msg.hidden = hidden.view(torch.uint8).numpy().tobytes()


def from_proto(msg: Any) -> DraftStates:
    """ValueError for a message that does not describe ``len(tokens)`` rows of ``width``."""
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        raise ValueError(f"draft_states dtype must be one of {sorted(DTYPES)}, got {msg.dtype!r}")
    rows, width = len(msg.tokens), int(msg.width)
    size = torch.empty((), dtype=dtype).element_size()
    if rows == 0 or width == 0 or len(msg.hidden) != rows * width * size:
        raise ValueError(f"draft_states: {len(msg.hidden)} bytes are not {rows} rows of {width} "
                         f"{msg.dtype} values")  # fmt: skip
    hidden = torch.frombuffer(bytearray(msg.hidden), dtype=torch.uint8).view(dtype)
    return DraftStates(int(msg.start), list(msg.tokens), hidden.reshape(rows, width))
