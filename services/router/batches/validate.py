"""Checks of a batch's input: the lines of an OpenAI batch file (JSONL) and the requests of
an Anthropic message batch. Each failure is a 400 naming the line (or request) and what is
wrong with it, before anything runs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from services.router.api.protocol.body import loads
from services.router.errors import APIError

OPENAI_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
MESSAGES_ENDPOINT = "/v1/messages"
_ANTHROPIC_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # as the Anthropic API requires


@dataclass
class BatchLine:
    """One request of a batch."""

    custom_id: str
    url: str  # the endpoint it goes to
    body: dict[str, Any]  # that endpoint's request body


def _invalid(message: str, code: str, param: str = "file") -> APIError:
    return APIError(400, message, param=param, code=code)


def check_openai_file(lines: Iterable[bytes], max_lines: int) -> int:
    """Check the ``lines`` (without their ends) of an OpenAI batch input file, one at a time:
    400 on the first one that is not a request OpenAI would take (line numbers count from
    1). The number of requests."""
    count = 0
    seen: set[str] = set()
    for n, data in enumerate(lines, 1):
        try:
            raw = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid(f"the batch file is not UTF-8 text (line {n})", "invalid_file") from None
        if not raw.strip():
            continue
        if count >= max_lines:
            raise _invalid(f"the batch file has more than {max_lines} requests", "too_many_lines")
        try:
            obj = loads(raw)
        except ValueError as exc:
            raise _invalid(f"line {n} is not valid JSON: {exc}", "invalid_json_line") from None
        except RecursionError:
            raise _invalid(f"line {n} is not valid JSON: nested too deeply",
                           "invalid_json_line") from None  # fmt: skip
        if not isinstance(obj, dict):
            raise _invalid(f"line {n} must be a JSON object", "invalid_json_line")
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            raise _invalid(f"line {n}: 'custom_id' must be a non-empty string", "missing_custom_id")
        if cid in seen:
            raise _invalid(f"line {n}: custom_id {cid!r} is used by an earlier line; "
                           "custom_id must be unique", "duplicate_custom_id")  # fmt: skip
        seen.add(cid)
        if obj.get("method") != "POST":
            raise _invalid(f"line {n}: 'method' must be 'POST'", "invalid_method")
        url = obj.get("url")
        if url not in OPENAI_ENDPOINTS:
            raise _invalid(f"line {n}: 'url' must be one of {', '.join(OPENAI_ENDPOINTS)}; "
                           f"got {url!r}", "invalid_url")  # fmt: skip
        _body(obj.get("body"), f"line {n}")
        count += 1
    if not count:
        raise _invalid("the batch file has no requests", "empty_file")
    return count


def check_endpoint(lines: list[BatchLine], endpoint: str) -> None:
    """Every line goes to the batch's endpoint (OpenAI: ``mismatched_endpoint`` otherwise)."""
    if endpoint not in OPENAI_ENDPOINTS:
        raise _invalid(f"endpoint must be one of {', '.join(OPENAI_ENDPOINTS)}; got "
                       f"{endpoint!r}", "invalid_endpoint", param="endpoint")  # fmt: skip
    for n, line in enumerate(lines, 1):
        if line.url != endpoint:
            raise _invalid(f"request {n} (custom_id {line.custom_id!r}) has url {line.url!r}, "
                           f"but the batch's endpoint is {endpoint}", "mismatched_endpoint",
                           param="endpoint")  # fmt: skip


def parse_anthropic_requests(requests: Any, max_lines: int) -> list[BatchLine]:
    """The ``requests`` of a message batch; 400 (Anthropic's wording) on the first bad one."""
    if not isinstance(requests, list) or not requests:
        raise _invalid("requests: must be a non-empty array", "invalid_request", "requests")
    if len(requests) > max_lines:
        raise _invalid(f"requests: at most {max_lines} requests in one batch", "too_many_lines",
                       "requests")  # fmt: skip
    lines: list[BatchLine] = []
    seen: set[str] = set()
    for i, item in enumerate(requests):
        where = f"requests.{i}"
        if not isinstance(item, dict):
            raise _invalid(f"{where}: must be an object", "invalid_request", "requests")
        cid = item.get("custom_id")
        if not isinstance(cid, str) or not _ANTHROPIC_CUSTOM_ID.match(cid):
            raise _invalid(f"{where}.custom_id: must be 1-64 letters, digits, '_' or '-'",
                           "invalid_request", "requests")  # fmt: skip
        if cid in seen:
            raise _invalid(f"{where}.custom_id: {cid!r} is used by an earlier request; "
                           "custom_id must be unique", "invalid_request", "requests")  # fmt: skip
        seen.add(cid)
        body = _body(item.get("params"), f"{where}.params")
        if "max_tokens" not in body:
            raise _invalid(f"{where}.params.max_tokens: Field required", "invalid_request",
                           "requests")  # fmt: skip
        if isinstance(body["max_tokens"], bool) or not isinstance(body["max_tokens"], int):
            raise _invalid(f"{where}.params.max_tokens: Input should be a valid integer",
                           "invalid_request", "requests")  # fmt: skip
        lines.append(BatchLine(cid, MESSAGES_ENDPOINT, body))
    return lines


def _body(body: Any, where: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _invalid(f"{where}: 'body' must be a JSON object", "invalid_body")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _invalid(f"{where}: the body needs a 'model'", "missing_model")
    if body.get("stream"):
        raise _invalid(f"{where}: streaming is not supported in a batch", "invalid_body")
    if body.get("background"):  # /v1/responses: a line answers when it is done
        raise _invalid(f"{where}: 'background' is not supported in a batch", "invalid_body")
    return body


def lines_to_jsonl(lines: list[BatchLine]) -> bytes:
    """The OpenAI input file of ``lines`` (how a message batch is stored)."""
    rows = (
        {"custom_id": ln.custom_id, "method": "POST", "url": ln.url, "body": ln.body}
        for ln in lines
    )
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows).encode()


def parse_stored(content: bytes) -> list[BatchLine]:
    """The lines of an input file checked when it was stored (no limits, any endpoint)."""
    out = []
    # NOTE: cut at "\n" only, as the upload's check read them (upload.lines_of): splitlines
    # also cuts at U+2028, U+2029 and U+0085, which a JSON string may hold raw.
    for raw in content.decode("utf-8").split("\n"):
        if raw.strip():
            obj = json.loads(raw)
            out.append(BatchLine(obj["custom_id"], obj["url"], obj["body"]))
    return out
