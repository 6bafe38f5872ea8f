"""Mooncake Store as a KV tier shared by workers: etcd, a kvstore supervising a real
``mooncake_master``, and two workers started with ``--kv-store auto``. A long prefix
computed on one worker is fetched from the store by the other instead of recomputed."""

from __future__ import annotations

import os
import signal
import urllib.request

import grpc
import pytest
from cluster_helpers import descendants, start_cluster
from cluster_helpers import wait_for as poll
from prometheus_client.parser import text_string_to_metric_families

from services.cli.children import ManagedProcess
from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc
from tests.deps import MOONCAKE, require
from tests.waits import sigstop

require("mooncake.store", MOONCAKE)
pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]


def wait_for(pred, timeout: float = 60.0, what: str = "condition"):
    return poll(pred, timeout, what, every=0.1)


BS = 16
# A worker told to stop exits within this (1.6 s at a load of 4; the stopped master held
# Mooncake's close() 45-99 s).
EXIT_BOUND_S = 30
SHARED = [(7 * i + 11) % 3000 + 100 for i in range(12 * BS)]  # 12 blocks


def generate(worker: ManagedProcess, rid: str, ids: list[int]) -> tuple[list[int], int]:
    """Greedy tokens of a prompt run on ``worker`` and its prompt tokens not computed."""
    with grpc.insecure_channel(worker.ready_field("address")) as channel:
        stub = pb_grpc.WorkerServiceStub(channel)
        params = pb.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        msgs = list(stub.Generate(pb.GenerateRequest(request_id=rid, prompt_token_ids=ids,
                                                     params=params), timeout=120))  # fmt: skip
    assert msgs[-1].finished
    tokens = [t for m in msgs for c in m.outputs for t in c.token_ids]
    return tokens, max(m.cached_prompt_tokens for m in msgs)


def metric(worker: ManagedProcess, name: str, **labels: str) -> float:
    url = f"http://127.0.0.1:{worker.ready_field('metrics_port')}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_a_prefix_computed_on_one_worker_is_reused_by_another(tiny_model_dir):
    cluster = start_cluster(
        tiny_model_dir("llama"), workers=2, kvstore=True,
        worker_overrides={"kv_store": "auto", "kv_store_segment_bytes": 64 << 20},
    )  # fmt: skip
    try:
        a, b = cluster.workers
        # B's store client connects lazily: wait until a first prompt of its own is written
        # through, so the shared prompt's lookup finds the store connected.
        generate(b, "warm-b", [5] * (2 * BS + 1))
        wait_for(lambda: metric(b, "epdserve:kv_store_put_blocks_total"), what="B's store")
        ref, cached_a = generate(a, "on-a", [*SHARED, 9])
        assert cached_a == 0
        wait_for(lambda: metric(a, "epdserve:kv_store_put_blocks_total") >= 12, what="A's writes")
        tokens, cached_b = generate(b, "on-b", [*SHARED, 9])
        assert tokens == ref
        assert cached_b == 12 * BS  # every shared block came from the store
        assert metric(b, "epdserve:kv_tier_hit_blocks_total", tier="store") >= 12
        # A stopped master (and a kvstore that cannot kill it) holds up no worker's exit:
        # Mooncake's close() against it held the GIL 45-99 s (user13, session 20).
        assert cluster.kvstore is not None
        stopped = [cluster.kvstore.proc.pid, *descendants(cluster.kvstore.proc.pid)]
        for pid in stopped:
            sigstop(pid)
        try:
            b.signal(signal.SIGTERM)
            assert b.proc.wait(timeout=EXIT_BOUND_S) == 0
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
    finally:
        cluster.stop()
