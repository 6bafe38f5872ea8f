"""Credentials of the gateway: loading the API keys (each with the service tiers it may
use) and the admin token, and checking a request's key in constant time."""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from starlette.requests import Request

from services.router.errors import APIError
from services.router.tiers import KeyTiers

KEYS_ENV = "EPDSERVE_API_KEYS"
TOKEN_ENV = "EPDSERVE_ADMIN_TOKEN"  # the admin token, without --admin-token-file


@dataclass(frozen=True)
class APIKey:
    key: bytes
    tiers: KeyTiers  # the service tiers requests with this key may use


def load_api_keys(keys_file: str | None) -> list[APIKey]:
    """Keys from the file (one a line; blank lines and ``#`` comments skipped) if one is
    given, else from ``$EPDSERVE_API_KEYS`` (comma-separated). Empty: the API is open. A
    key may be followed by ``default_tier=T`` and ``max_tier=T`` (whitespace-separated; T
    one of priority, default, flex): e.g. ``k-batch max_tier=flex`` is an offline-only key."""
    if keys_file:
        with open(keys_file, encoding="utf-8") as f:
            keys = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        if not keys:
            raise ValueError(f"API keys file {keys_file} holds no key")
    else:
        keys = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
    out = []
    for entry in keys:
        key, *options = entry.split()
        out.append(APIKey(key.encode(), KeyTiers.parse(options)))
    return out


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


def check_api_key(keys: list[APIKey], request: Request) -> APIKey | None:
    """401 unless no key is configured (None) or the request presents one of ``keys``
    (returned).

    NOTE: every key is compared (no early exit), each with hmac.compare_digest, so that the
    time taken tells nothing of which key, or how much of one, matched. Keys are never logged.
    """
    if not keys:
        return None
    given = presented_key(request)
    if given is None:
        raise APIError(
            401, "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
            code="invalid_api_key",
        )  # fmt: skip
    given_b = given.encode()
    found = None
    for key in keys:
        if hmac.compare_digest(given_b, key.key):
            found = key
    if found is None:
        raise APIError(401, "invalid API key", code="invalid_api_key")
    return found


def key_tiers(request: Request) -> KeyTiers | None:
    """The tiers the request's API key may use (None: no key checked, all of them)."""
    key = getattr(request.state, "api_key", None)
    return key.tiers if key is not None else None
