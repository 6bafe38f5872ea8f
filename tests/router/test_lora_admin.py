"""vLLM's LoRA load / unload endpoints over fake workers, a real etcd and a router: a load
that one worker refuses is rolled back on the others; a load that succeeds is recorded in
etcd, and a worker that starts later loads the recorded adapters (``restore_adapters``)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from router_fakes import FakeEngine, start_fake_worker, start_gateway

from services.common.etcd_server import EtcdServer
from services.common.lora_registry import AdapterRecord, LoRARegistry
from services.worker.lora import restore_adapters

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio]

TOKEN = "lora-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeLoRAs:
    """The engine's adapter registry, refusing the paths in ``refuse`` as a bad folder."""

    def __init__(self, refuse: set[str]) -> None:
        self.adapters: dict[str, str] = {}
        self.refuse = refuse

    def add(self, name: str, path: str) -> None:
        if path in self.refuse:
            raise ValueError(f"cannot read {path}/adapter_config.json")
        self.adapters[name] = path

    def remove(self, name: str) -> None:
        del self.adapters[name]

    max_loras = 2

    def resident_adapters(self) -> list[str]:
        return []  # nothing runs here: no slot is filled


class LoRAEngine(FakeEngine):
    def __init__(self, refuse: set[str] = frozenset(), enabled: bool = True,  # type: ignore[assignment]
                 model_name: str = "fake-model", delay_s: float = 0.0) -> None:  # fmt: skip
        super().__init__(model_name, step_s=0.01)
        self.loras = FakeLoRAs(set(refuse)) if enabled else None
        self.engine = self  # where adapter_names looks for ``loras``
        self.delay_s = delay_s  # before each load or unload (reading a folder)

    async def call(self, fn):
        await asyncio.sleep(self.delay_s)
        return fn(self)


async def _until(pred, what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not reached in {timeout}s")


async def test_partial_load_rolls_back_and_loads_are_recorded(tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with EtcdServer() as etcd:
        good, picky = LoRAEngine(), LoRAEngine(refuse={"/b"})
        workers = [await start_fake_worker(etcd.endpoint, "lr", "w1", good),
                   await start_fake_worker(etcd.endpoint, "lr", "w2", picky)]  # fmt: skip
        gw = await start_gateway(etcd.endpoint, "lr", admin_token_file=str(token_file))
        registry = LoRARegistry([etcd.endpoint], "lr")
        try:
            pool = gw.gateway.pool
            await _until(lambda: len(pool.candidates()) == 2, "two usable workers")
            async with httpx.AsyncClient(base_url=gw.url, headers=AUTH, timeout=20) as c:
                r = await c.post(
                    "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/a"}
                )
                assert r.status_code == 200 and r.json()["workers"] == ["w1", "w2"], r.text
                assert await registry.get("a") == AdapterRecord("/a", "fake-model")
                # w2 refuses /b: w1, which took it, gives it up; nothing is recorded.
                r = await c.post(
                    "/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": "/b"}
                )
                assert r.status_code == 400 and "adapter_config.json" in r.text
                assert good.loras.adapters == picky.loras.adapters == {"a": "/a"}
                assert await registry.get("b") is None
                # A new folder for "a" that w2 refuses: w1 gets the recorded one back.
                r = await c.post(
                    "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/b"}
                )
                assert r.status_code == 400
                assert good.loras.adapters == {"a": "/a"}
                assert await registry.get("a") == AdapterRecord("/a", "fake-model")
                # A name is a model name, not a document: a 100K-character one is refused
                # before any worker is asked (it would travel in every load report).
                r = await c.post(
                    "/v1/load_lora_adapter", json={"lora_name": "x" * 100_000, "lora_path": "/a"}
                )
                assert r.status_code == 400 and "256" in r.text
                assert good.loras.adapters == {"a": "/a"}
                # A worker started now loads what was recorded.
                late = LoRAEngine()
                await restore_adapters(late, LoRARegistry([etcd.endpoint], "lr"), "fake-model")
                assert late.loras.adapters == {"a": "/a"}
                other = LoRAEngine()
                await restore_adapters(other, LoRARegistry([etcd.endpoint], "lr"), "other-model")
                assert other.loras.adapters == {}
                # Unloaded (a worker of the base model without LoRA, started since, does not
                # fail it): the record goes.
                workers.append(await start_fake_worker(etcd.endpoint, "lr", "w3",
                                                       LoRAEngine(enabled=False)))  # fmt: skip
                await _until(lambda: len(pool.candidates()) == 3, "three usable workers")
                r = await c.post("/v1/unload_lora_adapter", json={"lora_name": "a"})
                assert r.status_code == 200 and r.json()["workers"] == ["w1", "w2"], r.text
                assert good.loras.adapters == picky.loras.adapters == {}
                assert await registry.get("a") is None
                r = await c.post("/v1/unload_lora_adapter", json={"lora_name": "a"})
                assert r.status_code == 404
        finally:
            await registry.close()
            await asyncio.wait_for(gw.stop(), 15)
            for w in workers:
                await asyncio.wait_for(w.stop(), 15)


async def test_an_adapter_name_of_one_base_model_is_refused_for_another(tmp_path) -> None:
    """A name names one adapter: loaded for a second base model, both models' workers held it
    and a request for it went to either (tokenized for one base model, run on the other)."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with EtcdServer() as etcd:
        one, two = LoRAEngine(model_name="model-1"), LoRAEngine(model_name="model-2")
        workers = [await start_fake_worker(etcd.endpoint, "lr2", "w1", one),
                   await start_fake_worker(etcd.endpoint, "lr2", "w2", two)]  # fmt: skip
        gw = await start_gateway(etcd.endpoint, "lr2", admin_token_file=str(token_file))
        registry = LoRARegistry([etcd.endpoint], "lr2")
        try:
            await _until(lambda: len(gw.gateway.pool.candidates()) == 2, "two usable workers")
            async with httpx.AsyncClient(base_url=gw.url, headers=AUTH, timeout=20) as c:
                load = {"lora_name": "x", "lora_path": "/x", "base_model": "model-1"}
                r = await c.post("/v1/load_lora_adapter", json=load)
                assert r.status_code == 200 and r.json()["workers"] == ["w1"], r.text
                r = await c.post("/v1/load_lora_adapter", json={**load, "base_model": "model-2"})
                assert r.status_code == 400 and "model-1" in r.json()["error"]["message"], r.text
                assert one.loras.adapters == {"x": "/x"} and two.loras.adapters == {}
                assert await registry.get("x") == AdapterRecord("/x", "model-1")
                for bad in ("a\nb", "x\x00", "\x1b[2J"):  # forged log lines, argv, terminals
                    r = await c.post("/v1/load_lora_adapter", json={**load, "lora_name": bad})
                    assert r.status_code == 400 and "not printable" in r.text, r.text
                assert one.loras.adapters == {"x": "/x"}
                # Unloaded, the name is free for the other base model.
                r = await c.post("/v1/unload_lora_adapter", json={"lora_name": "x"})
                assert r.status_code == 200, r.text
                r = await c.post("/v1/load_lora_adapter", json={**load, "base_model": "model-2"})
                assert r.status_code == 200 and r.json()["workers"] == ["w2"], r.text
        finally:
            await registry.close()
            await asyncio.wait_for(gw.stop(), 15)
            for w in workers:
                await asyncio.wait_for(w.stop(), 15)


async def test_concurrent_loads_of_one_name_leave_the_workers_as_recorded(tmp_path) -> None:
    """Two loads of "x" at once, one of a folder w2 refuses: its roll back unloaded "x" from
    w1, which the other load had put there (and recorded in etcd). Before, w1 held nothing
    while the record said "/a"."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with EtcdServer() as etcd:
        slow, picky = LoRAEngine(delay_s=1.0), LoRAEngine(refuse={"/b"})
        workers = [await start_fake_worker(etcd.endpoint, "lr3", "w1", slow),
                   await start_fake_worker(etcd.endpoint, "lr3", "w2", picky)]  # fmt: skip
        gw = await start_gateway(etcd.endpoint, "lr3", admin_token_file=str(token_file))
        registry = LoRARegistry([etcd.endpoint], "lr3")
        try:
            await _until(lambda: len(gw.gateway.pool.candidates()) == 2, "two usable workers")
            async with httpx.AsyncClient(base_url=gw.url, headers=AUTH, timeout=20) as c:
                a, b = await asyncio.gather(*(
                    c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
                    for path in ("/a", "/b")
                ))  # fmt: skip
            assert (a.status_code, b.status_code) == (200, 400), (a.text, b.text)
            assert await registry.get("x") == AdapterRecord("/a", "fake-model")
            assert slow.loras.adapters == picky.loras.adapters == {"x": "/a"}
        finally:
            await registry.close()
            await asyncio.wait_for(gw.stop(), 15)
            for w in workers:
                await asyncio.wait_for(w.stop(), 15)


async def test_an_unreadable_record_hides_no_other_adapter() -> None:
    """A record this version cannot read (a newer router's fields, a hand-written key) is
    skipped; before, it failed the whole listing and a starting worker retried forever,
    loading none of its model's adapters."""
    from etcd3aio import Etcd3Client

    with EtcdServer() as etcd:
        registry = LoRARegistry([etcd.endpoint], "lr")
        try:
            await registry.put("good", AdapterRecord("/good", "fake-model"))
            async with Etcd3Client([etcd.endpoint]) as c:
                assert c.kv is not None
                await c.kv.put(registry.prefix + "newer", b'{"path": "/n", "rank": 8}')
                await c.kv.put(registry.prefix + "junk", b"not json")
            late = LoRAEngine()
            await asyncio.wait_for(
                restore_adapters(late, LoRARegistry([etcd.endpoint], "lr"), "fake-model"), 10
            )
            assert late.loras.adapters == {"good": "/good"}
            assert await registry.get("junk") is None
        finally:
            await registry.close()
