"""Anthropic responses: the message body, its event stream (message_start, content blocks of
text, thinking and tool_use, message_delta, message_stop), stop reasons, usage and errors."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from starlette.responses import Response

from services.router.accumulate import Choice, Usage
from services.router.errors import APIError
from services.router.features.reasoning.base import ReasoningParser, extract_reasoning
from services.router.features.tool_parsers.base import Event, ParsedCall, ToolStream
from services.router.features.tool_parsers.partial import CutCall, partial_object, with_cut_call
from services.router.features.tools import FORCED, ToolSetup
from services.router.serving import ServeRequest, Step
from services.router.tiers import ANTHROPIC_SERVED


def stop_fields(ch: Choice, called: bool = False) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) in Anthropic's terms; ``called``: tools were called.
    NOTE: an output cut by max_tokens says so, calls or not (its last call may be cut)."""
    if ch.finish_reason == "length":
        return "max_tokens", None
    if called:
        return "tool_use", None
    if ch.stop_reason:
        return "stop_sequence", ch.stop_reason
    return "end_turn", None


def _usage(u: Usage, tier: str) -> dict[str, Any]:
    # NOTE: Anthropic's input_tokens leaves out the tokens read from the cache: the prompt is
    # input_tokens + cache_read_input_tokens + cache_creation_input_tokens (its usage docs).
    return {
        "input_tokens": u.prompt - u.cached,
        "output_tokens": u.completion,
        "cache_read_input_tokens": u.cached,
        "cache_creation_input_tokens": 0,
        "service_tier": ANTHROPIC_SERVED[tier],
    }


def anthropic_call_id() -> str:
    return "toolu_" + uuid.uuid4().hex


def anthropic_input(call: ParsedCall) -> dict[str, Any]:
    """A call's arguments as the ``input`` object of a tool_use block (a cut call's: what
    its partial JSON holds, as a streaming client reads it)."""
    if isinstance(call, CutCall):
        return partial_object(call.arguments)
    value = json.loads(call.arguments)
    if not isinstance(value, dict):  # parsers only make objects; a bug if not
        raise APIError(500, "a parsed tool call has arguments that are not an object")
    return value


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Blocks:
    """The content blocks of a streamed message: the reasoning goes to a ``thinking`` block
    (first), text to an open text block (opened on its first text), each tool call is a
    ``tool_use`` block of its own."""

    def __init__(self) -> None:
        self.index = -1  # of the latest block
        self.open: str | None = None  # type of the open block: "text" | "thinking"
        self.called = False  # a tool_use block was sent

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [_event("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _delta(self, kind: str, block: dict[str, Any], delta: dict[str, Any]) -> list[str]:
        """A delta of a ``kind`` block, opening one (``block``) unless it is open."""
        out = []
        if self.open != kind:
            out += self._close()
            self.index += 1
            self.open = kind
            out.append(_event("content_block_start", {"type": "content_block_start",
                "index": self.index, "content_block": block}))  # fmt: skip
        out.append(_event("content_block_delta", {"type": "content_block_delta",
            "index": self.index, "delta": delta}))  # fmt: skip
        return out

    def text(self, text: str) -> list[str]:
        return self._delta("text", {"type": "text", "text": ""},
                           {"type": "text_delta", "text": text})  # fmt: skip

    def thinking(self, text: str) -> list[str]:
        return self._delta("thinking", {"type": "thinking", "thinking": "", "signature": ""},
                           {"type": "thinking_delta", "thinking": text})  # fmt: skip

    def tool_use(self, call: ParsedCall) -> list[str]:
        out = self._close()
        self.index += 1
        self.called = True
        block = {"type": "tool_use", "id": anthropic_call_id(), "name": call.name, "input": {}}
        return out + [
            _event("content_block_start", {"type": "content_block_start", "index": self.index,
                                           "content_block": block}),
            _event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                "delta": {"type": "input_json_delta", "partial_json": call.arguments}}),
            _event("content_block_stop", {"type": "content_block_stop", "index": self.index}),
        ]  # fmt: skip

    def output(
        self, tool_stream: ToolStream | None, reasoning: ReasoningParser | None, text: str,
        final: bool, cut: Callable[[list[Event]], list[Event]] | None = None,
    ) -> list[str]:  # fmt: skip
        """Events of the next piece of output; ``cut``: it was cut short by max_tokens, and
        this mends the last events (a forced call being written)."""
        out = []
        if reasoning is not None:
            thought, text = reasoning.feed(text, final)
            out += self.thinking(thought) if thought else []
        if tool_stream is None:
            return out + (self.text(text) if text else [])
        events = tool_stream.feed(text, final)
        for ev in cut(events) if cut is not None and final else events:
            out += self.text(ev) if isinstance(ev, str) else self.tool_use(ev)
        return out

    def end(self) -> list[str]:
        """Close the open block; a message with no block gets an empty text block."""
        return (self.text("")[:1] if self.index < 0 else []) + self._close()


class AnthropicOutput:
    """The response of one Messages request (serving.Output); one choice, prompt 0."""

    stream_headers = None

    def __init__(self, req: ServeRequest) -> None:
        self.req = req
        self.tool_stream = req.tool_stream()
        self.reasoning = req.reasoning_parser()
        self.blocks = _Blocks()
        self.started = False  # message_start was sent

    def error(self, err: APIError) -> Response:
        return err.anthropic_response()

    def error_event(self, err: APIError) -> str:
        return _event("error", err.anthropic_body())

    def body(self, choices: dict[int, Choice], usage: Usage) -> dict[str, Any]:
        ch = choices.get(0, Choice(index=0))
        reasoning, tool_stream = self.reasoning, self.tool_stream
        thought, text = (
            extract_reasoning(reasoning, ch.full_text) if reasoning else ("", ch.full_text)
        )
        events: list[Event] = tool_stream.feed(text, final=True) if tool_stream else [text]
        if (cut := self._cut(ch.finish_reason)) is not None:
            events = cut(events)
        if thought and events == [""]:
            events = []  # all thinking: no empty text block after it
        content: list[dict[str, Any]] = (
            [{"type": "thinking", "thinking": thought, "signature": ""}] if thought else []
        )
        content += [
            {"type": "text", "text": e} if isinstance(e, str) else
            {"type": "tool_use", "id": anthropic_call_id(), "name": e.name, "input": anthropic_input(e)}
            for e in events
        ]  # fmt: skip
        reason, seq = stop_fields(ch, called=any(c["type"] == "tool_use" for c in content))
        return {
            "id": self.req.rid,
            "type": "message",
            "role": "assistant",
            "model": self.req.model,
            "content": content or [{"type": "text", "text": ""}],
            "stop_reason": reason,
            "stop_sequence": seq,
            "usage": _usage(usage, self.req.service_tier),
        }

    def step(self, step: Step, usage: Usage) -> Iterator[str]:
        if not self.started:
            self.started = True
            yield _event("message_start", {"type": "message_start", "message": {
                "id": self.req.rid, "type": "message", "role": "assistant",
                "model": self.req.model, "content": [], "stop_reason": None,
                "stop_sequence": None, "usage": {**_usage(usage, self.req.service_tier), "output_tokens": 0},
            }})  # fmt: skip
        for _, d in step:
            yield from self.blocks.output(
                self.tool_stream, self.reasoning, d.text, bool(d.finish_reason),
                self._cut(d.finish_reason),
            )  # fmt: skip

    def _cut(self, finish_reason: str | None) -> Callable[[list[Event]], list[Event]] | None:
        """How the events of an output cut by max_tokens while a tool_choice ``any`` or
        ``tool`` forced a call end: with that call, cut (Anthropic's incomplete tool_use
        block); before, the JSON written so far came back as a text block."""
        tools: ToolSetup | None = self.req.tools
        if finish_reason != "length" or tools is None or tools.choice not in FORCED:
            return None
        return partial(with_cut_call, function=tools.function)

    def end(self, choices: dict[int, Choice], usage: Usage) -> Iterator[str]:
        blocks = self.blocks
        yield from blocks.output(self.tool_stream, self.reasoning, "", True) + blocks.end()
        reason, seq = stop_fields(choices.get(0, Choice(index=0)), called=blocks.called)
        yield _event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq},
            "usage": {"output_tokens": usage.completion},
        })  # fmt: skip
        yield _event("message_stop", {"type": "message_stop"})
