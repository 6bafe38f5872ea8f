"""A tensor-parallel rank's own process (ranks 1..N-1): it joins the driver's group, builds
the runner of its shard and runs, in the pipe's order, each batch snapshot (``SeqView``s) and
each call (``RankCall``) the driver sends (services/engine/tp_ranks.py starts and feeds it),
until a None message or the driver's end.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import threading
from collections.abc import Callable
from typing import Any

import torch

from services.common.fast_exit import exit_now
from services.engine.config import EngineConfig
from services.engine.distributed import join_group
from services.engine.eplb import ExpertPlacement
from services.engine.expert_balance import place_experts
from services.engine.model_runner import ModelRunner
from services.engine.platforms import get_device
from services.engine.scheduler_output import ScheduledSeq

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SeqView:
    """What a rank's runner (and its layer hook) reads of a sequence; ``token_ids`` from
    ``start`` on only."""

    request_id: str
    seq_id: int
    num_computed_tokens: int
    num_prompt_tokens: int
    num_tokens: int
    block_table: list[int]
    start: int
    tail: list[int]
    lora: str | None  # the sequence's LoRA adapter (every rank holds its own cut of it)

    @property
    def token_ids(self) -> _Tail:
        return _Tail(self.start, self.tail)


class _Tail:
    """A list read with absolute indices from ``start`` on."""

    def __init__(self, start: int, tokens: list[int]) -> None:
        self.start, self.tokens = start, tokens

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return self.tokens[i.start - self.start : i.stop - self.start]
        return self.tokens[i - self.start]


@dataclasses.dataclass
class RankContext:
    """What a function run on a rank (``RankProcesses.call``) gets: the rank's runner, the
    layer hook its batches run with, and state kept between calls."""

    rank: int
    runner: ModelRunner
    layer_hook: Callable[[int, list[ScheduledSeq]], None] | None = None
    state: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RankCall:
    """``fn(context, *args)`` on every rank; the rank answers ``(call_id, ok, value)`` unless
    ``call_id`` is None. ``background``: run on a thread of its own (a call that waits), else
    between two batches, in the pipe's order."""

    call_id: int | None
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    background: bool = False


def device_of_rank(config: EngineConfig, rank: int) -> str:
    """cuda:N / npu:N: rank r takes the device r after the configured one; cpu stays cpu."""
    if config.device_type == "cpu":
        return "cpu"
    base = int(config.device.split(":")[1]) if ":" in config.device else 0
    return f"{config.device_type}:{base + rank}"


def threads_per_rank(size: int) -> int:
    return max(1, (os.cpu_count() or 1) // size)


def rank_process(*args: Any) -> None:
    """A rank process: ``rank_main``, then the end without the interpreter's teardown, which
    ``close()`` would wait for (services/common/fast_exit.py)."""
    rank_main(*args)
    exit_now(0)


def rank_main(rank: int, size: int, port: int, config: EngineConfig, hf_config: Any,
              model_path: str, max_len: int, placements: list[ExpertPlacement] | None,
              conn: Any) -> None:  # fmt: skip
    """A rank process: build the shard's runner, then run each batch the driver sends."""

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank{rank} %(message)s")
    driver = os.getppid()
    config = dataclasses.replace(config, device=device_of_rank(config, rank))
    if config.device_type == "cpu":
        torch.set_num_threads(threads_per_rank(size))
    try:
        group = join_group(("127.0.0.1", port), rank, size, get_device(config.device))
        runner = ModelRunner(config, hf_config, model_path, max_len, tp=group,
                             placements=placements)  # fmt: skip
        context = RankContext(rank, runner)
        answer = _Answerer(conn)
        conn.send("ready")
        while True:
            if not conn.poll(1.0):
                if os.getppid() != driver:
                    return  # the driver is gone
                continue
            msg = conn.recv()
            if msg is None:
                return
            if isinstance(msg, tuple) and msg[0] == "place":
                place_experts(runner, msg[1])
                continue
            if isinstance(msg, RankCall):
                answer.run(context, msg)
                continue
            runner.execute([_scheduled(*item) for item in msg], context.layer_hook)
    except (EOFError, KeyboardInterrupt):
        return
    except BaseException:
        logger.exception("tensor-parallel rank %d failed", rank)
        os._exit(1)


class _Answerer:
    """Runs a rank's calls and sends their answers (from the rank loop and call threads)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def run(self, context: RankContext, call: RankCall) -> None:
        if call.background:
            threading.Thread(target=self._run, args=(context, call), daemon=True).start()
        else:
            self._run(context, call)

    def _run(self, context: RankContext, call: RankCall) -> None:
        try:
            ok, value = True, call.fn(context, *call.args)
        except Exception as exc:  # noqa: BLE001 - the caller raises it
            ok, value = False, exc
            if call.call_id is None:
                logger.exception("rank %d: %s failed", context.rank, call.fn.__name__)
        if call.call_id is None:
            return
        with self.lock:
            try:
                self.conn.send((call.call_id, ok, value))
            except (TypeError, AttributeError, pickle.PicklingError):
                self.conn.send((call.call_id, False, RuntimeError(repr(value))))


def _scheduled(view: SeqView, num_new: int, drafts: list[int]) -> ScheduledSeq:
    return ScheduledSeq(view, num_new, drafts)  # type: ignore[arg-type]
