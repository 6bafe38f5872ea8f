"""OpenAI Files and Batch APIs: /v1/files (upload a JSONL of requests, read, list, delete)
and /v1/batches (create, retrieve, list, cancel). The lines are checked at upload and at
creation (400s in OpenAI's format); the leader router runs them (batches/executor.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.router.api.protocol.body import read_json_object
from services.router.batches import upload
from services.router.batches.records import BatchRecord
from services.router.batches.service import BatchService, page_limit, paginate
from services.router.batches.validate import check_endpoint, check_openai_file, parse_stored
from services.router.errors import APIError, bad_request

if TYPE_CHECKING:
    from services.router.gateway import Gateway

MULTIPART_OVERHEAD = 64 * 1024  # form fields and part headers around the file's bytes


def _service(request: Request) -> BatchService:
    return request.app.state.batches


def _too_large(limit: int) -> APIError:
    return bad_request(f"the file exceeds the limit of {limit} bytes", param="file",
                       code="file_too_large")  # fmt: skip


async def create_file(gw: Gateway, request: Request) -> Response:
    """POST /v1/files: a batch input file, streamed to disk and checked line by line before
    it is kept (batches/upload.py)."""
    limit, svc = gw.cfg.batch_max_file_bytes, _service(request)
    boundary = upload.boundary_of(request.headers.get("content-type", ""))
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
        raise _too_large(limit)
    with upload.Upload(svc.files.dir) as up:
        body, part = up.new_path(), up.new_path()
        await upload.receive(request.stream(), body, limit + MULTIPART_OVERHEAD)
        fields, filename, has_file = await asyncio.to_thread(
            upload.split_form, body, boundary, part
        )
        purpose = fields.get("purpose", b"").decode(errors="replace")
        if purpose != "batch":
            raise bad_request(f"purpose must be 'batch' (the only one served); got {purpose!r}",
                              param="purpose")  # fmt: skip
        if not has_file:
            raise bad_request("a 'file' field is required", param="file")
        if part.stat().st_size > limit:
            raise _too_large(limit)
        await asyncio.to_thread(check_openai_file, upload.lines_of(part), gw.cfg.batch_max_lines)
        meta = await asyncio.to_thread(
            svc.files.adopt, part, filename or "batch.jsonl", "batch", svc.owner(request)
        )
    return JSONResponse(svc.files.public(meta))


def _file_or_404(svc: BatchService, request: Request) -> dict[str, Any]:
    return svc.file(request.path_params["file_id"], svc.owner(request))


async def get_file(gw: Gateway, request: Request) -> Response:
    svc = _service(request)
    return JSONResponse(svc.files.public(_file_or_404(svc, request)))


async def file_content(gw: Gateway, request: Request) -> Response:
    svc, file_id = _service(request), request.path_params["file_id"]
    _file_or_404(svc, request)
    content = await svc.read_file(file_id)
    if content is None:
        raise APIError(404, f"No such File object: {file_id}", param="id", code="not_found")
    return Response(content, media_type="application/octet-stream")


async def delete_file(gw: Gateway, request: Request) -> Response:
    svc, file_id = _service(request), request.path_params["file_id"]
    _file_or_404(svc, request)
    await asyncio.to_thread(svc.files.delete, file_id)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


async def list_files(gw: Gateway, request: Request) -> Response:
    q = request.query_params
    limit = page_limit(q.get("limit"), 10000, 10000)
    svc = _service(request)
    files = await asyncio.to_thread(svc.files.list, svc.owner(request), q.get("purpose"))
    # NOTE: a message batch's requests are stored as a file too; OpenAI's list leaves them out.
    files = [svc.files.public(f) for f in files
             if q.get("purpose") or f.get("purpose") != "message_batch"]  # fmt: skip
    if q.get("order", "desc") == "asc":
        files.reverse()
    page, more = paginate(files, lambda f: f["id"], limit, q.get("after"))
    return JSONResponse(_list(page, more, lambda f: f["id"]))


def _list(page: list[Any], more: bool, key: Any) -> dict[str, Any]:
    return {
        "object": "list", "data": [p if isinstance(p, dict) else p.openai() for p in page],
        "first_id": key(page[0]) if page else None, "last_id": key(page[-1]) if page else None,
        "has_more": more,
    }  # fmt: skip


async def create_batch(gw: Gateway, request: Request) -> Response:
    """POST /v1/batches: checked now (file, endpoint, window, every line's url and model)."""
    svc = _service(request)
    body = await read_json_object(request, gw.cfg.max_body_bytes)
    window, endpoint = body.get("completion_window"), body.get("endpoint")
    if window != "24h":
        raise bad_request(f"completion_window must be '24h'; got {window!r}",
                          param="completion_window")  # fmt: skip
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str):
        raise bad_request("input_file_id must be a string", param="input_file_id")
    owner = svc.owner(request)
    meta = svc.file(file_id, owner, param="input_file_id")
    if meta.get("purpose") != "batch":
        raise bad_request(f"file {file_id} has purpose {meta.get('purpose')!r}, not 'batch'",
                          param="input_file_id")  # fmt: skip
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict) and len(metadata) <= 16
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):  # fmt: skip
        raise bad_request("metadata must map at most 16 strings to strings", param="metadata")
    content = await svc.read_file(file_id)
    if content is None:
        raise APIError(404, f"No such File object: {file_id}", param="input_file_id")
    lines = await asyncio.to_thread(parse_stored, content)
    check_endpoint(lines, endpoint if isinstance(endpoint, str) else repr(endpoint))
    svc.check_models(lines, "input_file_id")
    rec = BatchRecord(f"batch_{uuid.uuid4().hex}", "openai", str(endpoint), file_id,
                      int(time.time()), total=len(lines), metadata=metadata,
                      owner=owner)  # fmt: skip
    return JSONResponse((await svc.create(rec)).openai())


async def get_batch(gw: Gateway, request: Request) -> Response:
    svc = _service(request)
    rec = await svc.get(request.path_params["batch_id"], "openai", svc.owner(request))
    return JSONResponse(rec.openai())


async def cancel_batch(gw: Gateway, request: Request) -> Response:
    svc = _service(request)
    rec = await svc.cancel(request.path_params["batch_id"], "openai", svc.owner(request))
    return JSONResponse(rec.openai())


async def list_batches(gw: Gateway, request: Request) -> Response:
    q = request.query_params
    limit = page_limit(q.get("limit"), 20, 100)
    svc = _service(request)
    page, more = await svc.page("openai", svc.owner(request), limit, q.get("after"))
    return JSONResponse(_list(page, more, lambda r: r.id))
