"""The kvstore's master supervisor finds a `mooncake_master` that is alive but does not
answer (SIGSTOP: the kernel still completes its TCP handshakes) by an HTTP health probe,
kills it and starts a new one on the same ports, and a store client connected to the old
master works against the new one (Mooncake re-mounts its segment). Real master processes."""

from __future__ import annotations

import asyncio

import pytest

from services.common.net import free_port
from services.kvstore.master import (
    MasterPorts,
    MasterSupervisor,
    _port_open,
    find_master_binary,
    http_answers,
    master_argv,
)
from services.kvstore.store_tier import MooncakeStoreTier, StoreConfig
from tests.deps import MOONCAKE, require
from tests.waits import sigstop, until

require("mooncake.store", MOONCAKE)
pytestmark = pytest.mark.timeout(120)


def test_a_stopped_master_is_killed_and_replaced() -> None:
    ports = MasterPorts("127.0.0.1", free_port(), free_port(), free_port())
    argv = master_argv(find_master_binary(), ports, 5000, [])
    cfg = StoreConfig(ports.rpc_address, ports.metadata_url, segment_bytes=16 << 20,
                      buffer_bytes=8 << 20, retry_s=0.2)  # fmt: skip
    store = MooncakeStoreTier(cfg, "m", "layout")

    async def scenario() -> None:
        restarted: list[int | None] = []
        sup = MasterSupervisor(argv, ports, probe_period_s=0.3, probe_timeout_s=0.5,
                               probe_failures=2)  # fmt: skip
        sup.on_restart = lambda: restarted.append(sup.pid)
        await sup.start()
        try:
            assert await asyncio.to_thread(store.put_blocks, [1], [b"x" * 512]) == [1]
            old = sup.pid
            assert old is not None
            # Every thread stopped (Linux stops lazily: at load the master answered the
            # check below after the signal, CI of session 21).
            await asyncio.to_thread(sigstop, old)
            # The trap the probe avoids: a stopped master still accepts connections.
            assert await _port_open(ports.host, ports.rpc_port)
            assert not await http_answers(ports.host, ports.metrics_port, "/health", 0.5)
            await until(lambda: restarted and sup.alive, 30, "the master's replacement")
            assert sup.probe_kills == 1 and sup.restarts == 1
            assert restarted == [sup.pid] and sup.pid != old
            assert await http_answers(ports.host, ports.metrics_port, "/health", 2.0)

            # The client of the old master stores and reads on the new (empty) one.
            def round_trip() -> bool:
                return store.put_blocks([2], [b"y" * 512]) == [2] and store.get_blocks([2]) != []

            for _ in range(100):
                if await asyncio.to_thread(round_trip):
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError("the store client never worked against the new master")
            assert await asyncio.to_thread(store.get_blocks, [1]) == []  # a restart empties it
        finally:
            # NOTE: the clients first, while their master still answers: closed after it
            # stopped, they retried it for ~17 s.
            await asyncio.to_thread(store.close)
            await sup.stop()

    asyncio.run(scenario())
