"""A starting worker's etcd key (services/worker/starting.py): put "starting" from the first
lines, replaced by the registration, never put over it. Real etcd."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from services.common import process_id
from services.common.etcd_client import ETCD_OP_TIMEOUT_S, connect_etcd
from services.common.etcd_server import EtcdServer
from services.common.membership import InstanceInfo, Registrar, instance_key
from services.worker import lease_handover, starting

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def etcd():
    with EtcdServer() as server:
        yield server


async def read(endpoint: str, key: str) -> InstanceInfo | None:
    client = await connect_etcd([endpoint])
    try:
        resp = await client.kv.get(key, timeout=ETCD_OP_TIMEOUT_S)  # type: ignore[union-attr]
        return InstanceInfo.from_json(resp.kvs[0].value) if resp.kvs else None
    finally:
        await client.close()


async def until_read(endpoint: str, key: str, pred, timeout: float = 20.0) -> InstanceInfo | None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        info = await read(endpoint, key)
        if pred(info):
            return info
        assert asyncio.get_running_loop().time() < deadline, f"{key}: {info}"
        await asyncio.sleep(0.05)


def argv(etcd: EtcdServer, iid: str, *more: str) -> list[str]:
    return ["--etcd", etcd.endpoint, "--cluster", "st", "--instance-id", iid, "--lease-ttl", "2",
            "--role", "decode", "--served-model-name", "big", *more]  # fmt: skip


def test_the_key_says_starting_until_the_registration_replaces_it(etcd) -> None:
    async def main() -> None:
        key = instance_key("st", "w1")
        keeper = starting.announce(argv(etcd, "w1", "--max-model-len", "64"))
        assert keeper is not None and keeper.ttl == starting.START_LEASE_TTL_S > 2
        info = await until_read(etcd.endpoint, key, lambda i: i is not None)
        assert info is not None and info.proc == process_id.identity()  # this process
        assert (info.state, info.role, info.model) == (
            "starting",
            "decode",
            "big",
        )
        assert info.address == "" and info.capacity == {"max_model_len": 64}
        serving = InstanceInfo("w1", "127.0.0.1:1", "decode", 1, "big", "i2", os.getpid(),
                               socket.gethostname())  # fmt: skip
        registrar = Registrar([etcd.endpoint], "st", serving, ttl=2)
        await registrar.start()
        await asyncio.wait_for(registrar.registered.wait(), 10)
        await asyncio.to_thread(keeper.release, True)  # as serve() does once registered
        assert await read(etcd.endpoint, key) == serving
        # Announced again by the same process (late, on a slow etcd): the key stays its own.
        again = starting.announce(argv(etcd, "w1"))
        assert again is not None
        await asyncio.to_thread(again.release, True)
        assert again.lease == 0 and await read(etcd.endpoint, key) == serving
        await registrar.stop()

    asyncio.run(main())


def test_a_starting_key_runs_out_once_nothing_keeps_it(etcd) -> None:
    """A process that dies while starting keeps its lease alive no more: the key goes."""

    async def main() -> None:
        key = instance_key("st", "w2")
        info = InstanceInfo("w2", "", "mixed", 0, "m", "s", os.getpid(), "h", state="starting")
        keeper = starting.StartingKey(key, info, 2, [etcd.endpoint])  # announce's TTL is 15 s
        keeper.start()
        await until_read(etcd.endpoint, key, lambda i: i is not None)
        await asyncio.to_thread(keeper.release, False)  # the keep-alives stop, as on a kill
        await until_read(etcd.endpoint, key, lambda i: i is None, timeout=2 + 5)

    asyncio.run(main())


def test_nothing_is_announced_where_there_is_nothing_to_announce(etcd, monkeypatch) -> None:
    assert starting.announce(argv(etcd, "w3", "--no-register")) is None
    assert starting.announce(argv(etcd, "w3", "--role", "nonsense")) is None  # main says why
    assert starting.announce(["--help"]) is None
    monkeypatch.setenv(
        lease_handover.ENV, lease_handover.handover_env(1, [etcd.endpoint], "k", "v")
    )
    assert starting.announce(argv(etcd, "w3")) is None  # a model load's restart: "loading"
