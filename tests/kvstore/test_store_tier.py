"""The worker's Mooncake Store client (services/kvstore/store_tier.py) against a real
``mooncake_master``, and how a worker finds and configures it."""

from __future__ import annotations

import time

import pytest

from services.common.membership import InstanceInfo
from services.common.net import free_port
from services.kvstore.store_tier import MooncakeStoreTier, StoreConfig, block_key
from services.worker.config import WorkerConfig
from services.worker.kv_store import advertised_store
from tests.deps import MOONCAKE, require
from tests.engine.store_master import Master

require("mooncake.store", MOONCAKE)


def test_a_stopped_master_costs_no_setup_and_no_close(master, monkeypatch):
    """A master that accepts connections but does not answer (SIGSTOP, stuck): Mooncake's
    ``setup`` retries for minutes holding the GIL, so a worker whose first store call came
    then froze whole (its event loop, lease and gRPC health with it) and the router took it
    for dead: `epdserve up --prefill 1 --decode 1 --mixed 1` with the master stopped 20 s
    failed all 8 streams in flight (user13, session 20). The master's HTTP metadata server
    must answer first, and a master that stops right after it answered fails the setup at
    once; once it answers again, the client is set up and blocks round-trip. Stopped again,
    it holds up no close()."""
    import threading

    from services.kvstore import store_tier

    store = master.store("m", "L2-H2-D16-B16-float32")
    master.pause()
    try:
        got: list[list[bytes]] = []
        t = threading.Thread(target=lambda: got.append(store.get_blocks([1])), daemon=True)
        t.start()
        t.join(10)
        assert got == [[]] and store.num_setups == 0  # a miss, and no setup tried
        # The master stops between the check and the setup (a decode worker froze 5-12 s so,
        # until the kvstore killed the master): the setup fails within Mooncake's RPC timeout.
        monkeypatch.setattr(store_tier, "_master_answers", lambda c: True)
        store._next_try = 0.0
        start = time.monotonic()
        assert store.get_blocks([1]) == [] and store.num_setups == 0
        assert time.monotonic() - start < 10, "setup waited for a stopped master"
        monkeypatch.undo()
    finally:
        master.resume()
    try:
        deadline = time.monotonic() + 15
        while store.put_blocks([1, 2], [b"one", b"two"]) != [1, 2]:  # at its next try
            assert time.monotonic() < deadline, "no store client once the master answered"
            time.sleep(0.05)
        assert store.num_setups == 1
        assert store.put_blocks([2, 3], [b"two", b"three"]) == [2, 3]  # 2: already there
        assert store.get_blocks([1, 2, 3]) == [b"one", b"two", b"three"]
        assert store.get_blocks([1, 9, 3]) == [b"one"]
        assert store.get_blocks([9]) == []
        # Another model or KV layout never sees these blocks.
        other = master.store("m", "L2-H2-D16-B16-bfloat16")
        assert other.get_blocks([1]) == []
        other.close()
    finally:
        # Stopped again: Mooncake's close() then held the GIL for 45-99 s, so a worker told
        # to stop could not exit (user13, session 20). A client of a master that does not
        # answer is left open (its process ends with os._exit).
        master.pause()
        start = time.monotonic()
        try:
            store.close()
        finally:
            master.resume()
        assert time.monotonic() - start < 10, "close() waited for a stopped master"
        assert store_tier._LEFT_OPEN
        while store_tier._LEFT_OPEN:  # closed here, not torn down when pytest exits
            store_tier._LEFT_OPEN.pop().close()


def test_without_a_master_reads_miss_and_writes_fail_at_once():
    cfg = StoreConfig(f"127.0.0.1:{free_port()}", "http://127.0.0.1:1/metadata", retry_s=60)
    store = MooncakeStoreTier(cfg, "m", "layout")
    start = time.monotonic()
    assert store.get_blocks([1]) == []
    assert store.put_blocks([1], [b"x"]) == []
    assert time.monotonic() - start < 5  # no client set-up against a closed port
    assert store.num_setups == 0
    store.close()


def test_keys_name_model_and_layout():
    assert block_key("tiny", "L2-H2-D16-B16-float32", 0xAB) == (
        "epd/tiny/L2-H2-D16-B16-float32/00000000000000ab"
    )


def test_store_config_and_worker_flags_are_checked():
    with pytest.raises(ValueError, match="host:port"):
        StoreConfig("nohost", "http://127.0.0.1:1/metadata")
    with pytest.raises(ValueError, match="metadata"):
        WorkerConfig(kv_store="127.0.0.1:5000", register=False)
    with pytest.raises(ValueError, match="etcd"):
        WorkerConfig(kv_store="auto", register=False)
    ok = WorkerConfig(
        kv_store="127.0.0.1:5000", kv_store_metadata="http://127.0.0.1:5001/metadata",
        register=False,
    )  # fmt: skip
    assert ok.kv_store == "127.0.0.1:5000"


def test_auto_takes_the_master_the_kvstore_advertises():
    wcfg = WorkerConfig(kv_store="auto", advertise_host="10.0.0.7", kv_store_segment_bytes=1 << 20)

    def kvstore(iid: str, **capacity: str) -> InstanceInfo:
        return InstanceInfo(iid, "h:1", "kvstore", 1, "", "inc", 1, "h", capacity=capacity)

    assert advertised_store(wcfg, {}) is None
    assert advertised_store(wcfg, {"k": kvstore("k")}) is None  # a kvstore without a master
    cfg = advertised_store(
        wcfg,
        {
            "kvstore-b": kvstore("kvstore-b", master_rpc_address="b:1", metadata_url="http://b"),
            "kvstore-a": kvstore("kvstore-a", master_rpc_address="a:1", metadata_url="http://a"),
        },
    )
    assert cfg is not None
    assert (cfg.master, cfg.metadata_url, cfg.local_host, cfg.segment_bytes) == (
        "a:1", "http://a", "10.0.0.7", 1 << 20,
    )  # fmt: skip


def test_the_client_follows_a_master_that_moved():
    first, second = Master(), Master()
    first.start()
    second.start()
    current = [first.config()]
    store = MooncakeStoreTier(lambda: current[0], "m", "layout")
    try:
        assert store.put_blocks([1], [b"one"]) == [1]
        current[0] = second.config()  # e.g. the kvstore came back on new ports
        assert store.get_blocks([1]) == []  # a new, empty store
        assert store.put_blocks([2], [b"two"]) == [2]
        assert store.get_blocks([2]) == [b"two"]
        assert store.config == second.config() and store.num_setups == 2
        current[0] = None  # no kvstore advertised: misses, no errors
        assert store.get_blocks([2]) == []
    finally:
        store.close()
        first.kill()
        second.kill()
