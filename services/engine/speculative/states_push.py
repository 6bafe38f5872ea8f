"""An EAGLE-3 head's inputs pushed with the KV (PD): the decode worker reserves a region of a
registered host buffer per reservation (``StatesArena``), its address goes to the prefill
worker in the ReserveResponse (``pb.DraftStatesTarget``), and the prefill worker writes the
states there through Mooncake with its KV push, so that the router carries only their tokens
(handoff.py has the states themselves and the gRPC path this one replaces where it can).

NOTE: the region follows its reservation's blocks (services/decode/kv_receiver.py): claimed,
the push has landed and it is read and freed at once; released unclaimed, it is quarantined
with the blocks until the writer fenced its push (or the wait ran out), so that a late write
never lands in another request's states. The prefill side queues the write on the request's
KV push (``KVSender.push_states``), so its deadline and its fence cover it as they cover the
KV. One arena per worker serves both roles: the prefill side copies the states into a region
of its own for the write to read (Mooncake reads registered memory only) and frees it once
the write is over.

When there is no region (no head on the decode side, the arena full, a head of another
width), the states go through the router as before: the decode worker counts each hand-off
by its path (``handoffs``, the metric ``epdserve:spec_decode_draft_states_handoffs``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.engine.speculative.handoff import DTYPES, MAX_BYTES, DraftStates


@dataclass(frozen=True)
class Region:
    """``nbytes`` of the arena from ``offset``."""

    offset: int
    nbytes: int


class StatesArena:
    """A registered host buffer (one a worker) handed out in contiguous regions (first fit, freed regions
    merged with their free neighbours). Thread-safe: the decode side allocates on the event
    loop, the prefill side's regions are freed on the KV sender's thread."""

    def __init__(
        self,
        width: int,
        dtype: torch.dtype,
        nbytes: int,  # --draft-states-bytes: 64 MiB holds 4 prompts at MAX_BYTES
        register: Callable[[int, int], None] | None = None,
    ) -> None:
        name = next((n for n, d in DTYPES.items() if d == dtype), None)
        if name is None or width < 1:
            raise ValueError(f"no draft-states arena for {width} values of {dtype} a row")
        self.width, self.dtype, self.dtype_name = width, dtype, name
        self.row_bytes = width * torch.empty((), dtype=dtype).element_size()
        self.buffer = torch.zeros(nbytes, dtype=torch.uint8)
        self.base_addr = int(self.buffer.data_ptr())
        self.nbytes = nbytes
        self._free: list[Region] = [Region(0, nbytes)]  # by offset
        self._lock = threading.Lock()
        self.handoffs = {"push": 0, "grpc": 0}  # decode side: states taken by each path
        if register is not None:
            register(self.base_addr, nbytes)

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(r.nbytes for r in self._free)

    def allocate_rows(self, rows: int) -> Region | None:
        """A region for the last ``rows`` positions' states (at most ``MAX_BYTES``); None
        when the arena has no room (the states then go through the router)."""
        want = min(rows, MAX_BYTES // self.row_bytes) * self.row_bytes
        if want <= 0:
            return None
        with self._lock:
            for i, r in enumerate(self._free):
                if r.nbytes >= want:
                    if r.nbytes == want:
                        del self._free[i]
                    else:
                        self._free[i] = Region(r.offset + want, r.nbytes - want)
                    return Region(r.offset, want)
        return None

    def free(self, region: Region | None) -> None:
        if region is None:
            return
        with self._lock:
            merged = sorted([*self._free, region], key=lambda r: r.offset)
            out: list[Region] = []
            for r in merged:
                if out and out[-1].offset + out[-1].nbytes > r.offset:
                    raise AssertionError(f"draft-states region {r} freed twice")
                if out and out[-1].offset + out[-1].nbytes == r.offset:
                    out[-1] = Region(out[-1].offset, out[-1].nbytes + r.nbytes)
                else:
                    out.append(r)
            self._free = out

    def addr(self, region: Region) -> int:
        return self.base_addr + region.offset

    def target(self, region: Region, msg: object) -> None:
        """Fill a ``pb.DraftStatesTarget`` with ``region``."""
        msg.addr, msg.capacity = self.addr(region), region.nbytes  # type: ignore[attr-defined]
        msg.width, msg.dtype = self.width, self.dtype_name  # type: ignore[attr-defined]

    def put(self, region: Region, hidden: torch.Tensor) -> int:
        """Copy ``hidden`` (rows x width, this arena's dtype) into ``region``; its bytes."""
        flat = hidden.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1)
        if flat.numel() > region.nbytes:
            raise ValueError(f"{flat.numel()} bytes of draft states, the region holds "
                             f"{region.nbytes}")  # fmt: skip
        self.buffer[region.offset : region.offset + flat.numel()].copy_(flat)
        return int(flat.numel())

    def take(self, region: Region, start: int, tokens: list[int]) -> DraftStates:
        """The states written into ``region`` for the positions from ``start`` whose tokens
        are ``tokens`` (a copy: the region is freed after). ValueError if they overflow it."""
        rows = len(tokens)
        if rows == 0 or rows * self.row_bytes > region.nbytes:
            raise ValueError(f"{rows} rows of draft states do not fit the {region.nbytes}-byte "
                             "region reserved for them")  # fmt: skip
        raw = self.buffer[region.offset : region.offset + rows * self.row_bytes].clone()
        return DraftStates(start, tokens, raw.view(self.dtype).reshape(rows, self.width))


def fits(target: object, states: DraftStates) -> DraftStates | None:
    """``states`` (its last rows that fit) in the form a ``pb.DraftStatesTarget`` asks for;
    None when it asks for another width or a dtype not known here."""
    dtype = DTYPES.get(target.dtype)  # type: ignore[attr-defined]
    width = int(target.width)  # type: ignore[attr-defined]
    if dtype is None or width != states.hidden.shape[1] or not target.capacity:  # type: ignore[attr-defined]
        return None
    cut = DraftStates(states.start, states.tokens, states.hidden.to(dtype))
    cut = cut.last(int(target.capacity))  # type: ignore[attr-defined]
    return cut if cut.tokens else None
