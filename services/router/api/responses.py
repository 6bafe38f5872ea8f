"""OpenAI Responses API: POST /v1/responses (streaming, background), GET and DELETE
/v1/responses/{id}, POST /v1/responses/{id}/cancel. A request is read into the chat
completion it runs as (responses_input.py) on the same serving pipeline; responses_output.py
writes the response; stored responses live in the cluster's ResponseStore (etcd), so any
router answers for them. Errors are in OpenAI's format."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from services.router.api.event_relay import EventRelay
from services.router.api.openai import chat_messages, read_request
from services.router.api.protocol.body import read_json_object
from services.router.api.protocol.common import model_name, parse
from services.router.api.protocol.responses import ResponsesRequest
from services.router.api.responses_input import (
    chat_body,
    checked_metadata,
    echo_fields,
    input_items,
)
from services.router.api.responses_output import ResponsesOutput, error_code
from services.router.auth import key_tiers
from services.router.errors import APIError, bad_request
from services.router.features.structured import may_compile
from services.router.prompt import checked_chat_prompt
from services.router.response_store import RUN_RENEW_S
from services.router.serving import ServeRequest, run_detached, serve
from services.router.tiers import openai_params

if TYPE_CHECKING:
    from services.router.gateway import Gateway

log = logging.getLogger(__name__)

CANCEL_POLL_S = 1.0  # how often a background run looks for a cancel made on another router
UNFINISHED = ("queued", "in_progress")
ORPHANED = ("the router running this background response stopped before it finished; "
            "create it again")  # fmt: skip


async def _record(gw: Gateway, rid: str, param: str = "response_id") -> dict[str, Any]:
    """The stored record of ``rid``; 404 when there is none, 503 when etcd cannot answer."""
    try:
        record = await gw.responses.get(rid)
    except Exception as exc:  # noqa: BLE001 - etcd away
        raise APIError(503, f"the response store is unavailable: {exc}") from None
    if record is None:
        raise APIError(404, f"Response with id '{rid}' not found.", param=param,
                       code="not_found")  # fmt: skip
    return await _settled(gw, rid, record)


async def _settled(gw: Gateway, rid: str, record: dict[str, Any]) -> dict[str, Any]:
    """``record``, or, for a background run left unfinished by a router that died (its
    running mark is gone: response_store.py), the record failed, and stored so. Before, such
    a run stayed ``queued`` for the record's whole TTL (1 h) and clients polled it on."""
    response = record["response"]
    if not response.get("background") or response["status"] not in UNFINISHED:
        return record
    if rid in gw.background:
        return record
    try:
        if await gw.responses.is_marked_running(rid):
            return record
        # NOTE: read again: a run that ended stored its record before removing its mark.
        again = await gw.responses.get(rid)
    except Exception:  # noqa: BLE001 - etcd away: nothing to judge by
        return record
    if again is None or again["response"]["status"] not in UNFINISHED:
        return again or record
    error = {"code": "server_error", "message": ORPHANED}
    failed = {**again, "response": {**again["response"], "status": "failed", "error": error}}
    await gw.responses.put(rid, failed)
    return failed


async def create(gw: Gateway, request: Request) -> Response:
    """POST /v1/responses."""
    started, rid = time.monotonic(), "resp_" + uuid.uuid4().hex
    try:
        body = await read_json_object(request, gw.cfg.max_body_bytes)
        model, max_len = await gw.resolve_awake(model_name(body))
        tok = await gw.tokenizer(model)
        typed = parse(ResponsesRequest, body, max_tokens_limit=gw.cfg.max_tokens_limit)
        checked_metadata(typed.metadata)
        if typed.background and not typed.store:
            raise bad_request("'background' needs 'store': true", param="background")
        history: list[dict[str, Any]] = []
        if typed.previous_response_id:
            previous = await _record(gw, typed.previous_response_id, "previous_response_id")
            if previous["response"]["status"] in UNFINISHED:
                raise bad_request(f"previous response '{typed.previous_response_id}' has not "
                                  "finished", param="previous_response_id")  # fmt: skip
            history = previous["messages"]
        chat = chat_body(typed, body, history)
        # NOTE: a constraint's grammar compiles while the body is read: off the loop.
        size = None if may_compile(chat) else 0
        as_chat, params, tool_setup = await gw.offload.run(size, read_request, gw, chat, True)
        params = openai_params(params, as_chat.service_tier, key_tiers(request))
        prompt, images = await checked_chat_prompt(
            gw, tok, chat_messages(chat["messages"]), tool_setup, params.max_tokens, max_len
        )
    except APIError as err:
        gw.metrics.count_request("responses", err.status)
        return err.openai_response()
    req = ServeRequest.create(gw, "responses", rid, model, [prompt], images, params, tool_setup,
                              started)  # fmt: skip
    conversation = chat["messages"][1:] if typed.instructions else chat["messages"]
    out = ResponsesOutput(req, echo_fields(typed), conversation,
                          gw.responses if typed.store else None, input_items(typed.input),
                          tok if typed.logprobs else None)  # fmt: skip
    req.finish = out.finish
    if not typed.background:
        return await serve(gw, request, req, out, typed.stream)
    queued = out.skeleton("queued")
    with contextlib.suppress(Exception):  # etcd away: the run goes on, unjudged
        await gw.responses.mark_running(rid)  # NOTE: before the record: never one unmarked
    await gw.responses.put(rid, out.record(queued))
    # Streamed: the client reads the run's events while it stays (and keeps up, within
    # MAX_EVENTS_BEHIND: event_relay.py); the run goes on without it.
    events = EventRelay(out.cut_event) if typed.stream else None
    gw.background[rid] = asyncio.create_task(_background(gw, req, out, events))
    if events is None:
        return JSONResponse(queued)
    return StreamingResponse(events.events(), media_type="text/event-stream",
                             headers=out.stream_headers)  # fmt: skip


async def _background(
    gw: Gateway, req: ServeRequest, out: ResponsesOutput, events: EventRelay | None = None
) -> None:
    """Run a background response to its end, storing what became of it (and relaying its
    stream's events to ``events``, then its end); cancelled from this router (its task) or
    another one (the stored status, looked at every CANCEL_POLL_S)."""
    sink = events.put if events is not None else None
    work = asyncio.ensure_future(run_detached(gw, req, out, sink, lambda: _started(gw, out)))
    watch = asyncio.ensure_future(_cancelled_elsewhere(gw, req.rid))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
        await work
    except asyncio.CancelledError:
        # NOTE: a deleted response (DELETE pops it from gw.background first) stays deleted.
        gone = watch.done() and not watch.cancelled() and watch.result() == "deleted"
        if req.rid in gw.background and not gone:
            await gw.responses.put(req.rid, out.record(out.skeleton("cancelled")))
    except APIError as err:
        failed = out.skeleton("failed", {"code": error_code(err), "message": err.message})
        await gw.responses.put(req.rid, out.record(failed))
        if sink is not None:
            sink(out.error_event(err))
    except Exception as exc:
        log.exception("background response %s failed", req.rid)
        failed = out.skeleton("failed", {"code": "server_error", "message": str(exc)})
        await gw.responses.put(req.rid, out.record(failed))
        if sink is not None:
            sink(out.error_event(APIError(500, str(exc))))
    finally:
        watch.cancel()
        work.cancel()
        gw.background.pop(req.rid, None)
        if events is not None:
            events.end()
        with contextlib.suppress(Exception):  # etcd away: the mark runs out by itself
            await gw.responses.unmark_running(req.rid)


async def _started(gw: Gateway, out: ResponsesOutput) -> None:
    """A background run is admitted (a flex one waited for headroom, offline.py): its record
    says ``in_progress`` until it ends, as OpenAI's does. NOTE: not over a record cancelled
    or deleted meanwhile. A cancel stored by another router between this read and this write
    (one etcd round trip) is overwritten and the run goes on: the store has no
    compare-and-put, and the run's final write has the same window."""
    rid = out.req.rid
    with contextlib.suppress(Exception):  # etcd away: it stays queued until it ends
        record = await gw.responses.get(rid)
        if record is not None and record["response"]["status"] == "queued":
            await gw.responses.put(rid, out.record(out.skeleton("in_progress")))


async def _cancelled_elsewhere(gw: Gateway, rid: str) -> str:
    """Returns ("cancelled" or "deleted") once the stored response is; renews the run's
    running mark meanwhile."""
    marked = time.monotonic()
    while True:
        await asyncio.sleep(CANCEL_POLL_S)
        if time.monotonic() - marked >= RUN_RENEW_S:
            with contextlib.suppress(Exception):  # etcd away: look again later
                await gw.responses.mark_running(rid)
                marked = time.monotonic()
        try:
            record = await gw.responses.get(rid)
        except Exception:  # noqa: BLE001 - etcd away: look again later
            continue
        if record is None:
            return "deleted"
        if record["response"]["status"] == "cancelled":
            return "cancelled"


async def stored(gw: Gateway, request: Request) -> Response:
    """GET or DELETE /v1/responses/{response_id}."""
    return await (delete if request.method == "DELETE" else retrieve)(gw, request)


async def retrieve(gw: Gateway, request: Request) -> Response:
    """GET /v1/responses/{response_id}."""
    record = await _record(gw, request.path_params["response_id"])
    return JSONResponse(record["response"])


async def delete(gw: Gateway, request: Request) -> Response:
    """DELETE /v1/responses/{response_id}; a background run still going is cancelled."""
    rid = request.path_params["response_id"]
    try:
        found = await gw.responses.delete(rid)
    except Exception as exc:  # noqa: BLE001 - etcd away
        raise APIError(503, f"the response store is unavailable: {exc}") from None
    if not found:
        raise APIError(404, f"Response with id '{rid}' not found.", param="response_id",
                       code="not_found")  # fmt: skip
    if (task := gw.background.pop(rid, None)) is not None:
        task.cancel()
    return JSONResponse({"id": rid, "object": "response", "deleted": True})


async def list_input_items(gw: Gateway, request: Request) -> Response:
    """GET /v1/responses/{response_id}/input_items: the request's input items, a page of
    ``limit`` (1-100, 20) in ``order`` (``desc`` by default, as OpenAI's) after ``after``."""
    items = (await _record(gw, request.path_params["response_id"])).get("input", [])
    q = request.query_params
    order, limit = q.get("order", "desc"), q.get("limit", "20")
    if order not in ("asc", "desc"):
        raise bad_request("'order' must be 'asc' or 'desc'", param="order")
    if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= 100:
        raise bad_request("'limit' must be an integer in [1, 100]", param="limit")
    items = items[::-1] if order == "desc" else items
    if (after := q.get("after")) is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise bad_request(f"'after' names no input item of this response: {after!r}",
                              param="after")  # fmt: skip
        items = items[ids.index(after) + 1 :]
    page = items[: int(limit)]
    return JSONResponse({
        "object": "list", "data": page, "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None, "has_more": len(items) > len(page),
    })  # fmt: skip


async def cancel(gw: Gateway, request: Request) -> Response:
    """POST /v1/responses/{response_id}/cancel: a background response stops (its record
    says ``cancelled``); a finished one is returned as it is."""
    rid = request.path_params["response_id"]
    record = await _record(gw, rid)
    response = record["response"]
    if not response.get("background"):
        raise bad_request("only background responses can be cancelled", param="response_id")
    if response["status"] in UNFINISHED:
        response["status"] = "cancelled"
        await gw.responses.put(rid, record)
        if (task := gw.background.get(rid)) is not None:
            task.cancel()
    return JSONResponse(response)
