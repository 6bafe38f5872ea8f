"""Typed access to fields of a JSON request body; every failure is a 400 APIError."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from services.router.errors import APIError, bad_request

_MISSING = object()


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
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    return body


def _type_name(types: tuple[type, ...]) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
             dict: "object"}  # fmt: skip
    return " or ".join(names.get(t, t.__name__) for t in types)


def get(
    body: dict[str, Any],
    name: str,
    types: type | tuple[type, ...],
    default: Any = None,
    *,
    required: bool = False,
    nullable: bool = True,
) -> Any:
    """``body[name]`` checked against ``types``; ints are accepted where floats are."""
    types = types if isinstance(types, tuple) else (types,)
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and nullable and not required):
        if required:
            raise bad_request(f"missing required field '{name}'", param=name)
        return default
    ok = isinstance(value, types)
    if isinstance(value, bool) and bool not in types:
        ok = False  # JSON true is not a number here
    elif not ok and float in types and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise bad_request(
            f"'{name}' must be {_type_name(types)}, got {type(value).__name__ if value is not None else 'null'}",
            param=name,
        )
    return value


def get_number(
    body: dict[str, Any], name: str, default: float | None, lo: float, hi: float
) -> float | None:
    value = get(body, name, float, default)
    if value is not None and not lo <= value <= hi:
        raise bad_request(f"'{name}' must be in [{lo}, {hi}], got {value}", param=name)
    return value


def get_int(
    body: dict[str, Any], name: str, default: int | None, lo: int, hi: int | None = None
) -> int | None:
    value = get(body, name, int, default)
    if value is not None and (value < lo or (hi is not None and value > hi)):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise bad_request(f"'{name}' must be {bound}, got {value}", param=name)
    return value


def get_stop(body: dict[str, Any], name: str) -> list[str]:
    value = get(body, name, (str, list), None)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not all(isinstance(s, str) for s in value):
        raise bad_request(f"'{name}' must be a string or an array of strings", param=name)
    return list(value)


def get_logit_bias(body: dict[str, Any], name: str = "logit_bias") -> dict[int, float] | None:
    """OpenAI's ``logit_bias``: an object of token ids (as strings, JSON keys being strings)
    to numbers in [-100, 100]; None when absent or empty. Ids past the vocabulary are left
    to the worker, which knows it (also a 400)."""
    value = get(body, name, dict, None)
    if not value:
        return None
    out: dict[int, float] = {}
    for key, bias in value.items():
        # NOTE: ASCII digits only (int() would take " 5", "+5", "5_0" and other scripts'
        # digits); below 2**31, what the wire's int32 holds.
        if not (key.isascii() and key.isdigit()) or int(key) >= 2**31:
            raise bad_request(f"'{name}' keys must be token ids, got {key!r}", param=name)
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise bad_request(
                f"'{name}' values must be numbers in [-100, 100], got {json.dumps(bias)} for "
                f"token {key}",
                param=name,
            )
        out[int(key)] = float(bias)
    return out
