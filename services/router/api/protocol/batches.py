"""The Batch APIs' bodies, for /openapi.json: OpenAI's Files and Batches, Anthropic's Message
Batches. NOTE: documentation only: api/batches.py, api/message_batches.py and
batches/validate.py check the requests (each line as its endpoint would), and the objects are
written by FileStore.public and BatchRecord.openai / .anthropic; tests validate those against
the response models here."""

from __future__ import annotations

from typing import Any, Literal

from services.router.api.protocol.anthropic import MessagesRequest
from services.router.api.protocol.common import DocModel, ResponseModel

# -- Requests --------------------------------------------------------------------------------


class BatchCreateRequest(DocModel):
    """POST /v1/batches: run the lines of an uploaded ``purpose=batch`` file."""

    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/responses"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None  # at most 16 pairs


class MessageBatchRequest(DocModel):
    custom_id: str  # 1-64 of [A-Za-z0-9_-], unique in the batch
    params: MessagesRequest  # a /v1/messages body without stream


class MessageBatchCreateRequest(DocModel):
    """POST /v1/messages/batches."""

    requests: list[MessageBatchRequest]


# -- OpenAI objects -----------------------------------------------------------------------------


class FileObject(ResponseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str  # "batch" (uploads), "batch_output" (output and error files)
    status: str
    status_details: Any = None
    expires_at: int | None = None


class FileList(ResponseModel):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class FileDeleted(ResponseModel):
    id: str
    object: Literal["file"]
    deleted: Literal[True]


class BatchRequestCounts(ResponseModel):
    total: int
    completed: int
    failed: int


class BatchErrors(ResponseModel):
    object: Literal["list"]
    data: list[dict[str, Any]]


class BatchObject(ResponseModel):
    id: str
    object: Literal["batch"]
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: Literal["24h"]
    status: Literal["validating", "in_progress", "finalizing", "completed", "failed", "expired",
                    "cancelling", "cancelled"]  # fmt: skip
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None


class BatchList(ResponseModel):
    object: Literal["list"]
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


# -- Anthropic objects --------------------------------------------------------------------------


class MessageBatchRequestCounts(ResponseModel):
    processing: int
    succeeded: int
    errored: int
    canceled: int
    expired: int


class MessageBatch(ResponseModel):
    id: str
    type: Literal["message_batch"]
    processing_status: Literal["in_progress", "canceling", "ended"]
    request_counts: MessageBatchRequestCounts
    ended_at: str | None = None  # RFC 3339 times
    created_at: str
    expires_at: str | None = None
    archived_at: str | None = None
    cancel_initiated_at: str | None = None
    results_url: str | None = None


class MessageBatchList(ResponseModel):
    data: list[MessageBatch]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
