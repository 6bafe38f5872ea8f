"""PD with a host KV pool on the decode worker: a prompt whose blocks the decode worker's
device cache evicted to its host pool is reserved with those blocks loaded back, so the
prefill worker pushes only the rest, and the tokens stay those of a full transfer."""

from __future__ import annotations

import time

import httpx
import pytest
from cluster_helpers import TINY_NAME, load_report, start_cluster

from services.common.proto import worker_pb2 as pb
from tests.deps import MOONCAKE, require

require("mooncake.engine", MOONCAKE)
pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

BLOCK_BYTES = 16 * 512  # the tiny model on the CPU: ~512 B of KV per token, 16 per block
TEXT = "the quick brown fox jumps over the lazy dog and runs into the forest " * 8


def complete(url: str, prompt: str) -> dict:
    r = httpx.post(
        url + "/v1/completions",
        json={"model": TINY_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0,
              "ignore_eos": True, "logprobs": 2},
        timeout=120,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def host_hit_blocks(worker) -> float:
    text = httpx.get(f"http://127.0.0.1:{worker.ready_field('metrics_port')}/metrics").text
    for line in text.splitlines():
        if line.startswith("epdserve:kv_tier_hit_blocks") and 'tier="host"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no host-tier hit metric")


@pytest.fixture(scope="module")
def pd_cluster(tiny_model_dir):
    # 16 device blocks: three other prompts push a prompt's blocks down to the host pool.
    c = start_cluster(
        tiny_model_dir("llama"), workers=0, prefill=1, decode=1,
        engine_overrides={"kv_cache_bytes": 16 * BLOCK_BYTES, "kv_host_pool_bytes": 1 << 20},
    )  # fmt: skip
    yield c
    c.stop()


def test_decode_worker_reuses_its_host_pool(pd_cluster):
    decode = pd_cluster.workers[1]
    address = decode.ready_field("address")
    assert load_report(address).role == pb.ROLE_DECODE
    prompt = "Once upon a time " + TEXT
    first = complete(pd_cluster.base_url, prompt)  # every block moves from prefill
    for k in range(3):
        complete(pd_cluster.base_url, f"Filler number {k}: " + TEXT)
    before = host_hit_blocks(decode)
    again = complete(pd_cluster.base_url, prompt)
    assert host_hit_blocks(decode) - before >= 4  # loaded from the host pool, not moved
    assert again["text"] == first["text"]
    assert again["logprobs"]["tokens"] == first["logprobs"]["tokens"]
    for a, b in zip(
        again["logprobs"]["token_logprobs"], first["logprobs"]["token_logprobs"], strict=True
    ):
        assert abs(a - b) < 1e-4
    deadline = time.monotonic() + 45
    while True:
        reports = [load_report(w.ready_field("address")) for w in pd_cluster.workers]
        if all(r.num_free_blocks == r.num_total_blocks for r in reports):
            break
        assert time.monotonic() < deadline, [
            (r.num_free_blocks, r.num_total_blocks) for r in reports
        ]
        time.sleep(0.5)
