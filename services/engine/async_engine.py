"""asyncio front of the engine: requests and commands go in through a queue, the engine steps
on its own thread, outputs come back to per-request asyncio queues.

The step thread never touches a socket (STYLE 8): gRPC servicers call the coroutines here,
and everything that mutates engine state runs on the step thread between two steps.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from services.common.cpus import check_usable, pin_os_thread
from services.common.sched_slice import default_slice
from services.engine import heartbeat
from services.engine.config import EngineConfig
from services.engine.layers.omp_bind import bind_team
from services.engine.llm_engine import LLMEngine
from services.engine.outputs import EngineStats, RequestFailedError, RequestOutput
from services.engine.pooler import Pooler
from services.engine.pooling_params import PoolingOutput, PoolingParams
from services.engine.resume import Resume
from services.engine.sampling_params import SamplingParams
from services.engine.threads import name_os_thread

logger = logging.getLogger(__name__)
T = TypeVar("T")
# The longest wait for a wave's arrivals, in arrival windows (EngineConfig.arrival_window_ms).
ARRIVAL_WINDOWS = 8
# Threads that build structured-output grammars (``prepare``): their own, not the event loop's
# default executor, where KV pushes and fences, KV staging and image preprocessing wait. NOTE:
# a client's slow grammars (seconds each) held every thread of that executor.
GRAMMAR_THREADS = 2


class EngineDeadError(RuntimeError):
    """The step thread died; every pending and future request fails with this."""


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.engine: LLMEngine | None = None
        self._commands: queue.Queue[tuple[Callable[[LLMEngine], Any], asyncio.Future[Any]]] = (
            queue.Queue()
        )
        # Each request's outputs (a pooling request's one PoolingOutput), or the error.
        self._streams: dict[str, asyncio.Queue[Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._dead: BaseException | None = None
        self._wake = threading.Event()
        self._stats: EngineStats | None = None
        # When the step thread began its current pass (a step, a pooling batch, the commands
        # between steps, or an idle wait of at most 50 ms); see ``stalled_s``.
        self._pass_started = time.monotonic()
        # Requests that produced output in the last step: how big the last wave was (a wave of
        # arrivals is awaited only while fewer are here than that; _gather_arrivals).
        self._last_outputs = 0
        # Called on the step thread with each step's outputs (e.g. for KV events); optional.
        self.on_step: Callable[[LLMEngine, list[RequestOutput]], None] | None = None
        self._grammars = ThreadPoolExecutor(GRAMMAR_THREADS, thread_name_prefix="grammar")

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model (off the event loop) and start the step thread."""
        self._loop = asyncio.get_running_loop()
        check_usable(self.config.pinned_cpus, f"cpu_cores {self.config.cpu_cores!r}")
        self.engine = await asyncio.to_thread(LLMEngine, self.config)
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        # Commands queued after the thread's last drain would never be answered.
        self._fail_commands(EngineDeadError("engine shut down"))
        self._grammars.shutdown(wait=False, cancel_futures=True)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def tokenizer(self) -> Any:
        return self._require().tokenizer

    @property
    def model_name(self) -> str:
        return self._require().model_name

    @property
    def max_model_len(self) -> int:
        return self._require().max_model_len

    def check_output_tokens(self, token_ids: list[int], what: str) -> None:
        """ValueError unless every id of ``token_ids`` is in the model's vocabulary (a fixed
        size: safe off the step thread)."""
        self._require().inputs.check_output_tokens(token_ids, what)

    def _require(self) -> LLMEngine:
        if self.engine is None:
            raise RuntimeError("engine not started")
        return self.engine

    # ---- requests ----------------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int] | dict[str, Any],  # a dict: with images (parse_prompt)
        params: SamplingParams,
        hold_kv: bool = False,
        resume: Resume | None = None,
        lora: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream delta outputs of one request until it finishes. Raises ValueError for a bad
        request. If the consumer stops early (client gone), the request is aborted."""
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        self._streams[request_id] = stream
        finished = False
        try:
            await self.prepare(params)
            await self.call(
                lambda e: e.add_request(
                    request_id, prompt_token_ids, params, hold_kv, resume, lora or None
                )
            )
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    finished = True  # the engine already ended it and freed its blocks
                    raise RequestFailedError(item.error)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and self._dead is None and not self._stopping.is_set():
                await self.call(lambda e: e.abort_request(request_id))

    async def pool(
        self, request_id: str, token_ids: list[int], params: PoolingParams
    ) -> PoolingOutput:
        """A pooling model's result for one input (pooler.py). ValueError for a bad input,
        RequestFailedError when the engine failed it alone; cancelled: dropped from the queue."""
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        stream: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[request_id] = stream
        done = False
        try:
            await self.call(lambda e: _pooler(e).add(request_id, token_ids, params))
            item = await stream.get()
            done = True
            if isinstance(item, BaseException):
                raise item
            if item.error is not None:
                raise RequestFailedError(item.error)
            return item
        finally:
            self._streams.pop(request_id, None)
            if not done and self._dead is None and not self._stopping.is_set():
                await self.call(lambda e: _pooler(e).abort(request_id))

    async def prepare(self, params: SamplingParams) -> None:
        """Work a request needs before it can be scheduled, done in a worker thread instead
        of the step thread: compiling its structured-output grammar (the first one also
        builds llguidance's tokenizer, ~1.5 s). ValueError for a grammar that does not
        compile. In threads of its own (GRAMMAR_THREADS), unless the grammar is cached: then
        nothing is left to build, and it must not queue behind grammars being built."""
        so = params.structured_outputs
        if so is not None and not (structured := self._require().structured).prepare_cached(so):
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._grammars, structured.prepare, so)

    async def abort(self, request_id: str) -> None:
        out = await self.call(lambda e: e.abort_request(request_id))
        if out is not None:
            self._deliver([out])

    async def start_reserved(
        self, request_id: str, first_token: int, first_logprobs=None, draft_states=None
    ) -> AsyncIterator[RequestOutput]:
        """Decode side of PD: continue a request whose KV was imported into reserved blocks
        (``draft_states``: an EAGLE-3 head's inputs from the prefill side)."""
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = stream
        finished = False
        try:
            first = await self.call(
                lambda e: e.start_reserved(request_id, first_token, first_logprobs, draft_states)
            )
            item: RequestOutput | BaseException = first
            while True:
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    finished = True  # the engine already ended it and freed its blocks
                    raise RequestFailedError(item.error)
                yield item
                finished = item.finished
                if finished:
                    return
                item = await stream.get()
        finally:
            self._streams.pop(request_id, None)
            if not finished and self._dead is None and not self._stopping.is_set():
                await self.call(lambda e: e.abort_request(request_id))

    def stalled_s(self, now: float | None = None) -> float:
        """Seconds the step thread has gone without progress while it had requests, else 0:
        since it began its current pass or last finished a model layer (heartbeat.py), which
        ever is later. Long for an engine stuck in a step: a tensor-parallel rank stopped or
        hung (rank 0 waits in a collective), a kernel that does not return. A step that is
        only slow (a loaded host: 50 s for a wave's prompts at load 20) moves a layer at a
        time and is not stalled."""
        stats = self._stats
        if stats is None or not (stats.num_running or stats.num_waiting):
            return 0.0
        thread = self._thread
        moved = max(self._pass_started, heartbeat.last_beat(thread.ident if thread else None))
        return (time.monotonic() if now is None else now) - moved

    def stats(self) -> EngineStats:
        """Load snapshot taken by the step thread after its last step (never torn)."""
        if self._stats is None:
            self._stats = self._require().stats()
        return self._stats

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the step thread between two steps and return its result."""
        if self._dead is not None:
            raise EngineDeadError(f"engine died: {self._dead!r}")
        if self._stopping.is_set():
            raise EngineDeadError("engine shut down")  # NOTE: nothing would answer
        assert self._loop is not None, "engine not started"
        fut: asyncio.Future[T] = self._loop.create_future()
        self._commands.put((fn, fut))
        self._wake.set()
        return await fut

    # ---- the step thread ---------------------------------------------------------------------

    def _run(self) -> None:
        name_os_thread("engine-step")
        default_slice()  # long passes: not the loop's short slice (common/sched_slice.py)
        if self.config.pinned_cpus:
            # NOTE: before the first torch op of this thread: the OpenMP team it starts then
            # inherits the mask, and the gRPC/asyncio threads keep the process's CPUs.
            pin_os_thread(self.config.pinned_cpus)
        engine = self._require()
        if engine.cpu_placement:  # the team now, before a pooling batch or the first step starts it
            bind_team(*engine.cpu_placement)
        try:
            while not self._stopping.is_set():
                self._pass_started = time.monotonic()
                waiting = len(engine.scheduler.waiting)
                self._drain_commands(engine)
                if len(engine.scheduler.waiting) > waiting:
                    self._gather_arrivals(engine)
                engine.executor.check_health()
                self._stats = engine.stats()
                if engine.pooler is not None and engine.pooler.has_work:
                    self._deliver(engine.pooler.step())
                    continue
                if not engine.scheduler.has_work:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                outputs = engine.step()
                self._last_outputs = len(outputs)
                if self.on_step is not None:
                    self.on_step(engine, outputs)
                if outputs:
                    self._deliver(outputs)
                    if not engine.scheduler.has_work:  # idle: the GIL to the loop, which relays
                        time.sleep(0)  # them before this thread's next pass (RESULTS.md, gw13)
                if engine.blocked_on_memory:  # nothing ran: sleep until a command (a release)
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as e:  # noqa: BLE001 - a dead engine must say so, not hang
            logger.exception("engine step thread died")
            self._dead = e
            err = EngineDeadError(f"engine died: {e!r}")
            self._fail_all(err)

    def _gather_arrivals(self, engine: LLMEngine) -> None:
        """Requests just arrived: while a wave is starting, take more commands until none adds
        a request for ``arrival_window_ms``, at most ``ARRIVAL_WINDOWS`` windows from now
        (config.py says why). A wave is starting while at least as many are waiting as
        running, and fewer are here than produced output in the last step (the successors of
        a closed loop's finished requests are still coming; a lone client's next request is
        not awaited: it pays nothing).

        NOTE: times are this thread's own clock, not the sequences' arrival_time (a resumed
        request may carry another process's)."""
        window = self.config.arrival_window_ms / 1e3
        sched = engine.scheduler
        if window <= 0:
            return
        start = last = time.monotonic()
        waiting = len(sched.waiting)
        while (
            waiting
            and len(sched.running) <= waiting
            and len(sched.running) + waiting < self._last_outputs
            and not self._stopping.is_set()
        ):
            left = min(last + window, start + ARRIVAL_WINDOWS * window) - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(left)
            self._wake.clear()
            self._drain_commands(engine)
            if len(sched.waiting) > waiting:
                last = time.monotonic()
            waiting = len(sched.waiting)

    def _drain_commands(self, engine: LLMEngine) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn(engine)
            except Exception as e:  # noqa: BLE001 - handed back to the caller
                self._resolve(fut, exc=e)
            else:
                self._resolve(fut, result=result)

    def _resolve(
        self, fut: asyncio.Future[Any], result: Any = None, exc: BaseException | None = None
    ):
        def done() -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(done)

    def _deliver(self, outputs: list[RequestOutput] | list[PoolingOutput]) -> None:
        assert self._loop is not None

        def put() -> None:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put_nowait(out)

        if threading.current_thread() is self._thread:
            self._loop.call_soon_threadsafe(put)
        else:
            put()

    def _fail_all(self, err: BaseException) -> None:
        assert self._loop is not None

        def fail() -> None:
            for stream in self._streams.values():
                stream.put_nowait(err)

        self._loop.call_soon_threadsafe(fail)
        self._fail_commands(err)

    def _fail_commands(self, err: BaseException) -> None:
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                break
            self._resolve(fut, exc=err)


def _pooler(engine: LLMEngine) -> Pooler:
    if engine.pooler is None:
        raise ValueError(f"{engine.model_name} is a generative model: it does not pool")
    return engine.pooler
