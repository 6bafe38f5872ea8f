"""Responses API output: the response object and its typed event stream (response.created,
output items of reasoning, message text and function calls with their deltas,
response.completed / incomplete / failed), usage, and the record stored for
``previous_response_id``."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from services.common.proto import worker_pb2 as pb
from services.router.accumulate import Choice, Usage
from services.router.api.openai_output import TokenNames, token_logprobs
from services.router.api.responses_input import assistant_turn
from services.router.errors import APIError
from services.router.features.tool_parsers.base import ParsedCall
from services.router.serving import ServeRequest, Step

if TYPE_CHECKING:
    from services.router.response_store import ResponseStore

_ERROR_CODES = {429: "rate_limit_exceeded", 400: "invalid_prompt"}


def error_code(err: APIError) -> str:
    """The code of a failed response's ``error`` (OpenAI's ResponseError codes) for ``err``."""
    return _ERROR_CODES.get(err.status, "server_error")


def response_usage(u: Usage) -> dict[str, Any]:
    return {
        "input_tokens": u.prompt,
        # cache_write_tokens: required by the openai SDK's ResponseUsage (3.x); nothing is
        # billed for writing the prefix cache here.
        "input_tokens_details": {"cached_tokens": u.cached, "cache_write_tokens": 0},
        "output_tokens": u.completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.prompt + u.completion,
    }


def _id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


class ResponsesOutput:
    """The response of one Responses request (serving.Output); one choice, prompt 0.

    Output items are built by one state machine whether streamed or not: text opens (or
    continues) a reasoning or message item, each parsed tool call is a function_call item;
    the events it yields are sent when streaming and dropped otherwise."""

    stream_headers = {"Cache-Control": "no-cache"}

    def __init__(self, req: ServeRequest, echo: dict[str, Any], conversation: list[dict[str, Any]],
                 store: ResponseStore | None, inputs: list[dict[str, Any]] | None = None,
                 tok: TokenNames | None = None) -> None:  # fmt: skip
        self.req, self.echo, self.conversation, self.store = req, echo, conversation, store
        self.inputs = inputs or []  # this request's input items, as stored
        self.tok = tok  # the logprobs' tokens; None: no logprobs asked for
        # NOTE: a step's logprobs go with the next message text; with a reasoning parser
        # that includes the reasoning tokens' (the split is made on text, not tokens).
        self.pending_lp: list[dict[str, Any]] = []
        self.open_lp: list[dict[str, Any]] = []  # of the open message
        self.created_at = int(time.time())
        self.tool_stream = req.tool_stream()
        self.reasoning = req.reasoning_parser()
        self.seq = 0
        self.items: list[dict[str, Any]] = []  # finished output items
        self.open: dict[str, Any] | None = None  # the reasoning or message item being written
        self.open_text: list[str] = []
        self.started = False  # response.created was sent
        self.pending: list[str] = []  # events of the stream's end, made by finish()
        self.response: dict[str, Any] | None = None

    def skeleton(self, status: str, error: dict[str, str] | None = None) -> dict[str, Any]:
        """The response object before (or without) its output."""
        return {
            "id": self.req.rid, "object": "response", "created_at": self.created_at,
            "status": status, "error": error, "incomplete_details": None, "model": self.req.model,
            "output": [], "usage": None, "service_tier": self.req.service_tier, **self.echo,
        }  # fmt: skip

    def record(self, response: dict[str, Any]) -> dict[str, Any]:
        """What the store keeps: the response, its conversation's chat turns and this
        request's input items."""
        text = "".join(c["text"] for i in response["output"] if i["type"] == "message"
                       for c in i["content"])  # fmt: skip
        calls = [i for i in response["output"] if i["type"] == "function_call"]
        turns = self.conversation + ([assistant_turn(text, calls)] if response["output"] else [])
        return {"response": response, "messages": turns, "input": self.inputs}

    # -- serving.Output ---------------------------------------------------------------------

    def error(self, err: APIError) -> Response:
        return err.openai_response()

    def error_event(self, err: APIError) -> str:
        """An ``error`` event, then ``response.failed`` carrying the response so far."""
        code = error_code(err)
        failed = self.skeleton("failed", {"code": code, "message": err.message})
        failed["output"] = self.items
        return self._event("error", code=code, message=err.message, param=err.param) + (
            self._event("response.failed", response=failed)
        )

    def cut_event(self, behind: int) -> str:
        """The ``error`` event that ends the stream of a background response whose client
        fell ``behind`` events behind (api/event_relay.py): the response itself goes on."""
        return self._event(
            "error", code="stream_cut", param=None,
            message=f"the client fell {behind} events behind this background response's "
            f"stream, which ends here; the response goes on: GET /v1/responses/{self.req.rid} "
            "gives its end",
        )  # fmt: skip

    def step(self, step: Step, usage: Usage) -> Iterator[str]:
        if not self.started:
            self.started = True
            yield self._event("response.created", response=self.skeleton("in_progress"))
            yield self._event("response.in_progress", response=self.skeleton("in_progress"))
        for _, d in step:
            self._logprobs(d.logprobs)
            yield from self._output(d.text, False)

    async def finish(self, choices: dict[int, Choice], usage: Usage) -> None:
        """The whole response (its last items closed), stored when ``store`` asks."""
        ch = choices.get(0, Choice(index=0))
        text = "" if self.started else ch.full_text  # streamed: the steps fed it already
        if not self.started:
            self._logprobs(ch.logprobs)
        self.pending = list(self._output(text, True))
        if not self.items and self.open is None:
            self.pending += self._text("message", "")  # no output at all: one empty message
        self.pending += self._close()
        response = self.skeleton("completed")
        if ch.finish_reason == "length":
            response["status"] = "incomplete"
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        response.update(output=self.items, usage=response_usage(usage))
        self.response = response
        if self.store is not None:
            await self.store.put(self.req.rid, self.record(response))

    def body(self, choices: dict[int, Choice], usage: Usage) -> dict[str, Any]:
        assert self.response is not None  # finish() ran
        return self.response

    def end(self, choices: dict[int, Choice], usage: Usage) -> Iterator[str]:
        assert self.response is not None
        yield from self.pending
        kind = "incomplete" if self.response["status"] == "incomplete" else "completed"
        yield self._event(f"response.{kind}", response=self.response)

    # -- output items -----------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def _output(self, text: str, final: bool) -> Iterator[str]:
        """Events of the next piece of output."""
        if self.reasoning is not None:
            thought, text = self.reasoning.feed(text, final)
            if thought:
                yield from self._text("reasoning", thought)
        if self.tool_stream is None:
            if text:
                yield from self._text("message", text)
            return
        for ev in self.tool_stream.feed(text, final):
            if isinstance(ev, ParsedCall):
                yield from self._call(ev)
            elif ev:
                yield from self._text("message", ev)

    def _logprobs(self, items: Iterable[pb.TokenLogprobs]) -> None:
        if self.tok is not None:
            self.pending_lp += token_logprobs(self.tok, items)

    def _where(self) -> dict[str, Any]:
        assert self.open is not None
        return {"item_id": self.open["id"], "output_index": len(self.items)}

    def _text(self, kind: str, delta: str) -> list[str]:
        """A text delta of a ``kind`` item ("reasoning" | "message"), opening one if needed."""
        out = []
        if self.open is None or self.open["type"] != kind:
            out += self._close()
            if kind == "reasoning":
                self.open = {"type": "reasoning", "id": _id("rs_"), "summary": [], "content": [],
                             "status": "in_progress"}  # fmt: skip
            else:
                self.open = {"type": "message", "id": _id("msg_"), "role": "assistant",
                             "status": "in_progress", "content": []}  # fmt: skip
            out.append(self._event("response.output_item.added",
                                   output_index=len(self.items), item=self.open))  # fmt: skip
            out.append(self._event("response.content_part.added", **self._where(),
                                   content_index=0, part=self._part("")))  # fmt: skip
        if delta:
            self.open_text.append(delta)
            kind_name = "reasoning_text" if kind == "reasoning" else "output_text"
            logprobs: dict[str, Any] = {}
            if kind == "message":
                logprobs["logprobs"], self.pending_lp = self.pending_lp, []
                self.open_lp += logprobs["logprobs"]
            out.append(self._event(f"response.{kind_name}.delta", **self._where(),
                                   content_index=0, delta=delta, **logprobs))  # fmt: skip
        return out

    def _part(self, text: str) -> dict[str, Any]:
        assert self.open is not None
        if self.open["type"] == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": self.open_lp}

    def _close(self) -> list[str]:
        """Close the open reasoning or message item."""
        if self.open is None:
            return []
        text = "".join(self.open_text)
        part = self._part(text)
        done = "response.reasoning_text.done" if part["type"] == "reasoning_text" else (
            "response.output_text.done")  # fmt: skip
        logprobs: dict[str, Any] = (
            {"logprobs": self.open_lp} if part["type"] == "output_text" else {}
        )
        out = [
            self._event(done, **self._where(), content_index=0, text=text, **logprobs),
            self._event("response.content_part.done", **self._where(), content_index=0,
                        part=part),
        ]  # fmt: skip
        item = {**self.open, "content": [part], "status": "completed"}
        out.append(self._event("response.output_item.done", output_index=len(self.items),
                               item=item))  # fmt: skip
        self.items.append(item)
        self.open, self.open_text, self.open_lp = None, [], []
        return out

    def _call(self, call: ParsedCall) -> list[str]:
        """A function_call item: added, its arguments (one delta), done."""
        out = self._close()
        self.pending_lp = []  # the call's tokens: a function_call item has no logprobs
        item = {"type": "function_call", "id": _id("fc_"), "call_id": _id("call_"),
                "name": call.name, "arguments": "", "status": "in_progress"}  # fmt: skip
        where = {"item_id": item["id"], "output_index": len(self.items)}
        out.append(self._event("response.output_item.added", output_index=len(self.items),
                               item=item))  # fmt: skip
        out.append(self._event("response.function_call_arguments.delta", **where,
                               delta=call.arguments))  # fmt: skip
        out.append(self._event("response.function_call_arguments.done", **where,
                               name=call.name, arguments=call.arguments))  # fmt: skip
        item = {**item, "arguments": call.arguments, "status": "completed"}
        out.append(self._event("response.output_item.done", output_index=len(self.items),
                               item=item))  # fmt: skip
        self.items.append(item)
        return out
