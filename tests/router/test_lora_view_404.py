"""A request for a LoRA adapter that the router's view stops listing between the request's
resolution and its routing (its only holder unloaded it, and the report saying so arrived
meanwhile) gets the 404 model_not_found a new request for it gets, not a 503 no_workers whose
retry can only be refused (chaos6's attack round: 2 such 503s in 12 load/unload cycles).
A 503 for a model the router still knows stays a 503."""

from __future__ import annotations

import asyncio

import pytest
from fake_handles import Stream, fake_handle, finished, keep_reporting, serve_request

from services.common.proto import worker_pb2 as pb
from services.router import serving
from services.router.errors import APIError


class Served:
    def __init__(self) -> None:
        self.calls = 0

    def Generate(self, req: pb.GenerateRequest, timeout: float) -> Stream:  # noqa: N802
        self.calls += 1
        return Stream([finished()])


async def _serve(model: str, role: str, drop_adapter: bool) -> tuple[int, str | None, int]:
    from services.router.config import RouterConfig
    from services.router.gateway import Gateway
    from tests.router.router_fakes import FakeTokenizer

    gw = Gateway(RouterConfig(etcd="127.0.0.1:1"), FakeTokenizer())
    stub = Served()
    h = fake_handle("w-0", stub, role=role)
    h.info.model, h.lora_adapters = "base", frozenset({"sql"})
    gw.pool.handles = {h.id: h}
    reports = asyncio.create_task(keep_reporting([h]))
    try:
        gw.resolve_model(model, serving=False)  # known when the request was resolved
        if drop_adapter:  # the report without it lands before the request is routed
            h.lora_adapters = frozenset()
        with pytest.raises(APIError) as err:
            [m async for _, m in serving._generate(gw, serve_request(model))]
        return err.value.status, err.value.code, stub.calls
    finally:
        reports.cancel()


def test_an_adapter_the_view_dropped_is_a_404_model_not_found() -> None:
    assert asyncio.run(_serve("sql", "mixed", drop_adapter=True)) == (404, "model_not_found", 0)


def test_a_model_still_known_without_a_usable_path_stays_a_503() -> None:
    # A prefill worker alone makes no path: the base model and its adapter are still known.
    for model in ("base", "sql"):
        assert asyncio.run(_serve(model, "prefill", drop_adapter=False)) == (503, "no_workers", 0)


def test_an_unknown_model_s_404_names_the_adapters_too() -> None:
    """The 404's "available:" listed base models only: a client that misspelt an adapter's
    name (served since `--lora-modules sql=...`) was not told it exists. With a worker of the
    model lost lately (restarting: its models are still served) the adapter was listed twice,
    "base, sql, sql (LoRA of base)" (seen through `epdserve up` after a worker's kill -9)."""
    from services.router.config import RouterConfig
    from services.router.gateway import Gateway
    from tests.router.router_fakes import FakeTokenizer

    async def resolve() -> APIError:
        gw = Gateway(RouterConfig(etcd="127.0.0.1:1"), FakeTokenizer())
        h = fake_handle("w-0", Served())
        h.info.model, h.lora_adapters = "base", frozenset({"sql"})
        gw.pool.handles = {h.id: h}
        gw.pool.lost.record("mixed", ("base", "sql"), 512)  # the other worker, restarting
        with pytest.raises(APIError) as err:
            gw.resolve_model("sq1", serving=False)
        return err.value

    err = asyncio.run(resolve())
    assert err.status == 404 and err.code == "model_not_found"
    assert err.message.endswith("available: base, sql (LoRA of base)"), err.message
