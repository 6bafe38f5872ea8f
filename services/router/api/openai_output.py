"""OpenAI responses: chat.completion and text_completion bodies, their chunk streams
(server-sent events ending in ``[DONE]``), logprobs, tool calls and errors."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from starlette.responses import Response

from services.common.proto import worker_pb2 as pb
from services.router.accumulate import Choice, Usage
from services.router.errors import APIError
from services.router.features.reasoning.base import ReasoningParser, extract_reasoning
from services.router.features.tool_parsers.base import ParsedCall, ToolStream, extract
from services.router.serving import ServeRequest, Step

if TYPE_CHECKING:
    from services.router.tokenization import Tokenizer


def openai_call_id() -> str:
    return "chatcmpl-tool-" + uuid.uuid4().hex


def openai_tool_call(call: ParsedCall) -> dict[str, Any]:
    """A call in a non-streaming chat.completion message."""
    return {"id": openai_call_id(), "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}  # fmt: skip


def openai_call_deltas(index: int, call: ParsedCall) -> list[dict[str, Any]]:
    """The ``delta`` objects of one call in a chat.completion.chunk stream: the call's id and
    name, then its arguments (``index`` is the call's position in the message)."""
    return [
        {"tool_calls": [{"index": index, "id": openai_call_id(), "type": "function",
                         "function": {"name": call.name, "arguments": ""}}]},
        {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]},
    ]  # fmt: skip


def openai_deltas(stream: ToolStream, text: str, final: bool) -> list[dict[str, Any]]:
    """The chunk ``delta`` objects of the next piece of one choice's output."""
    index = len(stream.calls)
    out: list[dict[str, Any]] = []
    for ev in stream.feed(text, final):
        if isinstance(ev, str):
            out.append({"content": ev})
        else:
            out += openai_call_deltas(index, ev)
            index += 1
    return out


def reasoning_fields(text: str) -> dict[str, str]:
    """The reasoning of a message or delta: under vLLM's current name (``reasoning``) and
    its earlier one (``reasoning_content``, which DeepSeek's API and many clients read)."""
    return {"reasoning_content": text, "reasoning": text}


class TokenNames(Protocol):
    """What the logprobs say of a token (services/router/tokenization.py Tokenizer)."""

    def token_str(self, token_id: int) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


def token_logprobs(tok: TokenNames, items: Iterable[pb.TokenLogprobs]) -> list[dict[str, Any]]:
    """Logprobs of tokens as chat completions (and the Responses API) give them: token,
    logprob, the token's own bytes (those of part of a character too, as OpenAI gives them;
    its string then holds U+FFFD) and the top alternatives."""

    def entry(tid: int, lp: float) -> dict[str, Any]:
        return {"token": tok.token_str(tid), "logprob": lp, "bytes": list(tok.token_bytes(tid))}

    return [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(c.token_id, c.logprob)
             for c in t.top]} for t in items]  # fmt: skip


def top_logprob_map(token_str: Callable[[int], str], top: Iterable[pb.Logprob]) -> dict[str, float]:
    """The completions API's alternatives of one token: token string -> logprob, as many as
    the worker sent. NOTE: two ids can decode to the same string (byte tokens of a partial
    UTF-8 character all decode to U+FFFD; SentencePiece's <0x20> and its space): the later
    one is keyed by its id as vLLM's --return-tokens-as-token-ids spells it
    (``token_id:ID``); keyed by string alone it overwrote the first and the answer had one
    entry fewer than asked."""
    out: dict[str, float] = {}
    for c in top:
        key = token_str(c.token_id)
        out[f"token_id:{c.token_id}" if key in out else key] = c.logprob
    return out


def _sse(obj: object) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class OpenAIOutput:
    """The response of one chat or completions request (serving.Output)."""

    stream_headers = {"Cache-Control": "no-cache"}

    def __init__(self, req: ServeRequest, tok: Tokenizer, chat: bool, include_usage: bool,
                 echo: list[str] | None = None) -> None:  # fmt: skip
        """``echo``: completions, the text that goes before each prompt's choices."""
        self.req, self.chat, self.include_usage, self.echo = req, chat, include_usage, echo
        self.tok = tok  # the logprobs' token strings and bytes, the model's own
        self.token_str = tok.token_str
        obj = "chat.completion.chunk" if chat else "text_completion"
        self.base = {"id": req.rid, "object": obj, "created": req.created, "model": req.model,
                     "service_tier": req.service_tier}  # fmt: skip
        self.extra = {"usage": None} if include_usage else {}
        self.text_pos: dict[int, int] = {}  # completions: characters sent, per choice
        self.started_roles: set[int] = set()  # chat: choices whose role was sent
        self.tool_streams: dict[int, ToolStream | None] = {}
        self.reasoning_parsers: dict[int, ReasoningParser | None] = {}

    def error(self, err: APIError) -> Response:
        return err.openai_response()

    def error_event(self, err: APIError) -> str:
        return _sse(err.openai_body())

    def _chat_logprobs(self, items: list[pb.TokenLogprobs]) -> dict[str, Any]:
        return {"content": token_logprobs(self.tok, items)}

    def _completion_logprobs(self, items: list[pb.TokenLogprobs], offset: int) -> dict[str, Any]:
        token_str = self.token_str
        tokens = [token_str(t.token_id) for t in items]
        offsets, pos = [], offset
        for s in tokens:
            offsets.append(pos)
            pos += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": [t.logprob for t in items],
            "top_logprobs": [top_logprob_map(token_str, t.top) for t in items],
            "text_offset": offsets,
        }

    def body(self, choices: dict[int, Choice], usage: Usage) -> dict[str, Any]:
        req = self.req
        out = []
        for idx in sorted(choices):
            ch = choices[idx]
            item: dict[str, Any] = {"index": idx, "finish_reason": ch.finish_reason}
            if self.chat:
                self._chat_choice(item, ch)
            else:
                item["text"] = self._echoed(idx) + ch.full_text
                item["logprobs"] = (
                    self._completion_logprobs(ch.logprobs, 0) if req.logprobs else None
                )
                item["stop_reason"] = ch.stop_reason
            out.append(item)
        return {
            "id": req.rid,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": req.created,
            "model": req.model,
            "choices": out,
            "usage": usage.openai(),
            "system_fingerprint": None,
            "service_tier": req.service_tier,
        }

    def _echoed(self, index: int) -> str:
        return "" if self.echo is None else self.echo[index // self.req.n]

    def _chat_choice(self, item: dict[str, Any], ch: Choice) -> None:
        """The message (reasoning, content, tool calls) and logprobs of one chat choice."""
        text, reasoning = ch.full_text, ""
        if (rp := self.req.reasoning_parser()) is not None:
            reasoning, text = extract_reasoning(rp, text)
        item["message"] = {"role": "assistant", "content": text or (None if reasoning else "")}
        if reasoning:
            item["message"].update(reasoning_fields(reasoning))
        tool_stream = self.req.tool_stream()
        if tool_stream is not None:
            content, calls = extract(tool_stream, text)
            item["message"]["content"] = content or (None if calls or reasoning else "")
            if calls:
                item["message"]["tool_calls"] = [openai_tool_call(c) for c in calls]
                item["finish_reason"] = "tool_calls"
        item["logprobs"] = self._chat_logprobs(ch.logprobs) if self.req.logprobs else None

    def _chunk(self, index: int, delta: dict[str, Any]) -> str:
        return _sse({**self.base, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                               "finish_reason": None}], **self.extra})  # fmt: skip

    def step(self, step: Step, usage: Usage) -> Iterator[str]:
        for ch, d in step:
            item: dict[str, Any] = {"index": ch.index, "finish_reason": d.finish_reason or None}
            if self.chat:
                yield from self._chat_delta(item, ch, d)
            else:
                first = ch.index not in self.text_pos
                item["text"] = (self._echoed(ch.index) if first else "") + d.text
                pos = self.text_pos.get(ch.index, 0)
                item["logprobs"] = (
                    self._completion_logprobs(list(d.logprobs), pos) if self.req.logprobs else None
                )
                self.text_pos[ch.index] = pos + len(d.text)
            text = item["delta"] and d.text if self.chat else item["text"]
            if text or d.finish_reason or d.logprobs:
                yield _sse({**self.base, "choices": [item], **self.extra})

    def _chat_delta(self, item: dict[str, Any], ch: Choice, d: pb.CompletionDelta) -> Iterator[str]:
        """Fill ``item`` with one chat delta; yields the chunks that go before it."""
        if ch.index not in self.started_roles:
            self.started_roles.add(ch.index)
            yield self._chunk(ch.index, {"role": "assistant", "content": ""})
        item["logprobs"] = self._chat_logprobs(list(d.logprobs)) if self.req.logprobs else None
        if ch.index not in self.tool_streams:
            self.tool_streams[ch.index] = self.req.tool_stream()
            self.reasoning_parsers[ch.index] = self.req.reasoning_parser()
        text, reasoning = d.text, ""
        if (rp := self.reasoning_parsers[ch.index]) is not None:
            reasoning, text = rp.feed(d.text, bool(d.finish_reason))
        item["delta"] = reasoning_fields(reasoning) if reasoning else {}
        if (ts := self.tool_streams[ch.index]) is None:
            if text:
                item["delta"]["content"] = text
            return
        # Tool calling (on the content only): the reasoning, then what the parser decided,
        # go out in chunks of their own.
        deltas = openai_deltas(ts, text, bool(d.finish_reason))
        for delta in ([item["delta"]] if reasoning else []) + deltas:
            yield self._chunk(ch.index, delta)
        item["delta"] = {}
        if d.finish_reason and ts.calls:
            item["finish_reason"] = "tool_calls"

    def end(self, choices: dict[int, Choice], usage: Usage) -> Iterator[str]:
        if self.include_usage:
            yield _sse({**self.base, "choices": [], "usage": usage.openai()})
        yield "data: [DONE]\n\n"
