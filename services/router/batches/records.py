"""A batch as the router keeps it in etcd (``BatchRecord``), and how each API shows it: the
OpenAI batch object and the Anthropic message batch object."""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Statuses (OpenAI's names; the Anthropic view maps them, see ``anthropic_status``).
VALIDATING, IN_PROGRESS, FINALIZING = "validating", "in_progress", "finalizing"
COMPLETED, FAILED, CANCELLING, CANCELLED = "completed", "failed", "cancelling", "cancelled"
EXPIRED = "expired"  # the completion window passed with lines not run
ACTIVE = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING)  # the executor still owes work
ENDED = (COMPLETED, FAILED, CANCELLED, EXPIRED)

COMPLETION_WINDOW_S = 24 * 3600  # "24h", the only window OpenAI offers
ANTHROPIC_RESULTS_KEEP_S = 29 * 24 * 3600  # Anthropic: results stay 29 days


@dataclass
class BatchRecord:
    """One batch job: what it runs, where it stands, and the files it made."""

    id: str  # "batch_<hex>" (OpenAI) or "msgbatch_<hex>" (Anthropic)
    api: str  # "openai" | "anthropic": which API created it and shows it
    endpoint: (
        str  # the URL every line is sent to: /v1/chat/completions, /v1/completions,
        # /v1/responses, /v1/messages
    )
    input_file_id: str  # the JSONL of lines (for Anthropic: written by the router itself)
    created_at: int  # unix seconds
    status: str = VALIDATING
    total: int = 0  # lines in the input file
    completed: int = 0  # lines answered 200 (recorded durably)
    failed: int = 0  # lines answered with an error (recorded durably)
    output_file_id: str | None = None  # OpenAI: the 200 answers
    error_file_id: str | None = None  # OpenAI: the other answers
    results_file_id: str | None = None  # Anthropic: every answer
    errors: list[dict[str, Any]] = field(default_factory=list)  # why validation failed
    metadata: dict[str, str] | None = None
    owner: str | None = None  # who may see it: a digest of the creator's API key (None: open API)
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    expired_at: int | None = None

    @property
    def expires_at(self) -> int:
        return self.created_at + COMPLETION_WINDOW_S

    @property
    def done(self) -> int:
        return self.completed + self.failed

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, raw: bytes | str) -> BatchRecord:
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def openai(self) -> dict[str, Any]:
        """The OpenAI batch object."""
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },  # fmt: skip
            "metadata": self.metadata,
        }

    @property
    def anthropic_status(self) -> str:
        if self.status in ENDED:
            return "ended"
        return "canceling" if self.status == CANCELLING else "in_progress"

    def anthropic(self, base_url: str) -> dict[str, Any]:
        """The Anthropic message batch object (``base_url``: this router's, for results_url)."""
        ended = self.status in ENDED
        left = self.total - self.done
        ended_at = self.completed_at or self.failed_at or self.cancelled_at or self.expired_at
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": self.anthropic_status,
            "request_counts": {
                "processing": 0 if ended else left,
                "succeeded": self.completed,
                "errored": self.failed,
                "canceled": left if self.status == CANCELLED else 0,
                "expired": left if self.status == EXPIRED else 0,
            },
            "ended_at": _iso(ended_at),
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "archived_at": None,
            "cancel_initiated_at": _iso(self.cancelling_at),
            "results_url": f"{base_url}/v1/messages/batches/{self.id}/results" if ended else None,
        }


def _iso(t: int | None) -> str | None:
    """RFC 3339 time, as the Anthropic API writes it."""
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class LineResult:
    """One line's answer as recorded (before it counts) in the executor's part file."""

    custom_id: str
    status_code: int  # the HTTP status the endpoint answered; 0: no answer (see error)
    request_id: str  # "batch_req_<hex>"
    body: dict[str, Any] | None  # the endpoint's JSON response (its error body on errors)
    error: dict[str, str] | None = None  # {"code", "message"} when there was no response

    @property
    def ok(self) -> bool:
        return self.status_code == 200

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str) -> LineResult:
        return cls(**json.loads(raw))

    def openai(self) -> dict[str, Any]:
        """A line of the OpenAI output (or error) file."""
        response = None
        if self.status_code:
            response = {
                "status_code": self.status_code, "request_id": self.request_id, "body": self.body,
            }  # fmt: skip
        return {
            "id": self.request_id, "custom_id": self.custom_id, "response": response,
            "error": self.error,
        }  # fmt: skip

    def anthropic(self) -> dict[str, Any]:
        """A line of the Anthropic results file."""
        if self.ok:
            return {"custom_id": self.custom_id, "result": {"type": "succeeded",
                                                            "message": self.body}}  # fmt: skip
        body = self.body if self.body and self.body.get("type") == "error" else None
        if body is None:
            message = (self.error or {}).get("message", f"status {self.status_code}")
            body = {"type": "error", "error": {"type": "api_error", "message": message}}
        return {"custom_id": self.custom_id, "result": {"type": "errored", "error": body}}


def unrun_line(custom_id: str, api: str, status: str) -> dict[str, Any]:
    """The output line of a request left unrun when the batch was cancelled or expired:
    Anthropic's ``canceled`` / ``expired`` result; for OpenAI (expired only: a cancelled
    batch lists nothing more) an error-file line with code ``batch_expired``."""
    if api == "anthropic":
        return {"custom_id": custom_id,
                "result": {"type": "canceled" if status == CANCELLED else "expired"}}  # fmt: skip
    error = {"code": "batch_expired",
             "message": "This request could not be executed before the completion window "
             "expired."}  # fmt: skip
    return {"id": f"batch_req_{custom_id}", "custom_id": custom_id, "response": None,
            "error": error}  # fmt: skip
