"""Credentials of the gateway: loading the API keys and the admin token, and checking a
request's key in constant time."""

from __future__ import annotations

import hmac
import os

from starlette.requests import Request

from services.router.errors import APIError

KEYS_ENV = "EPDSERVE_API_KEYS"
TOKEN_ENV = "EPDSERVE_ADMIN_TOKEN"  # the admin token, without --admin-token-file


def load_api_keys(keys_file: str | None) -> list[bytes]:
    """Keys from the file (one a line; blank lines and ``#`` comments skipped) if one is
    given, else from ``$EPDSERVE_API_KEYS`` (comma-separated). Empty: the API is open."""
    if keys_file:
        with open(keys_file, encoding="utf-8") as f:
            keys = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        if not keys:
            raise ValueError(f"API keys file {keys_file} holds no key")
    else:
        keys = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
    return [k.encode() for k in keys]


def load_admin_token(token_file: str | None) -> str | None:
    """The admin token: the file's first line if a file is given, else the environment."""
    if token_file:
        with open(token_file, encoding="utf-8") as f:
            token = f.readline().strip()
        if not token:
            raise ValueError(f"admin token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def presented_key(request: Request) -> str | None:
    """The key in ``Authorization: Bearer <key>`` or, failing that, ``x-api-key``."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key", "").strip() or None


def check_api_key(keys: list[bytes], request: Request) -> None:
    """401 unless no key is configured or the request presents one of ``keys``.

    NOTE: every key is compared (no early exit), each with hmac.compare_digest, so that the
    time taken tells nothing of which key, or how much of one, matched. Keys are never logged.
    """
    if not keys:
        return
    given = presented_key(request)
    if given is None:
        raise APIError(
            401, "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
            code="invalid_api_key",
        )  # fmt: skip
    given_b = given.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given_b, key)
    if not ok:
        raise APIError(401, "invalid API key", code="invalid_api_key")
