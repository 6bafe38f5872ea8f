"""API errors and their JSON bodies in the OpenAI and the Anthropic formats."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

# HTTP status -> Anthropic error type (https://docs.anthropic.com/en/api/errors)
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}
# HTTP status -> OpenAI error type
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    408: "timeout",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout",
}
# A 503 that names no Retry-After of its own gets this one (seconds): every 503 here is a
# state that passes (no worker yet, workers restarting or draining), and the SDKs' retries
# and well-behaved clients wait for the header rather than retrying at once.
DEFAULT_503_RETRY_AFTER_S = 1


class APIError(Exception):
    """An error to report to the client with ``status``; ``param``/``code`` as OpenAI has them;
    ``headers`` go on the response (e.g. ``Retry-After``)."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        if status == 503 and not any(k.lower() == "retry-after" for k in headers or {}):
            headers = {**(headers or {}), "Retry-After": str(DEFAULT_503_RETRY_AFTER_S)}
        self.headers = headers

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _OPENAI_TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_body(self) -> dict[str, Any]:
        return {
            "type": "error",
            "error": {
                "type": _ANTHROPIC_TYPES.get(self.status, "api_error"),
                "message": self.message,
            },
        }

    def openai_response(self) -> JSONResponse:
        return JSONResponse(self.openai_body(), status_code=self.status, headers=self.headers)

    def anthropic_response(self) -> JSONResponse:
        return JSONResponse(self.anthropic_body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def empty_array(name: str) -> APIError:
    """OpenAI's 400 for an array its schema gives minItems 1 (``name``: where it is, such as
    ``messages[0].content``)."""
    return bad_request(f"Invalid '{name}': empty array. Expected an array with minimum length "
                       "1, but got an empty array instead.", param=name, code="empty_array")  # fmt: skip


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was complete."""
