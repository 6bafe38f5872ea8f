"""Collects per-step worker messages into per-choice text, tokens, logprobs and usage."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.requests import Request

from services.common.proto import worker_pb2 as pb
from services.router.errors import ClientDisconnected
from services.router.http_protocol import CLIENT_GONE

T = TypeVar("T")


@dataclass
class Choice:
    """One output choice (prompt index x completion index) of a response."""

    index: int
    text: list[str] = field(default_factory=list)  # text deltas in order
    num_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[pb.TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | None = None  # the stop string that ended it

    @property
    def full_text(self) -> str:
        return "".join(self.text)


@dataclass
class Usage:
    """Token counts summed over the prompts of one API request."""

    prompt_tokens: dict[int, int] = field(default_factory=dict)  # per prompt index
    cached_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: dict[int, int] = field(default_factory=dict)  # per choice index

    @property
    def prompt(self) -> int:
        return sum(self.prompt_tokens.values())

    @property
    def cached(self) -> int:
        return sum(self.cached_tokens.values())

    @property
    def completion(self) -> int:
        return sum(self.completion_tokens.values())

    def openai(self) -> dict[str, object]:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        }


def apply_step(
    choices: dict[int, Choice], usage: Usage, prompt_index: int, n: int, msg: pb.GenerateResponse
) -> list[tuple[Choice, pb.CompletionDelta]]:
    """Fold one worker message into ``choices``/``usage``; returns the touched choices."""
    usage.prompt_tokens[prompt_index] = msg.prompt_tokens
    usage.cached_tokens[prompt_index] = msg.cached_prompt_tokens
    touched = []
    for d in msg.outputs:
        idx = prompt_index * n + d.index
        ch = choices.setdefault(idx, Choice(index=idx))
        if ch.finish_reason is not None:
            # NOTE: with n > 1 the worker's later messages repeat a finished choice (no text,
            # its finish_reason): streamed, each repeat was one more finish chunk for it.
            continue
        ch.text.append(d.text)
        ch.token_ids.extend(d.token_ids)
        ch.num_tokens = d.completion_tokens
        ch.logprobs.extend(d.logprobs)
        if d.finish_reason:
            ch.finish_reason = d.finish_reason
            ch.stop_reason = d.stop_reason or None
        usage.completion_tokens[idx] = d.completion_tokens
        touched.append((ch, d))
    return touched


async def _wait_disconnect(request: Request) -> None:
    # The body was read already, so the next ASGI message is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T], own_task: bool = False) -> T:
    """Await ``work``; if the client disconnects first, cancel it (aborting the generation).

    Where the server tells of a lost connection (http_protocol.CLIENT_GONE), ``work`` runs in
    the caller's task, which that cancels: no task of its own, no watcher task, no
    asyncio.wait. ``own_task`` (or another server): a task for ``work`` and one reading
    ``receive()``. NOTE: context variables ``work`` sets (the request's trace, its poison
    deaths) are then not seen by the caller."""
    gone = request.scope.get("extensions", {}).get(CLIENT_GONE)
    if gone is None or own_task:
        return await _in_own_task(request, work)
    if gone.lost:  # it left before the wait: while its request was read, tokenized, ...
        if inspect.iscoroutine(work):
            work.close()  # never started
        raise ClientDisconnected()
    task = asyncio.current_task()
    assert task is not None
    left = False

    def cancel() -> None:
        nonlocal left
        left = True
        task.cancel()

    gone.add(cancel)
    try:
        return await work
    except asyncio.CancelledError:
        if not left:
            raise
        raise ClientDisconnected() from None
    finally:
        gone.discard(cancel)
        if left:
            task.uncancel()  # the cancel was this wait's own, not the task's


async def _in_own_task(request: Request, work: Awaitable[T]) -> T:
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
