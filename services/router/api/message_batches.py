"""Anthropic Message Batches API: /v1/messages/batches (create, retrieve, list, cancel,
results). A batch's requests are stored as an input file of /v1/messages lines and run by the
same executor as OpenAI batches; errors come back in Anthropic's format."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.router.api.protocol.body import read_json_object
from services.router.batches.records import ENDED, BatchRecord
from services.router.batches.service import BatchService, page_limit
from services.router.batches.validate import lines_to_jsonl, parse_anthropic_requests
from services.router.errors import APIError, bad_request

if TYPE_CHECKING:
    from services.router.gateway import Gateway


def _service(request: Request) -> BatchService:
    return request.app.state.batches


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


async def create(gw: Gateway, request: Request) -> Response:
    svc = _service(request)
    try:
        body = await read_json_object(request, gw.cfg.batch_max_file_bytes)
    except APIError as err:
        if err.status != 413:
            raise
        raise bad_request(f"the batch exceeds the limit of {gw.cfg.batch_max_file_bytes} "
                          "bytes") from None  # fmt: skip
    lines = parse_anthropic_requests(body.get("requests"), gw.cfg.batch_max_lines)
    svc.check_models(lines, "requests")
    batch_id = f"msgbatch_{uuid.uuid4().hex}"
    file_id = f"file-{batch_id}-input"
    owner = svc.owner(request)
    await asyncio.to_thread(svc.files.create, lines_to_jsonl(lines), f"{batch_id}.jsonl",
                            "message_batch", file_id, owner)  # fmt: skip
    rec = BatchRecord(batch_id, "anthropic", "/v1/messages", file_id, int(time.time()),
                      total=len(lines), owner=owner)  # fmt: skip
    return JSONResponse((await svc.create(rec)).anthropic(_base(request)))


async def retrieve(gw: Gateway, request: Request) -> Response:
    svc = _service(request)
    rec = await svc.get(request.path_params["batch_id"], "anthropic", svc.owner(request))
    return JSONResponse(rec.anthropic(_base(request)))


async def cancel(gw: Gateway, request: Request) -> Response:
    svc = _service(request)
    rec = await svc.cancel(request.path_params["batch_id"], "anthropic", svc.owner(request))
    return JSONResponse(rec.anthropic(_base(request)))


async def list_batches(gw: Gateway, request: Request) -> Response:
    q = request.query_params
    limit = page_limit(q.get("limit"), 20, 1000)
    svc = _service(request)
    page, more = await svc.page(
        "anthropic", svc.owner(request), limit, q.get("after_id"), q.get("before_id")
    )
    return JSONResponse({
        "data": [r.anthropic(_base(request)) for r in page], "has_more": more,
        "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
    })  # fmt: skip


async def results(gw: Gateway, request: Request) -> Response:
    """The results JSONL, once the batch ended (one line per request, in request order)."""
    svc = _service(request)
    rec = await svc.get(request.path_params["batch_id"], "anthropic", svc.owner(request))
    if rec.status not in ENDED or rec.results_file_id is None:
        raise bad_request(f"batch {rec.id} is still {rec.anthropic_status}: its results are "
                          "available once it has ended")  # fmt: skip
    content = await svc.read_file(rec.results_file_id)
    if content is None:
        raise APIError(404, f"the results of batch {rec.id} are gone")
    return Response(content, media_type="application/binary")
