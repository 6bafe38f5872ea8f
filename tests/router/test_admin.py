"""Admin API, desired roles in etcd and worker convergence, with fake engines and a real etcd."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
import pytest_asyncio
from router_fakes import FakeEngine, start_fake_worker, start_gateway

from services.cli import admin
from services.common.etcd_server import EtcdServer
from services.common.grpc_utils import insecure_channel
from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc
from services.worker import starting

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio]

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
_n = 0


def _cluster() -> str:
    global _n
    _n += 1
    return f"adm{_n}"


async def _until(pred, timeout: float = 10.0, what: str = "condition") -> None:
    for _ in range(int(timeout / 0.05)):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not reached in {timeout}s")


@pytest_asyncio.fixture
async def two(etcd, tmp_path):
    """Two mixed fake workers following their desired roles, and a router with a token."""
    cluster = _cluster()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    engine = FakeEngine(step_s=0.02)
    w1 = await start_fake_worker(etcd.endpoint, cluster, "w1", engine, watch_roles=True)
    w2 = await start_fake_worker(etcd.endpoint, cluster, "w2", watch_roles=True)
    # NOTE: the router's default load_stale_s (5 s), not router_fakes' 1 s: these tests check
    # what the admin API says of two live workers, and on a loaded host (the test process at
    # 8 % of a core) their reports came over 1 s apart: /health and /admin/health said 503.
    gw = await start_gateway(etcd.endpoint, cluster, admin_token_file=str(token_file),
                             load_stale_s=5.0)  # fmt: skip
    pool = gw.gateway.pool
    await _until(lambda: len(pool.candidates()) == 2, what="two usable workers")
    async with httpx.AsyncClient(base_url=gw.url, timeout=20) as client:
        yield client, w1, w2, gw
    await asyncio.wait_for(gw.stop(), 15)
    await asyncio.wait_for(w1.stop(), 15)
    await asyncio.wait_for(w2.stop(), 15)


async def test_admin_needs_the_token(two) -> None:
    c, *_ = two
    assert (await c.get("/admin/status")).status_code == 401
    r = await c.get("/admin/status", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = await c.get("/admin/status", headers={"Authorization": f"Basic {TOKEN}"})
    assert r.status_code == 401
    assert (await c.get("/admin/status", headers=AUTH)).status_code == 200


async def test_health_counts_workers_and_names_them_only_behind_the_token(two) -> None:
    c, w1, w2, _ = two
    r = await c.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["workers"] == 2 and body["ready"] == 2
    assert body["roles"]["mixed"] == {"workers": 2, "ready": 2}
    assert body["roles"]["prefill"] == {"workers": 0, "ready": 0}
    for secret in (w1.address, w2.address, "w1", "w2", w1.address.rsplit(":", 1)[1]):
        assert secret not in r.text, secret
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert (await c.get("/admin/health", headers=headers)).status_code == 401
    r = await c.get("/admin/health", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    workers = r.json()["workers"]
    assert set(workers) == {"w1", "w2"}
    assert workers["w1"]["address"] == w1.address and workers["w1"]["role"] == "mixed"
    assert workers["w2"]["reachable"] is True and workers["w2"]["inflight"] == 0


async def test_admin_disabled_without_a_token(etcd, monkeypatch) -> None:
    monkeypatch.delenv("EPDSERVE_ADMIN_TOKEN", raising=False)
    gw = await start_gateway(etcd.endpoint, _cluster())
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
            for path in ("/admin/status", "/admin/health"):
                r = await c.get(path, headers=AUTH)
                assert r.status_code == 403 and "admin API disabled" in r.json()["error"]["message"]
    finally:
        await gw.stop()


async def test_status_set_role_errors_and_convergence(two) -> None:
    c, w1, w2, gw = two
    st = (await c.get("/admin/status", headers=AUTH)).json()
    rows = {w["id"]: w for w in st["workers"]}
    assert set(rows) == {"w1", "w2"}
    assert rows["w1"]["role"] == "mixed" and rows["w1"]["state"] == "serving"
    assert rows["w1"]["epoch"] == 1 and rows["w1"]["address"] == w1.address
    assert st["rebalancer"]["policy"] == "static" and st["rebalancer"]["leader"] in (True, False)

    r = await c.post("/admin/workers/nope/role", json={"role": "decode"}, headers=AUTH)
    assert r.status_code == 404 and "unknown worker" in r.json()["error"]["message"]
    r = await c.post("/admin/workers/w1/role", json={"role": "chef"}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_role"

    # A request in flight on w1 finishes during the flip; the flip waits for it.
    long_req = asyncio.create_task(
        c.post("/v1/completions", json={"model": "fake-model", "prompt": "a", "max_tokens": 40})
    )
    await _until(lambda: w1.servicer.state.inflight or w2.servicer.state.inflight)
    busy, idle = (w1, w2) if w1.servicer.state.inflight else (w2, w1)
    r = await c.post(f"/admin/workers/{busy.servicer.state.instance_id}/role",
                     json={"role": "decode"}, headers=AUTH)  # fmt: skip
    assert r.status_code == 200, r.text
    await _until(lambda: busy.servicer.state.flipping, what="flip start")
    handle = gw.gateway.pool.handles[busy.servicer.state.instance_id]
    await _until(lambda: not handle.usable_for("mixed"), what="router sees the flip")
    # New requests go to the other worker while the busy one drains.
    started = len(idle.engine.started)
    r2 = await c.post(
        "/v1/completions", json={"model": "fake-model", "prompt": "b", "max_tokens": 2}
    )
    assert r2.status_code == 200 and len(idle.engine.started) == started + 1
    done = await long_req
    assert done.status_code == 200 and done.json()["choices"][0]["finish_reason"] == "length"
    await _until(lambda: busy.servicer.state.role == "decode", what="role switch")
    assert busy.servicer.state.role_epoch == 2

    async def shown() -> dict:
        st = (await c.get("/admin/status", headers=AUTH)).json()
        return {w["id"]: w for w in st["workers"]}[busy.servicer.state.instance_id]

    for _ in range(100):
        row = await shown()
        if row["role"] == "decode" and row["state"] == "serving":
            break
        await asyncio.sleep(0.05)
    assert row["role"] == "decode" and row["epoch"] == 2 and row["desired_role"] == "decode"

    # The other worker is the last mixed one: moving or draining it is refused.
    iid = idle.servicer.state.instance_id
    r = await c.post(f"/admin/workers/{iid}/role", json={"role": "prefill"}, headers=AUTH)
    assert r.status_code == 409 and "no mixed worker" in r.json()["error"]["message"]
    r = await c.post(f"/admin/workers/{iid}/drain", json={}, headers=AUTH)
    assert r.status_code == 409
    assert idle.servicer.state.role == "mixed" and not idle.servicer.state.draining


async def test_drain_of_a_worker_that_does_not_answer_is_a_one_line_503(two) -> None:
    """`epdserve drain` of a worker killed a moment ago (still registered) printed the gRPC
    error's whole repr: several lines of debug_error_string."""
    c, _, w2, _ = two
    await w2.server.stop(None)
    r = await c.post("/admin/workers/w2/drain", json={}, headers=AUTH)
    assert r.status_code == 503, r.text
    message = r.json()["error"]["message"]
    assert message.startswith("worker w2 did not answer: UNAVAILABLE "), message
    assert "\n" not in message and "debug_error_string" not in message, message


async def test_drain_timeout_aborts_with_a_clear_error(etcd) -> None:
    cluster = _cluster()
    w = await start_fake_worker(etcd.endpoint, cluster, "w1", FakeEngine(step_s=0.05),
                                role_drain_timeout_s=0.3)  # fmt: skip
    try:
        async with insecure_channel(w.address) as ch:
            stub = pb_grpc.WorkerServiceStub(ch)
            req = pb.GenerateRequest(request_id="r1", prompt_token_ids=[1],
                                     params=pb.SamplingParams(max_tokens=100))  # fmt: skip
            call = stub.Generate(req, timeout=20)
            await call.read()
            r = await stub.SetRole(pb.SetRoleRequest(role=pb.ROLE_DECODE), timeout=10)
            assert r.role_epoch == 2
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "changed role to decode" in ei.value.details()
    finally:
        await w.stop()


async def test_stale_epoch_is_refused_and_rerouted(two) -> None:
    c, w1, w2, gw = two
    pool = gw.gateway.pool
    # Freeze the router's view of w1 (no more load reports), then move w1 to epoch 2 without
    # telling etcd: the router still stamps epoch 1.
    handle = pool.handles["w1"]
    assert handle._task is not None
    handle._task.cancel()
    # NOTE: with its reports stopped, the handle counts as unreachable load_stale_s (1 s) after
    # the last one, and as departed if w1's 2 s lease lapses meanwhile (the registrar then puts
    # the same key again): on a loaded host either came first, no request went to w1 and
    # nothing was refused. The frozen view must stay reachable for this test's whole length.
    handle.stale_s = 3600.0
    w1.servicer.state.on_change = lambda: None
    w1.servicer.state.role_epoch = 2
    async with insecure_channel(w1.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            call = pb_grpc.WorkerServiceStub(ch).Generate(
                pb.GenerateRequest(request_id="x", prompt_token_ids=[1], role_epoch=1,
                                   params=pb.SamplingParams(max_tokens=1)), timeout=5,
            )  # fmt: skip
            async for _ in call:
                pass
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ei.value.details().startswith("stale role epoch")
    n1, n2 = len(w1.engine.started), len(w2.engine.started)
    req = {"model": "fake-model", "prompt": "a", "max_tokens": 1}
    for _ in range(4):  # round robin: w1 refuses (stale), the router re-routes to w2
        assert (await c.post("/v1/completions", json=req)).status_code == 200
    assert len(w1.engine.started) == n1 and len(w2.engine.started) == n2 + 4
    assert pool.handles["w1"] is handle, "w1's handle was replaced"
    assert handle.stale_epoch == 1 and not handle.usable_for("mixed")


async def test_desired_role_followed_across_an_etcd_restart() -> None:
    from services.router.rebalance.role_store import RoleStore, RoleStoreError

    with EtcdServer() as etcd:
        cluster = _cluster()
        w = await start_fake_worker(etcd.endpoint, cluster, "w1", watch_roles=True)
        store = RoleStore([etcd.endpoint], cluster)
        try:
            await store.set("w1", "prefill")
            await _until(lambda: w.servicer.state.role == "prefill", what="first change")
            await asyncio.to_thread(etcd.restart, 1.0)
            for _ in range(50):  # written after the outage: the worker's watch resumed
                try:
                    await store.set("w1", "decode")
                    break
                except RoleStoreError:  # etcd still coming up
                    await asyncio.sleep(0.2)
            await _until(lambda: w.servicer.state.role == "decode", 20, "change after restart")
            assert w.servicer.state.role_epoch == 3
            assert await store.all() == {"w1": "decode"}
            # Garbage in the key is ignored, the role stays.
            await store.set("w1", "chef")
            await asyncio.sleep(0.5)
            assert w.servicer.state.role == "decode"
        finally:
            await w.stop()


async def test_a_worker_call_cancelled_under_the_handler_is_a_503() -> None:
    """A gRPC call whose channel closes under it (the worker's handle went while a Sleep ran:
    the worker was stopped past its lease and registered again) raises CancelledError, which
    the admin API's guard let through as a 500 Internal Server Error."""
    from types import SimpleNamespace

    from starlette.applications import Starlette
    from starlette.routing import Route

    from services.router.api.admin import _guard

    async def call_cancelled_by_grpc(gw, request):
        raise asyncio.CancelledError()  # what grpc.aio raises for a locally cancelled call

    app = Starlette(routes=[Route("/admin/x", _guard(call_cancelled_by_grpc), methods=["POST"])])
    app.state.gateway = SimpleNamespace(admin_token=TOKEN)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://r") as client:
        r = await client.post("/admin/x", headers=AUTH)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "worker_unavailable"


@pytest_asyncio.fixture
async def lone(etcd, tmp_path):
    """One fake worker and a router with a token, for tests that stop the worker."""
    cluster = _cluster()
    (tmp_path / "token").write_text(TOKEN + "\n")
    w1 = await start_fake_worker(etcd.endpoint, cluster, "w1")
    gw = await start_gateway(etcd.endpoint, cluster, admin_token_file=str(tmp_path / "token"))
    await _until(lambda: len(gw.gateway.pool.candidates()) == 1, what="the worker routed")
    async with httpx.AsyncClient(base_url=gw.url, timeout=20) as client:
        yield client, w1, gw
    await asyncio.wait_for(gw.stop(), 15)
    await asyncio.wait_for(w1.stop(), 15)


def _rows(st: dict) -> dict[str, dict]:
    return {w["id"]: w for w in st["workers"]}


async def test_status_shows_the_only_worker_unreachable_then_gone(lone, capsys) -> None:
    """Kill the only worker: /admin/status and `epdserve status` answer, and show it
    unreachable while its key lasts, then gone, each with how long; and a worker starting
    (its key put by worker/starting.py: no address yet) under "starting"."""
    c, w1, gw = lone
    pool = gw.gateway.pool
    await w1.stop(deregister=False)  # killed: its key stays until its lease runs out
    await _until(lambda: not pool.handles["w1"].reachable(), what="w1 unreachable")
    r = await c.get("/admin/status", headers=AUTH)
    assert r.status_code == 200, r.text
    row = _rows(r.json())["w1"]
    assert row["state"] == "unreachable" and row["for_s"] > 0, row
    await _until(lambda: "w1" not in pool.handles, what="w1's key expired")
    r = await c.get("/admin/status", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["workers"] == []
    gone = {g["id"]: g for g in r.json()["gone"]}["w1"]
    assert gone["role"] == "mixed" and gone["address"] == w1.address and gone["for_s"] >= 0
    cfg = gw.gateway.cfg
    key = starting.announce(["--etcd", cfg.etcd, "--cluster", cfg.cluster, "--instance-id", "w9",
                             "--served-model-name", "big", "--role", "decode"])  # fmt: skip
    assert key is not None
    try:
        await _until(lambda: pool.starting.has("big"), what="w9 starting")
        argv = ["status", "--router", gw.url, "--admin-token", TOKEN]
        assert await asyncio.to_thread(admin.main, argv) == 0
    finally:
        await asyncio.to_thread(key.release, True)
    out = capsys.readouterr().out
    assert "w1 (mixed" in out and "gone for " in out, out
    assert "workers starting:" in out and "w9 (decode, big, pid" in out, out
    assert pool.handles == {}  # a starting worker has no handle


async def test_status_is_no_503_when_a_worker_leaves_during_the_call(lone, monkeypatch) -> None:
    """A worker that stops answering and leaves while /admin/status asks it for its requests
    (its channel closes under the call) is shown gone; the status was a 503."""
    c, w1, gw = lone
    asked = asyncio.Event()

    async def hang(self, request, context):
        asked.set()
        await asyncio.sleep(30)

    # gRPC binds the servicer's methods when the server starts: a second worker, on the patch.
    monkeypatch.setattr(type(w1.servicer), "ListRequests", hang)
    w2 = await start_fake_worker(gw.gateway.cfg.etcd, gw.gateway.cfg.cluster, "w2")
    try:
        await _until(lambda: len(gw.gateway.pool.candidates()) == 2, what="w2 routed")
        status = asyncio.create_task(c.get("/admin/status", headers=AUTH))
        await asyncio.wait_for(asked.wait(), 10)
        # It stops answering: no more load reports reach the router. NOTE: its reports went on
        # before, and on a loaded host one came between mark_failed and the key's deletion:
        # the router then kept w2 as "left etcd but still answers", and listed it.
        handle = gw.gateway.pool.handles["w2"]
        assert handle._task is not None
        handle._task.cancel()
        handle.mark_failed()  # a call to it failed meanwhile
        await w2.registrar.stop(deregister=True)  # and its key went
        r = await asyncio.wait_for(status, 15)
    finally:
        await asyncio.wait_for(w2.stop(), 15)
    assert r.status_code == 200, r.text
    assert list(_rows(r.json())) == ["w1"] and [g["id"] for g in r.json()["gone"]] == ["w2"]
