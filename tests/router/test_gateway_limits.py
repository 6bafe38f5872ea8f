"""The gateway's API keys, request limits and admission control, over fake workers."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

import httpx
import pytest
from router_fakes import FakeEngine, start_fake_worker, start_gateway, until_healthy
from starlette.requests import Request
from starlette.responses import JSONResponse

from services.router.admission import AdmissionControl
from services.router.api.openapi import openapi_document
from services.router.auth import APIKey, check_api_key, load_api_keys
from services.router.config import RouterConfig
from services.router.errors import APIError
from services.router.server import HotRoutes, build_app
from services.router.tiers import KeyTiers

pytestmark = [pytest.mark.timeout(60)]

CHAT = {"model": "fake-model", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
MSG = {"model": "fake-model", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
_n = 0


def _request(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "headers": raw})


# -- units --------------------------------------------------------------------------------


def test_load_api_keys_from_file_and_env(tmp_path, monkeypatch) -> None:
    f = tmp_path / "keys"
    f.write_text("# comment\nk1\n\n  k2  max_tier=flex\n")
    assert load_api_keys(str(f)) == [
        APIKey(b"k1", KeyTiers()),
        APIKey(b"k2", KeyTiers("flex", "flex")),
    ]
    monkeypatch.setenv("EPDSERVE_API_KEYS", " a, b default_tier=priority ,,")
    assert load_api_keys(None) == [APIKey(b"a", KeyTiers()), APIKey(b"b", KeyTiers("priority"))]
    monkeypatch.setenv("EPDSERVE_API_KEYS", "c max_tier=flex min_priority=-2")
    assert load_api_keys(None) == [APIKey(b"c", KeyTiers("flex", "flex", -2))]
    for bad in ("k tier=flex", "k max_tier=gold", "k default_tier=priority max_tier=default",
                "k min_priority=high", f"k min_priority={2**31}"):  # fmt: skip
        monkeypatch.setenv("EPDSERVE_API_KEYS", bad)
        with pytest.raises(ValueError):
            load_api_keys(None)
    monkeypatch.delenv("EPDSERVE_API_KEYS")
    assert load_api_keys(None) == []
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError):
        load_api_keys(str(tmp_path / "empty"))


def test_check_api_key_headers() -> None:
    keys = [APIKey(b"k1", KeyTiers()), APIKey(b"k2", KeyTiers("flex", "flex"))]
    assert check_api_key([], _request({})) is None  # no keys: open
    assert check_api_key(keys, _request({"Authorization": "Bearer k2"})) is keys[1]
    assert check_api_key(keys, _request({"x-api-key": "k1"})) is keys[0]
    for headers in ({}, {"Authorization": "Bearer k3"}, {"x-api-key": "k"},
                    {"Authorization": "Basic k1"}):  # fmt: skip
        with pytest.raises(APIError) as e:
            check_api_key(keys, _request(headers))
        assert e.value.status == 401 and e.value.code == "invalid_api_key"


def test_key_tiers_bound_the_integer_priority_and_anthropic_tiers() -> None:
    from services.engine.sampling_params import SamplingParams
    from services.router.tiers import anthropic_tier, openai_params

    batch = KeyTiers("flex", "flex", min_priority=0)
    assert openai_params(SamplingParams(priority=3), None, batch).priority == 3
    for key, priority, tier in ((batch, -1, None), (batch, 0, "priority"), (None, 0, "gold")):
        with pytest.raises(APIError) as e:
            openai_params(SamplingParams(priority=priority), tier, key)
        assert e.value.status == (400 if key is None else 403)
        assert e.value.param == ("service_tier" if tier else "priority")
    assert openai_params(SamplingParams(priority=-9), None, None).priority == -9  # no keys
    # Nothing to change: the same params (a new one is checked again, ~10 us a request).
    same = SamplingParams(priority=2)
    assert openai_params(same, None, None) is same
    flex = openai_params(same, None, batch)
    assert flex is not same and (flex.service_tier, same.service_tier) == ("flex", "default")
    # Anthropic: "priority" (an extension) up to the key's highest tier; "auto" the default.
    assert anthropic_tier("priority", None) == "priority"
    assert anthropic_tier("auto", KeyTiers("priority")) == "priority"
    assert anthropic_tier("standard_only", KeyTiers("priority")) == "default"
    with pytest.raises(APIError) as e:
        anthropic_tier("priority", batch)
    assert e.value.status == 403


def test_admission_bounds_queued_tokens() -> None:
    ac = AdmissionControl(100)
    big = ac.admit(500)  # alone in an empty router: admitted
    with pytest.raises(APIError) as e:
        ac.admit(1)
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "1"}
    big.release()
    big.release()  # idempotent
    assert ac.queued_tokens == 0
    a, b = ac.admit(60), ac.admit(40)
    with pytest.raises(APIError):
        ac.admit(1)
    a.release()
    b.release()
    assert ac.queued_tokens == 0


def test_admission_bounds_each_model_apart() -> None:
    ac = AdmissionControl(100)
    a = ac.admit(90, "a")
    with pytest.raises(APIError) as e:
        ac.admit(20, "a")
    assert "for model 'a'" in e.value.message
    b = ac.admit(90, "b")  # another model's requests are not refused for a's load
    assert (ac.by_model, ac.queued_tokens) == ({"a": 90, "b": 90}, 180)
    a.release()
    b.release()
    assert ac.queued_tokens == 0


def test_config_checks_limits() -> None:
    for bad in ({"max_body_bytes": 0}, {"max_n": 0}, {"max_prompts": 0},
                {"max_queued_tokens": 0}, {"max_tokens_limit": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            RouterConfig(**bad)  # type: ignore[arg-type]


# -- over HTTP ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _cluster(etcd, engine: FakeEngine | None = None, **router):
    global _n
    _n += 1
    cluster = f"lim{_n}"
    worker = await start_fake_worker(etcd.endpoint, cluster, "w1", engine=engine)
    gw = await start_gateway(etcd.endpoint, cluster, **router)
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=20) as client:
            await until_healthy(client)
            yield client, gw
    finally:
        await asyncio.wait_for(gw.stop(), 15)
        await asyncio.wait_for(worker.stop(), 15)


def _is_openai_error(r: httpx.Response, status: int, type_: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    if type_ is not None:
        assert err["type"] == type_
    return err


def _is_anthropic_error(r: httpx.Response, status: int, type_: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == type_
    assert body["error"]["message"]


@pytest.mark.asyncio
async def test_api_keys_over_http(etcd, monkeypatch) -> None:
    monkeypatch.setenv("EPDSERVE_API_KEYS", "sk-one,sk-two")
    async with _cluster(etcd) as (c, _):
        err = _is_openai_error(await c.post("/v1/chat/completions", json=CHAT), 401)
        assert err["code"] == "invalid_api_key"
        bad = {"Authorization": "Bearer sk-three"}
        _is_openai_error(await c.post("/v1/completions", headers=bad,
                                      json={"model": "fake-model", "prompt": "x"}), 401)  # fmt: skip
        _is_openai_error(await c.get("/v1/models"), 401)
        _is_anthropic_error(await c.post("/v1/messages", json=MSG), 401, "authentication_error")
        _is_anthropic_error(await c.post("/v1/messages", json=MSG, headers={"x-api-key": "no"}),
                            401, "authentication_error")  # fmt: skip
        # Either header works on either API.
        r = await c.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": "sk-two"})
        assert r.status_code == 200, r.text
        r = await c.post("/v1/messages", json=MSG, headers={"Authorization": "Bearer sk-one"})
        assert r.status_code == 200, r.text
        # Probes, scrapers and the OpenAPI document stay open.
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.get("/openapi.json")).json()["openapi"].startswith("3.")


@pytest.mark.asyncio
async def test_api_keys_file_over_http(etcd, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("EPDSERVE_API_KEYS", raising=False)
    keys = tmp_path / "keys"
    keys.write_text("filekey\n")
    async with _cluster(etcd, api_keys_file=str(keys)) as (c, _):
        _is_openai_error(await c.post("/v1/chat/completions", json=CHAT), 401)
        r = await c.post("/v1/chat/completions", json=CHAT,
                         headers={"Authorization": "Bearer filekey"})  # fmt: skip
        assert r.status_code == 200


@pytest.mark.asyncio
async def test_limits_are_4xx_in_each_format(etcd, monkeypatch) -> None:
    monkeypatch.delenv("EPDSERVE_API_KEYS", raising=False)
    async with _cluster(etcd, max_body_bytes=2000, max_tokens_limit=8, max_prompts=3) as (c, _):
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 3000}]}
        err = _is_openai_error(await c.post("/v1/chat/completions", json=big), 413)
        assert err["code"] == "request_too_large"
        _is_anthropic_error(await c.post("/v1/messages", json={**MSG, "system": "y" * 3000}),
                            413, "request_too_large")  # fmt: skip

        # A body sent in chunks without a Content-Length is cut off too.
        async def chunks():
            for _ in range(10):
                yield b" " * 500

        r = await c.post("/v1/chat/completions", content=chunks(),
                         headers={"content-type": "application/json"})  # fmt: skip
        _is_openai_error(r, 413)
        err = _is_openai_error(await c.post("/v1/chat/completions", json={**CHAT, "n": 17}), 400)
        assert err["param"] == "n"
        assert (await c.post("/v1/chat/completions", json={**CHAT, "n": 16})).status_code == 200
        r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 9})
        assert _is_openai_error(r, 400)["param"] == "max_tokens"
        _is_anthropic_error(await c.post("/v1/messages", json={**MSG, "max_tokens": 9}),
                            400, "invalid_request_error")  # fmt: skip
        # Context: prompt + max_tokens past max_model_len (128 in the fake engine).
        r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": "x" * 125,
                                                  "max_tokens": 8})  # fmt: skip
        assert _is_openai_error(r, 400)["code"] == "context_length_exceeded"
        r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": ["a"] * 4})
        assert _is_openai_error(r, 400)["param"] == "prompt"
        r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": [[1]] * 4})
        _is_openai_error(r, 400)
        r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": ["a"] * 3,
                                                  "max_tokens": 2})  # fmt: skip
        assert r.status_code == 200 and len(r.json()["choices"]) == 3
        # Chat without max_tokens is bounded by max_tokens_limit.
        r = await c.post("/v1/chat/completions",
                         json={"model": "fake-model", "messages": CHAT["messages"]})  # fmt: skip
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


@pytest.mark.asyncio
async def test_admission_429_with_retry_after(etcd, monkeypatch) -> None:
    monkeypatch.delenv("EPDSERVE_API_KEYS", raising=False)
    engine = FakeEngine(step_s=0.05)
    async with _cluster(etcd, engine=engine, max_queued_tokens=40) as (c, gw):
        slow = {"model": "fake-model", "prompt": "p" * 30, "max_tokens": 30}
        held = asyncio.create_task(c.post("/v1/completions", json=slow))
        for _ in range(500):  # up to 5 s on a loaded CI machine
            if gw.gateway.admission.queued_tokens:
                break
            await asyncio.sleep(0.01)
        assert gw.gateway.admission.queued_tokens == 30
        r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": "q" * 20})
        err = _is_openai_error(r, 429, "rate_limit_exceeded")
        assert err["code"] == "rate_limit_exceeded" and r.headers["retry-after"] == "1"
        r = await c.post("/v1/messages", json={**MSG, "messages": [
            {"role": "user", "content": "q" * 20}]})  # fmt: skip
        _is_anthropic_error(r, 429, "rate_limit_error")
        assert r.headers["retry-after"] == "1"
        # A small request still fits under the bound.
        r = await c.post("/v1/completions",
                         json={"model": "fake-model", "prompt": "q", "max_tokens": 1})  # fmt: skip
        assert r.status_code == 200
        assert (await held).status_code == 200
        assert gw.gateway.admission.queued_tokens == 0
        # Streams give their tokens back when they end, and when the client leaves.
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert r.status_code == 200 and "[DONE]" in r.text
        async with c.stream("POST", "/v1/messages", json={**MSG, "max_tokens": 50,
                                                          "stream": True}) as s:  # fmt: skip
            async for _ in s.aiter_lines():
                break
        for _ in range(200):
            if gw.gateway.admission.queued_tokens == 0:
                break
            await asyncio.sleep(0.02)
        assert gw.gateway.admission.queued_tokens == 0


def test_openapi_document_matches_routes() -> None:
    doc = openapi_document()
    assert doc["openapi"].startswith("3.")
    app = build_app(object())  # type: ignore[arg-type]  # routes only; never started
    routes: dict[str, set[str]] = {}  # a path may have a route per method (/v1/files)
    for r in app.routes:
        # OpenAPI names a path parameter without Starlette's converter ({model_id:path})
        path = r.path.replace(":path}", "}")  # type: ignore[attr-defined]
        routes.setdefault(path, set()).update(r.methods)  # type: ignore[attr-defined]
    for path, ops in doc["paths"].items():
        assert path in routes, path
        assert {m.upper() for m in ops} <= routes[path], path
    assert "/v1/messages/batches/{batch_id}/results" in doc["paths"]


def test_hot_routes_skip_starlette_and_the_rest_go_through_it() -> None:
    """A POST to a generation endpoint runs it directly (HotRoutes); another method or path
    goes through the Starlette app (its 405s and 404s in the API's format)."""
    app = build_app(object())  # type: ignore[arg-type]  # routes only; never started
    assert set(app.hot) == {"/v1/chat/completions", "/v1/completions", "/v1/messages"}
    routed = {r.path: r.endpoint for r in app.routes if "POST" in r.methods}  # type: ignore[attr-defined]
    assert all(routed[path] is endpoint for path, endpoint in app.hot.items())
    seen: list[str] = []

    async def endpoint(request: Request) -> JSONResponse:
        seen.append(f"hot {request.method} {request.url.path} {request.app.state.name}")
        return JSONResponse({"ok": 1})

    async def starlette(scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        seen.append(f"app {scope['method']} {scope['path']}")
        await JSONResponse({"app": 1})(scope, receive, send)

    starlette.state = SimpleNamespace(name="the app")  # type: ignore[attr-defined]
    hot = HotRoutes(starlette, {"/v1/completions": endpoint})  # type: ignore[arg-type]

    async def calls() -> list[int]:
        transport = httpx.ASGITransport(app=hot)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as c:
            return [(await c.post("/v1/completions", json={})).status_code,
                    (await c.get("/v1/completions")).status_code,
                    (await c.post("/v1/other", json={})).status_code]  # fmt: skip

    assert asyncio.run(calls()) == [200, 200, 200]
    assert seen == ["hot POST /v1/completions the app", "app GET /v1/completions",
                    "app POST /v1/other"]  # fmt: skip
