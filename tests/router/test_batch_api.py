"""Malformed input to the Batch APIs, against an in-process gateway (real etcd, no workers):
each is a 4xx in its API's own error format, never a 5xx."""

from __future__ import annotations

import pytest
from router_fakes import start_gateway

from services.common.etcd_server import EtcdServer
from services.router.api.protocol import batches as P

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

MP = {"content-type": "multipart/form-data; boundary=x"}
ADMIN = {"Authorization": "Bearer admin-token"}  # EPDSERVE_ADMIN_TOKEN in the test
LINE = b'{"custom_id":"a","method":"POST","url":"/v1/completions","body":{"model":"m"'
# Nested past json.loads' recursion limit: a RecursionError, which was a 500 on every route.
DEEP = b'{"a":' * 5000 + b"1" + b"}" * 5000
DEEP_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings",
              "/v1/rerank", "/tokenize", "/v1/batches")  # fmt: skip
# (method, path, request arguments, status, the error's code or message part)
OPENAI = [
    ("POST", "/v1/files", {"content": b"garbage", "headers": MP}, 400, "multipart"),
    ("POST", "/v1/files", {"content": b"", "headers": {"content-type": "multipart/form-data"}},
     400, "multipart"),
    ("POST", "/v1/files", {"json": {"a": 1}}, 400, "multipart/form-data"),
    ("POST", "/v1/files", {"content": b"--x\r\nContent-Disposition: form-data; name=purpose"
                           b"\r\n\r\nbatch\r\n--x--", "headers": MP}, 400, "'file'"),
    ("POST", "/v1/files", {"files": {"file": ("a", b"\xff\xfe")}, "data": {"purpose": "batch"}},
     400, "invalid_file"),
    ("POST", "/v1/files", {"files": {"file": ("a", LINE + b',"stream":true}}')},
                           "data": {"purpose": "batch"}}, 400, "invalid_body"),
    ("GET", "/v1/files?limit=abc", {}, 400, "limit"),
    # "²" (%C2%B2) is a digit to str.isdigit, not to int(): a 500.
    ("GET", "/v1/files?limit=%C2%B2", {}, 400, "limit"),
    ("GET", "/v1/files/%00/content", {}, 404, "not_found"),
    ("DELETE", "/v1/files/file-nope", {}, 404, "not_found"),
    ("POST", "/v1/batches", {"content": b"not json"}, 400, "not valid JSON"),
    ("POST", "/v1/batches", {"json": [1]}, 400, "JSON object"),
    ("POST", "/v1/batches", {"json": {"input_file_id": 5, "completion_window": "24h"}}, 400,
     "input_file_id"),
    ("POST", "/v1/batches", {"json": {"input_file_id": "f", "completion_window": 24}}, 400,
     "completion_window"),
    ("GET", "/v1/batches?limit=1000", {}, 400, "limit"),
    ("GET", "/v1/batches/batch_x", {}, 404, "not_found"),
    ("POST", "/v1/batches/batch_x/cancel", {}, 404, "not_found"),
    *[("POST", path, {"content": DEEP}, 400, "nested too deeply") for path in DEEP_PATHS],
    ("POST", "/v1/files", {"files": {"file": ("a", LINE + b',"x":' + DEEP + b"}}")},
                           "data": {"purpose": "batch"}}, 400, "nested too deeply"),
    ("POST", "/v1/load_lora_adapter", {"content": DEEP, "headers": ADMIN}, 400, "not JSON"),
    # NaN is no JSON value: echoed back (the Responses API returns its reasoning), it was a 500.
    ("POST", "/v1/responses", {"content": b'{"model":"m","input":"x","reasoning":{"effort":NaN}}'},
     400, "NaN is not a JSON value"),
    ("POST", "/v1/chat/completions", {"content": b'{"model":"m","temperature":-Infinity}'}, 400,
     "-Infinity is not a JSON value"),
    ("POST", "/v1/files", {"files": {"file": ("a", LINE + b',"temperature":NaN}}')},
                           "data": {"purpose": "batch"}}, 400, "NaN is not a JSON value"),
    # A lone UTF-16 surrogate is JSON but not Unicode: the tokenizer's TypeError was a 500.
    ("POST", "/v1/completions", {"content": b'{"model":"m","prompt":"a\\ud800"}'}, 400,
     "lone UTF-16 surrogate (\\ud800)"),
    ("POST", "/v1/files", {"files": {"file": ("a", LINE + b',"user":"\\udfff"}}')},
                           "data": {"purpose": "batch"}}, 400, "lone UTF-16 surrogate"),
]  # fmt: skip
ANTHROPIC = [
    ("POST", "/v1/messages/batches", {"content": b"{"}, 400, "not valid JSON"),
    ("POST", "/v1/messages/batches", {"json": {"requests": "x"}}, 400, "non-empty array"),
    ("POST", "/v1/messages/batches", {"json": {"requests": [{"custom_id": "a", "params": {
        "model": "m", "max_tokens": "x"}}]}}, 400, "valid integer"),
    ("GET", "/v1/messages/batches?limit=-1", {}, 400, "limit"),
    ("GET", "/v1/messages/batches?limit=%C2%B2", {}, 400, "limit"),
    ("GET", "/v1/messages/batches/msgbatch_x/results", {}, 404, "No batch"),
    ("POST", "/v1/messages/batches/msgbatch_x/cancel", {}, 404, "No batch"),
    ("POST", "/v1/messages", {"content": DEEP}, 400, "nested too deeply"),
    ("POST", "/v1/messages/batches", {"content": DEEP}, 400, "nested too deeply"),
    ("POST", "/v1/messages", {"content": b'{"model":"m","messages":[{"role":"user","content":'
                              b'"\\udc00"}]}'}, 400, "lone UTF-16 surrogate"),
]  # fmt: skip


async def test_bad_batch_requests_are_4xx_in_the_apis_format(tmp_path, monkeypatch) -> None:
    import httpx

    monkeypatch.setenv("EPDSERVE_ADMIN_TOKEN", "admin-token")
    with EtcdServer() as etcd:
        g = await start_gateway(etcd.endpoint, "batch-api", batch_dir=str(tmp_path))
        try:
            async with httpx.AsyncClient(base_url=g.url, timeout=10) as c:
                for method, path, kw, status, part in OPENAI + ANTHROPIC:
                    r = await c.request(method, path, **kw)
                    assert r.status_code == status, (path, r.text)
                    body = r.json()
                    if path.startswith("/v1/messages"):
                        assert body["type"] == "error" and part in body["error"]["message"]
                    else:
                        err = body["error"]
                        assert part in (err["code"] or "") + err["message"], (path, err)
        finally:
            await g.stop()


@pytest.fixture(autouse=True)
def _no_api_keys(monkeypatch):
    monkeypatch.delenv("EPDSERVE_API_KEYS", raising=False)


async def test_only_unended_batches_are_marked_for_the_executor() -> None:
    from dataclasses import replace

    from services.router.batches.records import BatchRecord
    from services.router.batches.store import BatchStore

    with EtcdServer() as etcd:
        store = BatchStore([etcd.endpoint], "marks")
        try:
            for i in range(3):
                await store.create(BatchRecord(f"batch_{i}", "openai", "/v1/completions", "f", i))
            assert sorted(await store.active_ids()) == ["batch_0", "batch_1", "batch_2"]
            await store.update("batch_1", lambda r: replace(r, status="in_progress"))
            await store.update("batch_2", lambda r: replace(r, status="completed"))
            assert sorted(await store.active_ids()) == ["batch_0", "batch_1"]
            assert [r.id for r in await store.all()] == ["batch_2", "batch_1", "batch_0"]
            await store.drop_active("batch_0")
            assert await store.active_ids() == ["batch_1"]
        finally:
            await store.close()


async def test_retention_sweeps_old_ended_batches_and_unnamed_files(tmp_path) -> None:
    import time

    from services.router.batches.files import FileStore
    from services.router.batches.records import BatchRecord
    from services.router.batches.retention import sweep
    from services.router.batches.store import BatchStore

    files, t = FileStore(tmp_path, retention_s=50.0), int(time.time())
    fid = {n: files.create(b"{}\n", n, "batch", f"file-{n}")["id"]
           for n in ("old-in", "run-in", "kept-out", "gone-out", "msg-in", "stray")}  # fmt: skip
    assert files.get(fid["stray"])["expires_at"] - t in (50, 51)  # made now: gone in 50 s
    recs = [
        BatchRecord("batch_gone", "openai", "/v1/completions", fid["old-in"], t - 90,
                    status="completed", completed_at=t + 40, output_file_id=fid["gone-out"]),
        BatchRecord("msgbatch_gone", "anthropic", "/v1/messages", fid["msg-in"], t - 90,
                    status="cancelled", cancelled_at=t + 10),
        BatchRecord("batch_kept", "openai", "/v1/completions", fid["old-in"], t,
                    status="expired", expired_at=t + 80, error_file_id=fid["kept-out"]),
        BatchRecord("batch_running", "openai", "/v1/completions", fid["run-in"], t - 90,
                    status="in_progress"),
    ]  # fmt: skip
    with EtcdServer() as etcd:
        store = BatchStore([etcd.endpoint], "retention")
        try:
            for rec in recs:
                await store.create(rec)
            # 100 s on, with 50 s of retention: ended at t + 40 and t + 10 go, t + 80 stays.
            swept = await sweep(store, files, 50.0, t + 100)
            assert sorted(r.id for r in await store.all()) == ["batch_kept", "batch_running"]
            left = sorted(m["id"] for m in files.all())
            # The kept batches' files stay (old-in is batch_kept's input); stray and the swept
            # batches' outputs and stored requests go.
            assert left == sorted([fid["old-in"], fid["run-in"], fid["kept-out"]])
            assert (swept.batches, swept.files) == (2, 3)
            assert (await sweep(store, files, 50.0, t + 100)).batches == 0
        finally:
            await store.close()


async def test_a_file_that_cannot_be_deleted_does_not_end_the_sweep(tmp_path, monkeypatch) -> None:
    import time

    from services.router.batches.files import FileStore
    from services.router.batches.retention import sweep

    class NoBatches:  # the store's part the sweep reads
        async def all(self) -> list:
            return []

    files = FileStore(tmp_path, retention_s=50.0)
    for n in ("a-locked", "b-stray"):
        files.create(b"{}\n", n, "batch", f"file-{n}")
    delete = FileStore.delete

    def refuse_one(self, file_id: str) -> bool:
        if file_id == "file-a-locked":  # e.g. EACCES or ESTALE on the shared volume
            raise PermissionError(13, "Permission denied", file_id)
        return delete(self, file_id)

    monkeypatch.setattr(FileStore, "delete", refuse_one)
    # Before: the PermissionError left the sweep, and the executor's loop with it (no batch
    # ran on that router again).
    swept = await sweep(NoBatches(), files, 50.0, time.time() + 100)  # type: ignore[arg-type]
    assert swept.files == 1
    assert [m["id"] for m in files.all()] == ["file-a-locked"]


async def test_the_sweep_deletes_temporary_files_that_a_killed_router_left(tmp_path) -> None:
    import os
    import time

    from services.router.batches.files import FileStore
    from services.router.batches.retention import TEMPORARY_S, sweep

    class NoBatches:  # the store's part the sweep reads
        async def all(self) -> list:
            return []

    files, now = FileStore(tmp_path), time.time()
    kept = files.create(b"{}\n", "in.jsonl", "batch")["id"]
    names = (".upload-old", ".file-x.json.1234abcd.tmp", ".upload-live", ".hidden")
    for name in names:
        (files.dir / name).write_bytes(b"x" * 10)
    for name in (*names[:2], names[3]):  # the live upload was written to just now
        os.utime(files.dir / name, (now - TEMPORARY_S - 1, now - TEMPORARY_S - 1))
    swept = await sweep(NoBatches(), files, 1e9, now)  # type: ignore[arg-type]
    assert swept.temporaries == 2
    assert sorted(p.name for p in files.dir.iterdir()) == sorted(
        [".hidden", ".upload-live", kept, f"{kept}.json"]
    )


async def test_each_api_key_sees_only_its_own_files_and_batches(tmp_path, monkeypatch) -> None:
    import httpx

    monkeypatch.setenv("EPDSERVE_API_KEYS", "key-a,key-b")
    a, b = ({"Authorization": f"Bearer key-{k}"} for k in "ab")
    with EtcdServer() as etcd:
        g = await start_gateway(etcd.endpoint, "batch-keys", batch_dir=str(tmp_path))
        try:
            async with httpx.AsyncClient(base_url=g.url, timeout=10) as c:
                up = await c.post("/v1/files", headers=a, data={"purpose": "batch"},
                                  files={"file": ("in.jsonl", LINE + b"}}\n")})  # fmt: skip
                fid = up.json()["id"]
                assert up.status_code == 200 and "owner" not in up.json()
                made = await c.post("/v1/batches", headers=a, json={
                    "input_file_id": fid, "endpoint": "/v1/completions",
                    "completion_window": "24h"})  # fmt: skip
                bid = made.json()["id"]
                mb = await c.post("/v1/messages/batches", headers={"x-api-key": "key-a"}, json={
                    "requests": [{"custom_id": "a", "params": {"model": "m", "max_tokens": 2,
                                                               "messages": []}}]})  # fmt: skip
                mid = mb.json()["id"]
                # What /openapi.json documents (its models forbid fields they do not name).
                P.FileObject.model_validate(up.json())
                P.BatchObject.model_validate(made.json())
                P.MessageBatch.model_validate(mb.json())
                for path, model in (("/v1/files", P.FileList), ("/v1/batches", P.BatchList),
                                    ("/v1/messages/batches", P.MessageBatchList)):  # fmt: skip
                    model.model_validate((await c.get(path, headers=a)).json())
                for path in (f"/v1/files/{fid}", f"/v1/files/{fid}/content", f"/v1/batches/{bid}",
                             f"/v1/messages/batches/{mid}"):  # fmt: skip
                    assert (await c.get(path, headers=a)).status_code == 200, path
                    assert (await c.get(path, headers=b)).status_code == 404, path
                for path in (f"/v1/batches/{bid}/cancel", f"/v1/messages/batches/{mid}/cancel"):
                    assert (await c.post(path, headers=b)).status_code == 404, path
                assert (await c.delete(f"/v1/files/{fid}", headers=b)).status_code == 404
                cancelled = await c.post(f"/v1/batches/{bid}/cancel", headers=a)
                P.BatchObject.model_validate(cancelled.json())
                stolen = await c.post("/v1/batches", headers=b, json={
                    "input_file_id": fid, "endpoint": "/v1/completions",
                    "completion_window": "24h"})  # fmt: skip
                assert stolen.status_code == 404
                for path, field in (("/v1/files", "data"), ("/v1/batches", "data"),
                                    ("/v1/messages/batches", "data")):  # fmt: skip
                    mine = (await c.get(path, headers=a)).json()[field]
                    theirs = (await c.get(path, headers=b)).json()[field]
                    assert len(mine) == 1 and theirs == [], path
                assert all(
                    "owner" not in f for f in (await c.get("/v1/files", headers=a)).json()["data"]
                )
        finally:
            await g.stop()


async def test_the_form_splits_at_every_chunk_boundary(tmp_path, monkeypatch) -> None:
    """The streamed multipart split gives the file's bytes exactly (CRLF line ends, a line
    that starts like the delimiter) and the fields, whatever the chunk size cuts through."""
    import httpx

    from services.router.batches import upload

    content = LINE + b"}}\r\n--x not the end\r\n\r\n" + LINE + b"}}\n"
    req = httpx.Request("POST", "http://h/v1/files", data={"purpose": "batch"},
                        files={"file": ("in.jsonl", content)})  # fmt: skip
    body = tmp_path / "body"
    body.write_bytes(req.read())
    boundary = upload.boundary_of(req.headers["content-type"])
    for chunk in (1, 2, 3, 7, 64, 1 << 16):
        monkeypatch.setattr(upload, "CHUNK", chunk)
        fields, name, has_file = upload.split_form(body, boundary, tmp_path / "part")
        assert (fields, name, has_file) == ({"purpose": b"batch"}, "in.jsonl", True), chunk
        assert (tmp_path / "part").read_bytes() == content, chunk


async def test_a_form_of_many_parts_is_refused(tmp_path) -> None:
    """A body of many tiny parts is a 400, not minutes of header parsing (a 64 MiB body holds
    a million parts; before, every one was parsed and kept)."""
    from services.router.batches import upload
    from services.router.errors import APIError

    def form(n: int) -> bytes:
        parts = [b'--B\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nv\r\n' % i
                 for i in range(n)]  # fmt: skip
        return (
            b"".join(parts) + b'--B\r\nContent-Disposition: form-data; name="purpose"'
            b"\r\n\r\nbatch\r\n--B--\r\n"
        )

    body = tmp_path / "body"
    body.write_bytes(form(upload.MAX_PARTS - 1))
    fields, _, has_file = upload.split_form(body, b"B", tmp_path / "part")
    assert (len(fields), fields["purpose"], has_file) == (upload.MAX_PARTS, b"batch", False)
    body.write_bytes(form(upload.MAX_PARTS))
    with pytest.raises(APIError) as err:
        upload.split_form(body, b"B", tmp_path / "part")
    assert err.value.status == 400 and "parts" in err.value.message


async def test_uploads_stream_to_disk_and_leave_nothing_behind(tmp_path) -> None:
    import httpx

    content = b"".join(LINE.replace(b'"a"', f'"c{i}"'.encode()) + b"}}\n" for i in range(3))
    with EtcdServer() as etcd:
        g = await start_gateway(etcd.endpoint, "batch-stream", batch_dir=str(tmp_path),
                                batch_max_file_bytes=4096)  # fmt: skip
        try:
            async with httpx.AsyncClient(base_url=g.url, timeout=10) as c:
                up = await c.post("/v1/files", data={"purpose": "batch"},
                                  files={"file": ("in.jsonl", content)})  # fmt: skip
                assert up.status_code == 200, up.text
                assert up.json()["bytes"] == len(content)
                got = await c.get(f"/v1/files/{up.json()['id']}/content")
                assert got.content == content

                async def chunked():  # no Content-Length: the limit is met while streaming
                    yield b"--x\r\nContent-Disposition: form-data; name=file; filename=a\r\n\r\n"
                    for _ in range(1000):  # past the limit and the form's allowance
                        yield LINE + b"}}\n"

                big = await c.post("/v1/files", content=chunked(),
                                   headers={"content-type": "multipart/form-data; boundary=x"})  # fmt: skip
                assert big.status_code == 400, big.text
                assert big.json()["error"]["code"] == "file_too_large", big.text
            assert not list((tmp_path / "files").glob(".upload-*"))
        finally:
            await g.stop()
