"""PD with tensor parallelism: every rank of a worker moves its own share of the KV heads.

Rank i of a prefill worker writes its heads' KV into rank i of the decode worker, each rank
from a Mooncake transfer engine of its own that registers its own cache. The alternative, the
driver (rank 0) moving every rank's KV, would first bring the other ranks' KV into its process:
on a GPU that is a copy through the host or a collective per layer, and the driver's one
transfer engine and NIC would carry N times the bytes while the other ranks' sit idle (vLLM's
NIXL and SGLang's Mooncake connectors also give each TP worker its own agent).

The driver keeps the request's bookkeeping (``PrefillRole``); the functions below run on the
other ranks through ``RankProcesses.call`` / ``post`` (services/engine/tp_ranks.py), in the
pipe's order with the batches: a push added before the request's first batch is queued sees
every layer of it, and a wait sent after its last batch finds every write queued.

A decode worker's ranks only register their caches (``setup``); the block ids it reserves are
the same on every rank, and its reply carries each rank's session and layout (``RankKV``).

With KV staging (a cache the transfer engine cannot register) each rank holds two sets of
pinned host slots: one its own pushes allocate from (the prefill role), and one the prefill
worker's rank writes into (the decode role), whose slots the driver's ``KVReceiver`` allocates
and quarantines for every rank (the same slot ids) and copies in on every rank (``stage_in``).
The driver then holds the two sets too, each of half ``--kv-staging-bytes`` (worker/main.py), so
that every rank holds the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.mooncake_agent import MooncakeAgent, MooncakeConfig, TransferError
from services.engine.kv_layout import KVLayout
from services.engine.kv_staging import KVStaging
from services.engine.tp_rank_process import RankContext
from services.engine.tp_ranks import RankProcesses
from services.prefill.kv_sender import KVSender, PushTarget

# Setting up a rank's transfer engine, and the answer of a wait beyond its own timeout.
SETUP_TIMEOUT_S = 60.0
ANSWER_GRACE_S = 5.0


@dataclass(frozen=True)
class RankEndpoint:
    """Where one rank's KV cache can be written: its Mooncake session and cache layout."""

    session_id: str
    layout: KVLayout


@dataclass(frozen=True)
class _Spec:
    """A ``PushTarget`` as it crosses the pipe (the target itself holds a lock)."""

    session: str
    layout: KVLayout
    dst_blocks: list[int]
    skip_blocks: int
    num_tokens: int
    deadline: float  # time.monotonic(): one clock for every process of the host

    @classmethod
    def of(cls, t: PushTarget) -> _Spec:
        return cls(t.session, t.layout, t.dst_blocks, t.skip_blocks, t.num_tokens, t.deadline)

    def target(self) -> PushTarget:
        return PushTarget(self.session, self.layout, self.dst_blocks, self.skip_blocks,
                          self.num_tokens, self.deadline)  # fmt: skip


class RankPushes:
    """The pushes of ranks 1..N-1, driven from the driver (rank 0 pushes with its own
    ``KVSender``). Public surface: ``endpoints``, ``size``, ``add``, ``wait``, ``discard``,
    ``fence``."""

    def __init__(
        self,
        ranks: RankProcesses,
        mooncake: MooncakeConfig,
        block_size: int,
        min_write_bytes: int,
        staging_slots: int = 0,
    ) -> None:
        """``staging_slots``: > 0, the ranks move their KV through that many host staging
        slots each way (the driver's ``KVStaging`` has as many)."""
        self.ranks = ranks
        # Ranks 1..N-1's caches (or receive slots), advertised in this worker's reservations.
        self.endpoints: list[RankEndpoint] = ranks.call(
            _setup, mooncake, block_size, min_write_bytes, staging_slots, timeout=SETUP_TIMEOUT_S
        )

    @property
    def size(self) -> int:
        """The worker's tensor-parallel size."""
        return len(self.endpoints) + 1

    def add(self, request_id: str, targets: list[PushTarget]) -> None:
        """Start pushing into ``targets`` (rank 1's first); before the request is scheduled."""
        self.ranks.post(_add, request_id, [_Spec.of(t) for t in targets])

    def wait(self, request_id: str, timeout: float) -> tuple[int, float]:
        """Once the request finished on the engine: every rank's writes landed (TransferError
        otherwise, as ``KVSender.wait``). Returns the bytes written and the longest rank's
        seconds in writes (the ranks write at the same time)."""
        done = self.ranks.call(
            _wait, request_id, timeout, timeout=timeout + ANSWER_GRACE_S, background=True
        )
        return sum(b for b, _ in done), max((s for _, s in done), default=0.0)

    def discard(self, request_id: str) -> None:
        self.ranks.post(_discard, request_id)

    def stage_in(self, slots: list[int], blocks: list[int]) -> None:
        """Decode role, with staging: every rank's receive slots -> its reserved blocks (in
        the pipe's order: before any batch the request is in)."""
        self.ranks.call(_stage_in, slots, blocks, timeout=SETUP_TIMEOUT_S)

    def fence(self, request_id: str, timeout: float, until_unix: float) -> bool:
        """``KVSender.fence`` on every rank: True once no rank's write can still land."""
        fenced = self.ranks.call(_fence, request_id, timeout, until_unix,
                                 timeout=timeout + ANSWER_GRACE_S, background=True)  # fmt: skip
        return all(fenced)


# ---- run on ranks 1..N-1 ------------------------------------------------------------------


def _sender(ctx: RankContext) -> KVSender:
    sender = ctx.state.get("kv_sender")
    if sender is None:
        raise TransferError(f"rank {ctx.rank} has no KV sender (setup did not run)")
    return sender


def _setup(
    ctx: RankContext,
    mooncake: MooncakeConfig,
    block_size: int,
    min_write_bytes: int,
    staging_slots: int,
) -> RankEndpoint:
    """Register this rank's cache (or its staging slots) with a transfer engine of its own;
    push from its layers."""
    agent = MooncakeAgent(mooncake)
    layout = ctx.runner.layout
    send = receive = None
    if staging_slots:
        cache = ctx.runner.kv_cache
        send = KVStaging(cache, layout.fingerprint, staging_slots, agent.register)
        receive = KVStaging(cache, layout.fingerprint, staging_slots, agent.register)
        ctx.state["kv_staging_in"] = receive
    else:
        agent.register(layout.base_addr, layout.total_bytes)
    sender = KVSender(agent, layout, block_size, min_write_bytes=min_write_bytes, staging=send)
    ctx.state["kv_sender"] = sender
    ctx.state["kv_refused"] = {}  # request id -> why its push was refused here
    ctx.layer_hook = sender.on_layer_done
    return RankEndpoint(agent.session_id, receive.layout if receive is not None else layout)


def _stage_in(ctx: RankContext, slots: list[int], blocks: list[int]) -> None:
    ctx.state["kv_staging_in"].stage_in(slots, blocks)


def _add(ctx: RankContext, request_id: str, specs: list[_Spec]) -> None:
    try:
        _sender(ctx).add(request_id, specs[ctx.rank - 1].target())
    except TransferError as e:  # reported by the wait
        ctx.state["kv_refused"][request_id] = str(e)


def _wait(ctx: RankContext, request_id: str, timeout: float) -> tuple[int, float]:
    refused = ctx.state["kv_refused"].pop(request_id, None)
    if refused is not None:
        raise TransferError(f"rank {ctx.rank}: {refused}")
    try:
        t = _sender(ctx).wait(request_id, timeout)
    except KeyError:
        raise TransferError(f"rank {ctx.rank} has no KV push for {request_id}") from None
    except TransferError as e:
        raise TransferError(f"rank {ctx.rank}: {e}") from None
    return t.bytes, t.seconds


def _discard(ctx: RankContext, request_id: str) -> None:
    ctx.state["kv_refused"].pop(request_id, None)
    _sender(ctx).discard(request_id)


def _fence(ctx: RankContext, request_id: str, timeout: float, until_unix: float) -> bool:
    return _sender(ctx).fence(request_id, timeout, until_unix)
