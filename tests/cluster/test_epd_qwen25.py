"""E+P+D on a tiny random Qwen2.5-VL (windowed vision attention in the encoder, M-RoPE in
prefill and decode) gives the offline engine's output; a cache-aware router sends every
repeat of an image prompt to the prefill worker holding its blocks.

NOTE: a module of its own: its cluster (five workers and a kvstore) then never runs beside
another EPD module's cluster."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from cluster_helpers import etcd_get, kv_holders, wait_for
from epd_helpers import chat, chat_text, check_epd, cluster, offline_outputs, workers_of

from services.engine.block_hash import hash_prompt_blocks
from services.router.features.images import ImageLimits, chat_prompt
from services.router.routing.kv_index import PAUSE_AFTER_FAILURE_S, prompt_hash_root
from services.router.routing.policies.base import RouteRequest
from services.router.tokenization import Tokenizer
from tests.conftest import image_bytes as png
from tests.deps import MOONCAKE, PIL, require

require("mooncake.engine", MOONCAKE)
require("PIL", PIL)
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


@pytest.fixture(scope="module")
def vl25_cluster(tiny_vl25_model_dir):
    """E+P+D on a tiny Qwen2.5-VL: one encoder, two prefill workers for a cache-aware policy
    to choose between (workers publish their blocks to the kvstore's global KV index; no
    store tier, so only a worker's own cache counts), one decode worker."""
    c = cluster(tiny_vl25_model_dir, workers=0, prefill=2, decode=1, encode=1, kvstore=True,
                policy="cache_aware", worker={"kv_store": ""})  # fmt: skip
    yield c
    c.stop()


def test_epd_mode_equals_offline_engine_on_qwen2_5_vl(vl25_cluster, tiny_vl25_model_dir):
    """Windowed vision attention in the encoder, embeddings through Mooncake, M-RoPE in
    prefill and decode: the offline engine's output (single and two images, text)."""
    check_epd(vl25_cluster, offline_outputs(tiny_vl25_model_dir), 1)


def test_repeated_image_prompt_goes_to_the_prefill_worker_holding_it(
    vl25_cluster, tiny_vl25_model_dir
):
    """The router hashes an image prompt as the engine does (expanded placeholders, a chain
    root mixed with the image hashes), so the cache-aware policy finds the prefill worker
    holding it and sends every repeat there."""
    c = vl25_cluster
    # ~300 tokens: recomputing them outweighs a request still counted on the holder (its
    # load report can lag by one request).
    text = " ".join(f"word{i}" for i in range(100))
    img = png(112, 112, 77)
    tok = Tokenizer.load(str(tiny_vl25_model_dir))
    msgs = [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image"}]}]
    ids, images = asyncio.run(chat_prompt(tok, msgs, [img], ImageLimits()))
    assert len(ids) >= 256
    prefills = {w.ready_field("id") for w in workers_of(c, "prefill")}
    info = json.loads(etcd_get(c, f"/epdserve/test/instances/{min(prefills)}"))
    layout, bs = info["capacity"]["kv_layout"], int(info["capacity"]["block_size"])
    # The chain the router looks up for this chat (and the kvstore then holds).
    route = RouteRequest("r", len(ids), ids, [i.hash for i in images])
    chain = hash_prompt_blocks(ids, bs, prompt_hash_root(route))
    blocks = len(chain)

    def held() -> dict[str, int]:
        return {i: n for i, n in kv_holders(c, chain, layout).items() if i in prefills}

    def lookup_failures() -> int:
        r = httpx.get(c.base_url + "/admin/status", timeout=10,
                      headers={"Authorization": f"Bearer {c.admin_token}"})  # fmt: skip
        return int(r.json()["kvstore"]["router_lookup_failures"])

    first = chat_text(c.base_url, [img], text)
    holding = wait_for(held, 30, "the image prompt's blocks in the KV index")
    assert list(holding.values()) == [blocks], holding
    (holder,) = holding
    answered = 0
    for _ in range(4):
        failures = lookup_failures()
        r = chat(c.base_url, [img], text)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == first
        cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        if lookup_failures() > failures:
            # NOTE: a lookup past its deadline (250 ms: a loaded machine) routes on load
            # alone for a while, by design; only repeats the index answered must hit.
            time.sleep(PAUSE_AFTER_FAILURE_S)
            continue
        answered += 1
        assert cached >= (blocks - 1) * bs, (cached, held(), holder)
    assert answered >= 2, f"the KV index answered {answered} of 4 lookups"
    if answered == 4:  # only the holder ever computed the prompt (load would alternate)
        assert set(held()) == {holder}
