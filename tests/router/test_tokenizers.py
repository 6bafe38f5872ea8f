"""The router's per-model tokenizers: loaded once per model folder its workers advertise, an
adapter's from its parent's, the router's own without an advertisement (fake handles)."""

from __future__ import annotations

import asyncio

import pytest

from services.router.errors import APIError
from services.router.tokenizers import Tokenizers
from tests.router.fake_handles import fake_handle, fake_pool


def handle(iid: str, model: str, path: str | None):  # type: ignore[no-untyped-def]
    h = fake_handle(iid, None)
    h.info.model = model
    if path is not None:
        h.info.capacity["model_path"] = path
    return h


class Loader:
    """Counts the loads; a path under /missing fails as an unreadable folder does."""

    def __init__(self) -> None:
        self.loads: list[str | None] = []

    def __call__(self, path: str | None) -> str:
        self.loads.append(path)
        if path and path.startswith("/missing"):
            raise OSError(f"no such folder {path}")
        return f"tok:{path}"


def test_each_model_gets_its_folders_tokenizer_once() -> None:
    async def run() -> None:
        pool = fake_pool([handle("a0", "a", "/m/a"), handle("a1", "a", "/m/a"),
                          handle("b0", "b", "/m/b"), handle("c0", "c", None),
                          handle("d0", "d", "/m/a")])  # fmt: skip
        pool.handles["b0"].lora_adapters = frozenset({"b-sql"})
        loader = Loader()
        toks = Tokenizers("default", "/m/router", pool, loader)
        got = await asyncio.gather(*(toks.get(m) for m in ("a", "a", "b", "b-sql", "d")))
        assert got == ["tok:/m/a", "tok:/m/a", "tok:/m/b", "tok:/m/b", "tok:/m/a"]
        assert sorted(loader.loads) == ["/m/a", "/m/b"]  # one load per folder
        assert await toks.get("c") == "default"  # no advertisement: the router's --model

    asyncio.run(run())  # the fake handles open grpc.aio channels: in a loop


def test_an_unreadable_folder() -> None:
    async def run() -> None:
        pool = fake_pool([handle("a0", "a", "/missing/a"), handle("b0", "b", "/m/b")])
        toks = Tokenizers("default", None, pool, Loader())
        with pytest.raises(APIError) as err:
            await toks.get("a")
        assert err.value.status == 503 and err.value.code == "tokenizer_unavailable"
        # One model only: the router's own tokenizer, as before several models.
        del pool.handles["b0"]
        assert await toks.get("a") == "default"

    asyncio.run(run())
