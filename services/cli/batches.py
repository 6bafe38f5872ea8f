"""Operator commands over the gateway's Batch APIs (OpenAI batches and Anthropic message
batches alike):

    epdserve batches list [--json] [--limit N]
    epdserve batches get ID [--json]
    epdserve batches cancel ID

Flags: ``--router URL`` (or EPDSERVE_ROUTER, or the cluster `epdserve up` started) and
``--api-key`` (or EPDSERVE_API_KEY) when the gateway checks API keys.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from services.cli.admin import AdminCallError, answer, call, quoted
from services.cli.admin_config import resolve_router
from services.cli.admin_render import table

ANTHROPIC_PREFIX = "msgbatch_"


def _path(batch_id: str) -> str:
    """The API path of a batch: message batches have their own."""
    if batch_id.startswith(ANTHROPIC_PREFIX):
        return quoted("v1", "messages", "batches", batch_id)
    return quoted("v1", "batches", batch_id)


def summary(b: dict[str, Any]) -> dict[str, Any]:
    """One batch of either API in one shape: id, api, endpoint, status, counts, created."""
    if b.get("type") == "message_batch":
        c = b["request_counts"]
        return {
            "id": b["id"], "api": "anthropic", "endpoint": "/v1/messages",
            "status": b["processing_status"],
            "total": sum(c.values()), "completed": c["succeeded"], "failed": c["errored"],
            "created": b["created_at"],
        }  # fmt: skip
    c = b["request_counts"]
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b["created_at"]))
    return {
        "id": b["id"], "api": "openai", "endpoint": b["endpoint"], "status": b["status"],
        "total": c["total"], "completed": c["completed"], "failed": c["failed"],
        "created": created,
    }  # fmt: skip


def render(rows: list[dict[str, Any]]) -> str:
    head = ["ID", "API", "ENDPOINT", "STATUS", "DONE/TOTAL", "FAILED", "CREATED"]
    lines = [head] + [
        [r["id"], r["api"], r["endpoint"], r["status"],
         f"{r['completed'] + r['failed']}/{r['total']}", str(r["failed"]), r["created"]]
        for r in rows
    ]  # fmt: skip
    return table(lines)


def build_parser(prog: str = "epdserve batches") -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--router", help="router URL (default: EPDSERVE_ROUTER or `up`'s)")
    common.add_argument("--api-key", help="the gateway's API key (default: EPDSERVE_API_KEY)")
    common.add_argument("--json", action="store_true", help="print JSON")
    parser = argparse.ArgumentParser(prog=prog, description="see and cancel batch jobs")
    sub = parser.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", parents=[common], help="the newest batches of both APIs")
    ls.add_argument("--limit", type=int, default=20, help="at most this many of each API")
    get = sub.add_parser("get", parents=[common], help="one batch")
    get.add_argument("id")
    cancel = sub.add_parser("cancel", parents=[common], help="cancel a batch")
    cancel.add_argument("id")
    return parser


def run(args: argparse.Namespace) -> tuple[Any, str]:
    """(JSON result, text to print) of one command."""
    router = resolve_router(args.router)
    key = args.api_key or os.environ.get("EPDSERVE_API_KEY")
    if args.action == "list":
        if not 1 <= args.limit <= 100:
            raise AdminCallError("--limit must be in [1, 100]")
        found = call(router, key, "GET", f"/v1/batches?limit={args.limit}")["data"]
        found += call(router, key, "GET", f"/v1/messages/batches?limit={args.limit}")["data"]
        rows = sorted((summary(b) for b in found), key=lambda r: r["created"], reverse=True)
        return rows, render(rows) if rows else "no batches"
    if args.action == "get":
        b = call(router, key, "GET", _path(args.id))
        return b, render([summary(b)])
    b = call(router, key, "POST", _path(args.id) + "/cancel", {})
    return b, f"batch {args.id}: {summary(b)['status']}"


def main(argv: list[str], prog: str = "epdserve batches") -> int:
    return answer(build_parser(prog).parse_args(argv), run)
