"""The operator CLI names workers and batches in URL paths: any id is percent-quoted (a space
crashed it with http.client.InvalidURL), and nothing it is pointed at ends it with a traceback:
a bad --router URL, a router that is not there, an answer that is not JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from services.cli import admin, batches
from services.common.member_config import check_instance_id
from tests.local_http import QuietHandler, base_url, local_http

ODD_ID = "w 1?#%&é"


class _Handler(QuietHandler):
    paths: list[str] = []
    answer: bytes = b"{}"

    def do_POST(self) -> None:  # noqa: N802
        self._reply()

    def do_GET(self) -> None:  # noqa: N802
        self._reply()

    def _reply(self) -> None:
        self.paths.append(self.path)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.answer)))
        self.end_headers()
        self.wfile.write(self.answer)


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"paths": [], "answer": b"{}"})
    with local_http(handler) as httpd:
        yield base_url(httpd), handler


def test_ids_are_quoted_in_every_path(server, capsys) -> None:
    url, handler = server
    handler.answer = json.dumps({"id": ODD_ID, "draining": True, "inflight": 0}).encode()
    common = ["--router", url, "--admin-token", "t"]
    assert admin.main(["drain", ODD_ID, *common]) == 0
    handler.answer = json.dumps({"id": ODD_ID, "previous_role": "mixed", "role": "decode"}).encode()
    assert admin.main(["roles", "set", ODD_ID, "decode", *common]) == 0
    counts = {"total": 0, "completed": 0, "failed": 0}
    handler.answer = json.dumps({"id": "a b", "endpoint": "/v1/completions", "status": "failed",
                                 "request_counts": counts, "created_at": 0}).encode()  # fmt: skip
    assert batches.main(["get", "a b", "--router", url]) == 0
    assert batches.main(["cancel", "msgbatch_a/b", "--router", url]) == 0
    quoted_id = "w%201%3F%23%25%26%C3%A9"
    assert handler.paths == [
        f"/admin/workers/{quoted_id}/drain",
        f"/admin/workers/{quoted_id}/role",
        "/v1/batches/a%20b",
        "/v1/messages/batches/msgbatch_a%2Fb/cancel",
    ]


@pytest.mark.parametrize(
    "router",
    ["foo", "http://127.0.0.1:x", "http://127.0.0.1:1 2", "http://127.0.0.1:1"],
)
def test_a_bad_or_absent_router_is_an_error_line(router, capsys) -> None:
    assert admin.main(["status", "--router", router, "--admin-token", "t"]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_an_answer_that_is_not_json_is_an_error_line(server, capsys) -> None:
    url, handler = server
    handler.answer = b"<html>not the router</html>"
    assert admin.main(["status", "--router", url, "--admin-token", "t"]) == 1
    assert "not JSON" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["", "a/b", "a\nb", "a\x00b", "x" * 257])
def test_an_instance_id_no_admin_path_can_name_is_refused(bad) -> None:
    with pytest.raises(ValueError, match="instance_id"):
        check_instance_id(bad)
    check_instance_id(ODD_ID)
