"""The rank processes of a tensor-parallel engine: started and watched by the driver (rank 0,
the engine's own process), fed each step's batch, stopped with it.

Each rank process builds a ``ModelRunner`` of its shard (tp_shard.py) and runs every batch the
driver runs, in the same order, so that their collectives meet. The batch travels as a plain
snapshot over a pipe (the sequences' new tokens, positions and block tables), never as
Sequences; sampling happens once, on the driver, from the gathered logits.

A rank that dies takes the group down: the driver's next collective fails at once (gloo:
"connection closed by peer"), and the watcher marks the group dead so that an idle engine
dies too (``LLMEngine.check_health``); a rank whose driver is gone exits by itself.

Code above the engine runs its own parts on every rank with ``RankProcesses.call`` / ``post``:
a module-level function (sent by reference, so the engine imports none of it) called with the
rank's ``RankContext``, in the pipe's order with the batches (PD's per-rank KV push sets the
rank's layer hook this way: services/prefill/rank_push.py).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from services.common.sched_slice import default_slice_meanwhile
from services.engine.config import EngineConfig
from services.engine.distributed import RankFailure, TPGroup, create_store, join_group
from services.engine.eplb import ExpertPlacement, load_placements
from services.engine.model_runner import ModelRunner
from services.engine.platforms import get_device
from services.engine.scheduler_output import ScheduledSeq
from services.engine.tp_rank_process import (
    RankCall,
    SeqView,
    device_of_rank,
    rank_process,
    threads_per_rank,
)

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # loading a large checkpoint on every rank


def snapshot(scheduled: list[ScheduledSeq]) -> list[tuple[SeqView, int, list[int]]]:
    """The batch as a rank reads it: each sequence's view, its new tokens' count and its draft
    tokens (speculative decoding: every rank verifies the same drafts, so that their
    collectives meet; a rejected draft's KV needs no rollback on any rank, see
    ``Speculator.accept``)."""
    out = []
    for s in scheduled:
        seq, start = s.seq, s.seq.num_computed_tokens
        tail = list(seq.token_ids[start : start + s.num_known_tokens])
        view = SeqView(seq.request_id, seq.seq_id, start, seq.num_prompt_tokens,
                       seq.num_tokens, list(seq.block_table), start, tail, seq.lora)  # fmt: skip
        out.append((view, s.num_new_tokens, list(s.draft_token_ids)))
    return out


class RankProcesses:
    """Ranks 1..N-1 of the driver's group. ``group`` is the driver's own rank 0."""

    def __init__(
        self,
        config: EngineConfig,
        hf_config: Any,
        model_path: str,
        max_len: int,
        placements: list[ExpertPlacement] | None = None,
    ) -> None:
        n = config.tensor_parallel_size
        # The model's KV heads (a rank holds its share: tp_shard.py), for whole-block KV.
        self.num_kv_heads = int(getattr(hf_config, "num_key_value_heads", None)
                                or hf_config.num_attention_heads)  # fmt: skip
        store = create_store(n)
        ctx = mp.get_context("spawn")
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        self.dead: str | None = None
        self._closing = False
        self._send_lock = threading.Lock()  # the step thread and callers share the pipes
        # Answers of calls in flight: call id -> {rank: (ok, value)}, under _answered.
        self._answers: dict[int, dict[int, tuple[bool, Any]]] = {}
        self._answered = threading.Condition()
        self._next_call = 0
        self._lost: str | None = None  # a rank's pipe closed (it exited or is exiting)
        for rank in range(1, n):
            parent, child = ctx.Pipe()
            args = (rank, n, store.port, config, hf_config, model_path, max_len, placements, child)
            proc = ctx.Process(target=rank_process, args=args, daemon=True,
                               name=f"epdserve-tp-rank{rank}")  # fmt: skip
            with default_slice_meanwhile():  # a rank computes as the step thread does
                proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        if config.device_type == "cpu":
            torch.set_num_threads(threads_per_rank(n))
        self.group: TPGroup = join_group(store, 0, n, get_device(device_of_rank(config, 0)))
        self._store = store  # NOTE: kept alive: the ranks' stores talk to it

    def wait_ready(self) -> None:
        """Block until every rank built its runner (or raise when one failed)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs, strict=True), 1):
            while not conn.poll(0.2):
                if not proc.is_alive() or time.monotonic() > deadline:
                    self.close()
                    raise RankFailure(f"tensor-parallel rank {rank} failed to start "
                                      f"(exit code {proc.exitcode})")  # fmt: skip
            msg = conn.recv()
            if msg != "ready":
                self.close()
                raise RankFailure(f"tensor-parallel rank {rank} failed to start: {msg}")
        threading.Thread(target=self._watch, name="tp-rank-watch", daemon=True).start()
        for rank, conn in enumerate(self.conns, 1):
            threading.Thread(target=self._read, args=(rank, conn), daemon=True,
                             name=f"tp-rank{rank}-answers").start()  # fmt: skip

    def _read(self, rank: int, conn: Any) -> None:
        """Collect one rank's answers to calls, until its pipe closes."""
        while True:
            try:
                call_id, ok, value = conn.recv()
            except (OSError, EOFError):
                break
            except Exception:  # noqa: BLE001 - an answer that does not unpickle: its caller times out
                logger.exception("rank %d: unreadable answer", rank)
                continue
            with self._answered:
                if call_id in self._answers:
                    self._answers[call_id][rank] = (ok, value)
                    self._answered.notify_all()
        with self._answered:  # the watcher says why (exit code); calls stop waiting now
            self._lost = self._lost or f"tensor-parallel rank {rank} is gone (its pipe closed)"
            self._answered.notify_all()

    def call(
        self, fn: Callable[..., Any], *args: Any, timeout: float, background: bool = False
    ) -> list[Any]:
        """``fn(context, *args)`` on every rank (see ``RankCall``): their results in rank
        order. Raises what a rank's call raised, or RankFailure when a rank is gone or does
        not answer within ``timeout`` seconds."""
        with self._answered:
            self._next_call += 1
            call_id = self._next_call
            self._answers[call_id] = {}
        try:
            self.command(RankCall(call_id, fn, args, background))
            with self._answered:
                self._answered.wait_for(
                    lambda: len(self._answers[call_id]) == len(self.conns) or self._lost, timeout
                )
                answers = self._answers[call_id]
        finally:
            with self._answered:
                self._answers.pop(call_id, None)
        if len(answers) < len(self.conns):
            raise RankFailure(self.dead or self._lost or f"tensor-parallel ranks did not answer "
                              f"{fn.__name__} within {timeout:.0f} s")  # fmt: skip
        for ok, value in answers.values():
            if not ok:
                raise value
        return [answers[rank][1] for rank in sorted(answers)]

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(context, *args)`` on every rank, between two batches; no answer (a failure is
        logged by the rank)."""
        self.command(RankCall(None, fn, args))

    def _watch(self) -> None:
        while not self._closing:
            for rank, proc in enumerate(self.procs, 1):
                if not proc.is_alive() and not self._closing:
                    self.dead = f"tensor-parallel rank {rank} exited (code {proc.exitcode})"
                    logger.error("%s: the worker's rank group is down", self.dead)
                    self.close()
                    return
            time.sleep(0.2)

    def check(self) -> None:
        if self.dead is not None:
            raise RankFailure(self.dead)

    def send(self, scheduled: list[ScheduledSeq]) -> None:
        """Hand this step's batch to every rank (the driver then runs it too)."""
        self.command(snapshot(scheduled))

    def command(self, msg: object) -> None:
        """Send ``msg`` (a batch, or a ("place", placements) command) to every rank."""
        self.check()
        try:
            with self._send_lock:
                for conn in self.conns:
                    conn.send(msg)
        except (OSError, EOFError) as exc:
            raise RankFailure(f"a tensor-parallel rank is gone: {exc}") from exc

    def close(self) -> None:
        """Stop the ranks (they exit on the None message, or are killed)."""
        self._closing = True
        for conn in self.conns:
            try:
                with self._send_lock:
                    conn.send(None)
            except (OSError, EOFError):
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


def make_runner(
    config: EngineConfig,
    hf_config: Any,
    model_path: str,
    max_len: int,
    pooling_hook: Callable[[torch.nn.Module], None] | None = None,
) -> ModelRunner:
    """The engine's runner (rank 0) and, with ``tensor_parallel_size`` > 1, its other ranks
    (started, loaded and ready: ``runner.ranks``)."""
    if config.tensor_parallel_size == 1:
        return ModelRunner(config, hf_config, model_path, max_len, pooling_hook)
    if pooling_hook is not None:
        raise ValueError("pooling models are not supported with tensor_parallel_size > 1")
    # NOTE: read once, here: every rank must hold the same placement, even if the file
    # changes while they start (workers may share it).
    placements = load_placements(config.eplb_placement) if config.eplb_placement else None
    ranks = RankProcesses(config, hf_config, model_path, max_len, placements)
    try:
        runner = ModelRunner(config, hf_config, model_path, max_len, tp=ranks.group,
                             placements=placements)  # fmt: skip
        ranks.wait_ready()
    except BaseException:
        ranks.close()
        raise
    runner.ranks = ranks
    if runner.lora is not None:
        runner.lora.ranks = ranks  # adapters added or removed later go to every rank
    return runner
