"""The serving pipeline both APIs share: admit -> orchestrate -> wait for the first step ->
stream or collect -> metrics.

An API module reads its request into a ServeRequest (prompts built, sampling parameters in
their final wire form) and hands ``serve`` an Output: the one thing that differs between the
APIs, how the steps are written (chunks and events, the whole body, errors). A Messages
request becomes the same request as a chat completion, as vLLM's Anthropic server turns it
into a ChatCompletionRequest.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from services.common import delivery_log
from services.common.convert import params_to_proto
from services.common.proto import worker_pb2 as pb
from services.engine.sampling_params import SamplingParams, StructuredOutputsParams
from services.engine.service_tiers import DEFAULT, FLEX
from services.router.accumulate import Choice, Usage, apply_step, until_disconnect
from services.router.admission import Ticket
from services.router.errors import APIError
from services.router.features.reasoning.base import ReasoningParser
from services.router.features.reasoning.factory import reasoning_parser_class
from services.router.features.tool_parsers.base import ToolParser, ToolStream
from services.router.features.tool_parsers.factory import tool_parser_class
from services.router.features.tools import ToolSetup
from services.router.model_wait import until_served
from services.router.offline import OfflineTicket
from services.router.routing.poison import Placements
from services.router.routing.streams import merge_streams

if TYPE_CHECKING:
    from services.router.gateway import Gateway

Step = list[tuple[Choice, pb.CompletionDelta]]  # the choices one worker message touched


@dataclass
class ServeRequest:
    """One API request as the pipeline runs it."""

    api: str  # the metrics label: "chat" | "completions" | "messages"
    rid: str  # the response id; prompt i of several runs as "<rid>-<i>"
    model: str
    prompts: list[list[int]]  # token ids, one list per prompt
    images: list[pb.ImageData]
    params: pb.SamplingParams  # final: the tools' constraint included
    n: int  # completions per prompt
    logprobs: bool  # the response carries logprobs
    tools: ToolSetup | None  # None: no tools (completions)
    tool_parser: type[ToolParser]  # finds the calls of tool_choice "auto"
    reasoning: type[ReasoningParser] | None  # splits off the reasoning; None: all content
    started: float  # time.monotonic() on arrival
    created: int = field(default_factory=lambda: int(time.time()))  # unix time, in bodies
    # Awaited after the last worker message, before the body or the stream's end is written
    # (the Responses API stores the response there); None: nothing to do.
    finish: Callable[[dict[int, Choice], Usage], Awaitable[None]] | None = None

    @classmethod
    def create(
        cls, gw: Gateway, api: str, rid: str, model: str, prompts: list[list[int]],
        images: list[pb.ImageData], params: SamplingParams, tools: ToolSetup | None,
        started: float,
    ) -> ServeRequest:  # fmt: skip
        """The request with ``params`` built into their final form once: tool_choice
        "required" or a named function constrains the output to the tools' schema."""
        schema = tools.schema if tools is not None else None
        if schema is not None:
            params = replace(params, structured_outputs=StructuredOutputsParams(json=schema))
        # NOTE: reasoning is split off chat output (chat, messages) only, and not off a
        # constrained output: that is the JSON alone, with no thinking.
        unconstrained = api != "completions" and params.structured_outputs is None
        return cls(
            api, rid, model, prompts, images, params_to_proto(params), params.n,
            params.logprobs is not None, tools, tool_parser_class(gw.cfg.tool_call_parser),
            reasoning_parser_class(gw.cfg.reasoning_parser) if unconstrained else None, started,
        )  # fmt: skip

    @property
    def service_tier(self) -> str:
        """The engine tier the request runs in (what the responses say served it)."""
        return self.params.service_tier or DEFAULT

    def tool_stream(self) -> ToolStream | None:
        """A tool-call parser for one choice; None: its output is plain content."""
        return self.tools.stream(self.tool_parser) if self.tools is not None else None

    def reasoning_parser(self) -> ReasoningParser | None:
        """A reasoning parser for one choice; None: its output is all content."""
        return self.reasoning() if self.reasoning is not None else None


class Output(Protocol):
    """How one API writes one request's response; a new one per request (a stream keeps
    its state here)."""

    @property
    def stream_headers(self) -> dict[str, str] | None:
        """Headers of the event stream's response."""

    def error(self, err: APIError) -> Response:
        """The error response (before any output)."""

    def error_event(self, err: APIError) -> str:
        """The error in the event stream (after its start)."""

    def step(self, step: Step, usage: Usage) -> Iterator[str]:
        """The events of one worker message."""

    def end(self, choices: dict[int, Choice], usage: Usage) -> Iterator[str]:
        """The events after the last message."""

    def body(self, choices: dict[int, Choice], usage: Usage) -> dict[str, Any]:
        """The whole (not streamed) response."""


async def serve(
    gw: Gateway, request: Request, req: ServeRequest, out: Output, stream: bool
) -> Response:
    """Run ``req``: admitted, generated and written by ``out``; counted in the metrics."""
    try:
        if req.service_tier == FLEX:  # it may wait in its queue: the client may leave meanwhile
            ticket = await until_disconnect(request, _admit(gw, req))
        else:  # charged or refused at once: no wait to watch (2 tasks and a wait a request)
            ticket = await _admit(gw, req)
    except APIError as err:
        gw.metrics.count_request(req.api, err.status)
        return out.error(err)
    # NOTE: guarded, so that after SIGTERM's grace it ends in a 503 (shutdown.py).
    merged = gw.shutdown.guard(_generate(gw, req))
    if stream:
        try:
            # Wait for the first step before sending headers, so that errors up to then
            # (no worker, rejected by the engine) still get their HTTP status.
            # NOTE: in a task of its own, as before CLIENT_GONE: the first step sets the
            # request's trace (a contextvar) that the later steps, in this task, do not see.
            # Its poison deaths follow every step (Orchestrator.generate resumes them).
            first = await until_disconnect(request, anext(merged), own_task=True)
        except StopAsyncIteration:
            ticket.release()
            gw.metrics.count_request(req.api, 500)
            return out.error(APIError(500, "the worker ended the request without output"))
        except APIError as err:
            ticket.release()
            gw.metrics.count_request(req.api, err.status)
            await merged.aclose()
            return out.error(err)
        except BaseException:
            ticket.release()
            await merged.aclose()
            raise
        # NOTE: the background task runs even when the client leaves before the body starts.
        return StreamingResponse(
            _stream(gw, req, out, merged, first), media_type="text/event-stream",
            headers=out.stream_headers, background=BackgroundTask(ticket.release),
        )  # fmt: skip
    try:
        result = await until_disconnect(request, _collect(gw, req, out, merged))
    except APIError as err:
        gw.metrics.count_request(req.api, err.status)
        return out.error(err)
    finally:
        ticket.release()
    gw.metrics.count_request(req.api, 200)
    return JSONResponse(result)


async def run_detached(
    gw: Gateway,
    req: ServeRequest,
    out: Output,
    sink: Callable[[str], None] | None = None,
    admitted: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """Run ``req`` with no client attached (a background response) to its body; an APIError
    when it fails. Cancelling the caller aborts the generation. ``sink``: takes its stream's
    events as they come (a background response streamed while its client stays);
    ``admitted``: awaited once the request is admitted, before it goes to a worker."""
    try:
        ticket = await _admit(gw, req)
    except APIError as err:
        gw.metrics.count_request(req.api, err.status)
        raise
    merged = _generate(gw, req)
    status: int | str = 200
    try:
        if admitted is not None:
            await admitted()
        return await _collect(gw, req, out, merged, sink)
    except APIError as err:
        status = err.status
        raise
    except BaseException:
        status = 499
        raise
    finally:
        await merged.aclose()
        ticket.release()
        gw.metrics.count_request(req.api, status)


async def _admit(gw: Gateway, req: ServeRequest) -> Ticket | OfflineTicket:
    """Online requests are charged at once (or refused: 429); offline (flex) ones wait in
    their own queue for headroom (offline.py)."""
    tokens = sum(len(p) for p in req.prompts)
    if req.service_tier == FLEX:
        return await gw.offline.admit(req.model, tokens)
    return gw.admission.admit(tokens, gw.pool.base_model(req.model))


def _generate(
    gw: Gateway, req: ServeRequest
) -> AsyncGenerator[tuple[int, pb.GenerateResponse], None]:
    many = len(req.prompts) > 1
    placements = Placements()  # the prompts' (poison.py)

    def one(i: int, p: list[int]) -> AsyncGenerator[pb.GenerateResponse, None]:
        rid = f"{req.rid}-{i}" if many else req.rid
        start = partial(gw.orchestrator.generate, req.model, rid, p, req.params, req.images,
                        placements)  # fmt: skip
        return until_served(gw, req.model, start)  # a refusal in a model swap: again

    return merge_streams([one(i, p) for i, p in enumerate(req.prompts)])


class _Progress:
    """The choices and usage of one request so far, and its time-to-first-token metric."""

    def __init__(self, gw: Gateway, req: ServeRequest) -> None:
        self.gw, self.req = gw, req
        self.choices: dict[int, Choice] = {}
        self.usage = Usage()
        self.first_seen = False
        self.first_at = 0.0  # time.monotonic() of the first output

    def apply(self, prompt_index: int, msg: pb.GenerateResponse) -> Step:
        if not self.first_seen:
            self.first_seen = True
            self.first_at = time.monotonic()
            self.gw.metrics.first_token(self.req.api, self.req.model, self.req.started)
        return apply_step(self.choices, self.usage, prompt_index, self.req.n, msg)

    def done(self) -> None:
        req, usage, gw = self.req, self.usage, self.gw
        gw.metrics.done(req.api, req.model, req.started, usage.prompt, usage.completion)
        gw.metrics.tier_done(req.service_tier, usage.prompt, usage.completion)
        if self.first_seen and req.service_tier != FLEX:
            per_token = req.n * len(req.prompts)  # outputs of one completion, about
            tpot = None
            if usage.completion > per_token:
                tpot = (time.monotonic() - self.first_at) / (usage.completion / per_token - 1)
            gw.offline.observe_online(self.first_at - req.started, tpot)


async def _collect(
    gw: Gateway, req: ServeRequest, out: Output,
    merged: AsyncGenerator[tuple[int, pb.GenerateResponse], None],
    sink: Callable[[str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    progress = _Progress(gw, req)
    gw.metrics.inflight.inc()
    try:
        async for pi, msg in merged:
            step = progress.apply(pi, msg)
            if sink is not None:
                for event in out.step(step, progress.usage):
                    sink(event)
    finally:
        gw.metrics.inflight.dec()
    progress.done()
    if req.finish is not None:
        await req.finish(progress.choices, progress.usage)
    if sink is not None:
        for event in out.end(progress.choices, progress.usage):
            sink(event)
    return out.body(progress.choices, progress.usage)


async def _prepend(
    first: tuple[int, pb.GenerateResponse], rest: AsyncIterator[tuple[int, pb.GenerateResponse]]
) -> AsyncIterator[tuple[int, pb.GenerateResponse]]:
    yield first
    async for item in rest:
        yield item


async def _stream(
    gw: Gateway, req: ServeRequest, out: Output,
    merged: AsyncGenerator[tuple[int, pb.GenerateResponse], None],
    first: tuple[int, pb.GenerateResponse],
) -> AsyncIterator[str]:  # fmt: skip
    progress = _Progress(gw, req)
    status = "200"
    gw.metrics.inflight.inc()
    try:
        async for pi, msg in _prepend(first, merged):
            delivery_log.mark("r", req.rid)
            for event in out.step(progress.apply(pi, msg), progress.usage):
                yield event
            delivery_log.mark("s", req.rid)
        progress.done()
        if req.finish is not None:
            await req.finish(progress.choices, progress.usage)
        for event in out.end(progress.choices, progress.usage):
            yield event
    except APIError as err:
        status = str(err.status)
        yield out.error_event(err)
    finally:
        await merged.aclose()
        gw.metrics.inflight.dec()
        gw.metrics.count_request(req.api, status)
