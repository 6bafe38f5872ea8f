"""A request's body as a JSON object: the size limit (413) and the parse (400); its fields are
then checked by the API models."""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import Request

from services.router.errors import APIError, bad_request

# json.loads raises RecursionError (not a ValueError) past ~1,000 levels of arrays/objects.
NESTED_TOO_DEEPLY = "request body is not valid JSON: nested too deeply"


def refuse_constant(name: str) -> float:
    """json.loads' hook for NaN, Infinity and -Infinity, which Python reads but JSON does not
    have: refused (a 400), since a value echoed back (the Responses API returns its
    request's reasoning, text, tools and metadata) cannot be written as JSON again (a 500)."""
    raise ValueError(f"{name} is not a JSON value")


# A JSON escape of a UTF-16 surrogate (\ud800-\udfff): a pair is one character, a lone one
# becomes a Python string that UTF-8 cannot encode.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
_SURROGATE_ESCAPE_BYTES = re.compile(_SURROGATE_ESCAPE.pattern.encode())


def loads(raw: bytes | str) -> Any:
    """JSON as the gateway reads it: ValueError for NaN / Infinity (``refuse_constant``) and
    for a string holding a lone UTF-16 surrogate ("\\ud800": valid JSON, not Unicode text;
    the tokenizer raised TypeError on it, a 500). Strings are walked only when the text has
    such an escape."""
    value = json.loads(raw, parse_constant=refuse_constant)
    found = (
        _SURROGATE_ESCAPE_BYTES.search(raw)
        if isinstance(raw, bytes)
        else _SURROGATE_ESCAPE.search(raw)
    )
    if found:
        todo = [value]
        while todo:  # NOTE: a loop: the value may be ~1,000 levels deep
            item = todo.pop()
            if isinstance(item, dict):
                todo += [*item.keys(), *item.values()]
            elif isinstance(item, list):
                todo += item
            elif isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as exc:
                    bad = item[exc.start].encode("unicode_escape").decode()
                    raise ValueError(f"a string holds a lone UTF-16 surrogate ({bad}), which "
                                     "is not Unicode text") from None  # fmt: skip
    return value


async def read_body(request: Request, max_bytes: int | None) -> bytes:
    """The raw body, or a 413 once it passes ``max_bytes`` (declared or actually sent)."""
    if max_bytes is None:
        return await request.body()
    too_large = APIError(
        413, f"request body exceeds the limit of {max_bytes} bytes", code="request_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large  # NOTE: stop reading: a huge body is never held in memory
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_object(request: Request, max_bytes: int | None = None) -> dict[str, Any]:
    """The body as a JSON object, or a 413 past ``max_bytes``, a 400 for malformed JSON /
    a non-object."""
    raw = await read_body(request, max_bytes)
    # NOTE: parsed on the event loop: json.loads holds the GIL for the whole parse, so a
    # thread would not let the loop run meanwhile (measured: a 4 MB body of small objects
    # stops it for ~0.3 s, a 4 MB prompt string for ~1 ms); --max-body-bytes bounds it.
    try:
        body = loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a NaN, a lone surrogate
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request(NESTED_TOO_DEEPLY) from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    return body
