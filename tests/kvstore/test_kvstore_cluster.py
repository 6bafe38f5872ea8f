"""The kvstore with real processes: etcd, a kvstore supervising a real mooncake_master, two
workers publishing their KV events, and a cache-aware router."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from cluster_helpers import (
    TINY_NAME,
    children,
    etcd_get,
    kv_holders,
    kvstore_stub,
    start_cluster,
)
from cluster_helpers import (
    wait_for as poll,
)

from services.cli.launcher import LocalCluster
from services.common.proto import kvstore_pb2 as kpb
from services.engine.block_hash import hash_prompt_blocks
from tests.deps import MOONCAKE, require

require("mooncake.engine", MOONCAKE)
pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]


def wait_for(pred, timeout: float = 60.0, what: str = "condition"):
    return poll(pred, timeout, what, every=0.1)


# 16 blocks of 16 tokens shared by every prompt: long enough that recomputing it costs more
# than a request still in flight on the holder (a load report can lag by one request).
PREFIX = [(13 * i + 5) % 240 + 3 for i in range(256)]
BLOCKS = len(PREFIX) // 16


def stats(cluster: LocalCluster) -> kpb.KVStoreStatsResponse | None:
    channel, stub = kvstore_stub(cluster)
    try:
        return stub.Stats(kpb.KVStoreStatsRequest(), timeout=5)
    except grpc.RpcError:
        return None
    finally:
        channel.close()


def holders(cluster: LocalCluster, tokens: list[int]) -> dict[str, int]:
    """Instance -> device blocks of ``tokens`` it holds, hashed as the router hashes."""
    return kv_holders(cluster, hash_prompt_blocks(tokens, 16), LAYOUT[0])


LAYOUT: list[str] = []  # the workers' advertised kv_layout (read once in the fixture)


def complete(cluster: LocalCluster, prompt: list[int]) -> dict:
    r = httpx.post(
        cluster.base_url + "/v1/completions",
        json={"model": TINY_NAME, "prompt": prompt, "max_tokens": 2, "temperature": 0},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def cluster(tiny_model_dir) -> Iterator[LocalCluster]:
    # The workers keep no blocks in the store here (the tests publish the STORE tier
    # themselves); tests/kvstore/test_store_cluster.py covers workers using it.
    c = start_cluster(
        tiny_model_dir("llama"), workers=2, kvstore=True, policy="cache_aware",
        worker_overrides={"kv_store": ""},
    )  # fmt: skip
    try:
        info = json.loads(etcd_get(c, "/epdserve/test/instances/worker-0"))
        assert info["capacity"]["block_size"] == 16
        LAYOUT[:] = [info["capacity"]["kv_layout"]]
        yield c
    finally:
        c.stop()


def test_kvstore_registers_and_both_workers_publish(cluster: LocalCluster) -> None:
    info = json.loads(etcd_get(cluster, "/epdserve/test/kvstore/kvstore-0"))
    assert info["role"] == "kvstore"
    assert info["capacity"]["master_rpc_address"].startswith("127.0.0.1:")
    assert info["capacity"]["metadata_url"].startswith("http://127.0.0.1:")
    st = wait_for(lambda: (s := stats(cluster)) and s.num_instances == 2 and s, what="publishers")
    assert st.master_alive
    # The kvstore is not a worker: routing and the worker list never see it.
    status = httpx.get(cluster.base_url + "/admin/status", headers=admin(cluster), timeout=10)
    body = status.json()
    assert sorted(w["id"] for w in body["workers"]) == ["worker-0", "worker-1"]
    assert body["kvstore"]["present"] and body["kvstore"]["healthy"]
    # Prometheus metrics, as docs/metrics.md lists them.
    assert cluster.kvstore is not None
    port = cluster.kvstore.ready_field("metrics_port")
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for name in ("kvstore_index_blocks", "kvstore_lookups_total", "kvstore_hit_rate",
                 "kvstore_master_restarts_total", "kvstore_master_up"):  # fmt: skip
        assert f"epdserve:{name}{{" in text, name
    assert 'epdserve:kvstore_instances{instance="kvstore-0"} 2.0' in text


def test_repeated_prefix_goes_to_the_worker_holding_it(cluster: LocalCluster) -> None:
    first = PREFIX + [1, 2, 3, 4] * 4
    complete(cluster, first)
    # The engine's blocks, hashed by the router's function, are found on one worker.
    held = wait_for(lambda: holders(cluster, PREFIX), what="the prefix in the index")
    assert list(held.values()) == [BLOCKS], held
    (holder,) = held
    for i in range(4):
        out = complete(cluster, PREFIX + [10 + i] * 16)
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(PREFIX), out
    # Only the holder ever computed the prefix (round-robin would have spread it).
    assert set(holders(cluster, PREFIX)) == {holder}
    st = stats(cluster)
    assert st is not None and st.lookups >= 5 and st.hit_blocks >= 4 * BLOCKS


def test_publishers_resync_after_a_kvstore_restart(cluster: LocalCluster) -> None:
    held = wait_for(lambda: holders(cluster, PREFIX), what="the prefix in the index")
    old = cluster.kvstore
    assert old is not None
    master_pids = children(old.proc.pid)
    old.signal(signal.SIGKILL)
    old.proc.wait(timeout=10)
    # The master dies with its supervisor (parent-death signal), it is never orphaned.
    wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in master_pids),
             timeout=20, what="the old master to exit")  # fmt: skip
    # Without a kvstore the router routes on load alone; requests still succeed.
    assert complete(cluster, PREFIX + [99] * 16)["usage"]["prompt_tokens"] == len(PREFIX) + 16
    new = cluster.start_kvstore()
    wait_for(lambda: new.ready.is_set() or not new.alive(), what="the new kvstore")
    assert new.alive(), new.describe_failure()
    # Nothing restarted on the workers: their publishers sent their whole state again.
    wait_for(lambda: (s := stats(cluster)) and s.num_instances == 2, what="resync")
    # (The request sent meanwhile may have put the prefix on the other worker too.)
    wait_for(lambda: held.items() <= holders(cluster, PREFIX).items(), what="the prefix again")


def test_killed_master_is_restarted_and_the_store_tier_dropped(cluster: LocalCluster) -> None:
    channel, stub = kvstore_stub(cluster)
    try:
        hashes = hash_prompt_blocks(PREFIX, 16)
        resp = stub.Publish(
            kpb.KVEventBatch(
                instance_id="tester", incarnation="t", model=TINY_NAME, layout_key=LAYOUT[0],
                seq=1, reset=True,
                events=[kpb.KVEvent(kind=kpb.KV_EVENT_STORED, tier=kpb.KV_TIER_STORE,
                                    block_hashes=hashes)],
            ),
            timeout=5,
        )  # fmt: skip
        assert not resp.resync
        before = stub.Stats(kpb.KVStoreStatsRequest(), timeout=5)
        assert before.store_blocks == BLOCKS and before.master_restarts == 0
        assert cluster.kvstore is not None
        (master,) = children(cluster.kvstore.proc.pid)
        os.kill(master, signal.SIGKILL)
        after = wait_for(
            lambda: (
                (s := stub.Stats(kpb.KVStoreStatsRequest(), timeout=5)).master_restarts == 1
                and s.master_alive
                and s
            ),
            what="the master's restart",
        )
        assert after.store_blocks == 0
        assert after.store_epoch != before.store_epoch
        (new_master,) = children(cluster.kvstore.proc.pid)
        assert new_master != master
        health = stub.Health(kpb.KVStoreHealthRequest(), timeout=5)
        assert health.status == kpb.KVStoreHealthResponse.SERVING
    finally:
        channel.close()


def admin(c: LocalCluster) -> dict[str, str]:
    return {"Authorization": f"Bearer {c.admin_token}"}


def test_a_worker_that_leaves_the_cluster_is_forgotten(cluster: LocalCluster) -> None:
    held = wait_for(lambda: holders(cluster, PREFIX), what="the prefix in the index")
    gone = next(iter(held))
    proc = next(w for w in cluster.workers if w.ready_field("id") == gone)
    proc.signal(signal.SIGKILL)  # no goodbye: its etcd lease expires
    proc.proc.wait(timeout=10)
    wait_for(lambda: gone not in holders(cluster, PREFIX), what="the index to forget it")
    st = stats(cluster)
    assert st is not None and st.num_instances == 1
