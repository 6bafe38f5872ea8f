"""EP+D and role rebalancing with real processes on a tiny random Qwen2-VL, one cluster:
with no encoder the prefill worker encodes the images itself (the offline engine's greedy
output, every embedding computed locally); then, with one encoder, the rebalancer moves a
worker to encode under image-heavy load and back when the encoders idle and decode needs it."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from cluster_helpers import cli, flips, wait_for, workers
from epd_helpers import (
    chat,
    check_outputs,
    cluster,
    metric,
    set_role,
    wait_encoders,
    workers_of,
)

from tests.conftest import image_bytes as png
from tests.deps import MOONCAKE, PIL, require

require("mooncake.engine", MOONCAKE)
require("PIL", PIL)
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


@pytest.fixture(scope="module")
def rebalance_cluster(tiny_vl_model_dir):
    """One prefill and three decode workers, no encoder; the router's rebalancer rounds are
    quick (0.5 s, 2 rounds of hysteresis, 3 s of cooldown) and its policy static until a
    test sets one."""
    c = cluster(
        tiny_vl_model_dir, workers=0, prefill=1, decode=3,
        router={"rebalance_interval_s": 0.5, "rebalance_hysteresis_rounds": 2,
                "rebalance_cooldown_s": 3.0, "rebalance_max_flips": 10,
                "rebalance_flip_window_s": 60.0},
    )  # fmt: skip
    yield c
    c.stop()


def test_ep_d_mode_equals_offline_engine(rebalance_cluster, reference):
    """No encoder: the prefill worker computes every image's embeddings itself."""
    c = rebalance_cluster
    check_outputs(c.base_url, reference)
    (prefill,) = workers_of(c, "prefill")
    port = prefill.ready_field("metrics_port")
    assert metric(port, "epdserve:image_embeddings", 'source="local"') >= 3
    assert metric(port, "epdserve:image_embeddings", 'source="fetched"') == 0


# Prefill/decode bands no load here reaches (only the encode rule acts in phase 1); an encoder
# holding any image at a report counts as backlogged, one holding none as idle.
ENCODE_PARAMS = {
    "prefill_queue_high": 1e6, "prefill_queue_low": 1e5, "decode_load_high": 100,
    "decode_load_low": 50, "encode_queue_high": 0.5, "encode_queue_low": 0.1, "smoothing": 1,
}  # fmt: skip


class ImageLoad:
    """``n`` client threads sending chats with fresh images (no encoder-cache hits) until
    stopped; records every status code."""

    def __init__(self, url: str, n: int, images_per_request: int = 3) -> None:
        self.codes: list[int] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(url, i, images_per_request), daemon=True)
            for i in range(n)
        ]
        for t in self._threads:
            t.start()

    def _run(self, url: str, i: int, k: int) -> None:
        seed = 10_000 * (i + 1)
        while not self._stop.is_set():
            imgs = [png(112, 112, seed + j) for j in range(k)]
            seed += k
            self.codes.append(chat(url, imgs, "Many").status_code)

    def stop(self) -> list[int]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
        return self.codes


def test_rebalancer_moves_a_vl_worker_to_encode_and_back(rebalance_cluster, reference):
    """E+P+D with one encoder, one prefill and two decode workers of a VL model, queue policy.
    Image-heavy load backlogs the encoder: the rebalancer moves a decode worker (the larger,
    unpressed side) to encode, the worker drains, flips and then serves Encode calls. Then,
    with the encoders idle and decode pressed (text-only load, a low decode band), an encoder
    goes back to decode. Every request succeeds with the undisturbed output."""
    c = rebalance_cluster
    # The third decode worker becomes the one encoder (the EP+D test above had none).
    set_role(c, workers_of(c, "decode")[2].ready_field("id"), "encode")
    r = cli(c, "policy", "set", "queue", *(f"--param={k}={v:g}" for k, v in ENCODE_PARAMS.items()))
    assert r.returncode == 0, r.stderr
    wait_encoders(c, 1)
    url = c.base_url
    before = {i: w["role"] for i, w in workers(c).items()}
    assert sorted(before.values()) == ["decode", "decode", "encode", "prefill"]
    r = cli(c, "roles")
    assert r.returncode == 0, r.stderr
    assert "mixed,prefill,decode,encode" in r.stdout  # every worker of a VL model can encode

    # Phase 1: many images at once; the one encoder is the bottleneck.
    load = ImageLoad(url, 8)
    try:
        to_encode = wait_for(lambda: flips(c, "flip_to_encode"), 90,
                             "a flip to encode under image-heavy load")  # fmt: skip
    finally:
        codes = load.stop()
    moved = to_encode[0]["worker_id"]
    print("phase 1:", to_encode[0]["reason"], to_encode[0]["inputs"])
    assert before[moved] == "decode" and to_encode[0]["target_role"] == "encode"
    assert to_encode[0]["inputs"]["encode_backlog_per_worker"] > 0.5
    row = wait_for(lambda: (w := workers(c)[moved])["role"] == "encode"
                   and w["state"] == "serving" and w, 60, f"{moved} as a serving encoder")  # fmt: skip
    assert row["epoch"] == 2
    wait_encoders(c, 2)
    assert codes and set(codes) == {200}, codes[:20]

    # The moved worker now serves Encode calls (the router picks the least-loaded
    # encoder, ties by id), and outputs are the offline engine's.
    port = next(w for w in c.workers if w.ready_field("id") == moved).ready_field("metrics_port")
    tower = metric(port, "epdserve:encoder_tower_images")
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(chat, url, [png(64, 64, 500 + i)], "New") for i in range(8)]
        assert [f.result(timeout=120).status_code for f in futures] == [200] * 8
    assert metric(port, "epdserve:encoder_tower_images") > tower
    check_outputs(url, reference)
    text = cli(c, "status").stdout
    assert "IMAGES" in text and "flip_to_encode" in text

    # Phase 2: encoders idle, decode pressed (a band that any decode batch exceeds).
    r = cli(c, "policy", "set", "queue", *(f"--param={k}={v:g}" for k, v in
            {**ENCODE_PARAMS, "decode_load_high": 0.02, "decode_load_low": 0.01}.items()))  # fmt: skip
    assert r.returncode == 0, r.stderr
    with ThreadPoolExecutor(max_workers=6) as pool:
        stop = threading.Event()

        def text_load() -> list[int]:
            out = []
            while not stop.is_set():
                out.append(chat(url, [], "Hello", max_tokens=48).status_code)
            return out

        futures = [pool.submit(text_load) for _ in range(6)]
        try:
            back = wait_for(lambda: flips(c, "flip_from_encode"), 90,
                            "a flip from encode with idle encoders and decode pressed")  # fmt: skip
        finally:
            stop.set()
        text_codes = [code for f in futures for code in f.result(timeout=180)]
    print("phase 2:", back[0]["reason"], back[0]["inputs"])
    assert back[0]["target_role"] == "decode"
    assert set(text_codes) == {200}, text_codes[:20]
    went = back[0]["worker_id"]
    wait_for(lambda: (w := workers(c)[went])["role"] == "decode" and w["state"] == "serving",
             60, f"{went} back in decode")  # fmt: skip
    # One encoder is left, and the rebalancer never takes the last one.
    roles = sorted(w["role"] for w in workers(c).values())
    assert roles == ["decode", "decode", "encode", "prefill"], roles
    cli(c, "policy", "set", "static")
    check_outputs(url, reference)
