"""E+P+D with real processes on a tiny random Qwen2-VL: encoders compute the images'
embeddings and the prefill worker reads them through Mooncake, giving the offline engine's
greedy output; a repeated image hits the encoder cache and skips the vision tower; a bad image
is a 400 and the cluster keeps serving; an encoder changes role like the other workers; an
encoder stopped (SIGSTOP) or killed under load costs no request.

Other EPD modules: test_epd_mixed.py (a mixed worker encodes; API errors),
test_epd_rebalance.py (EP+D; the rebalancer moves a worker to encode and back),
test_epd_qwen25.py (Qwen2.5-VL; cache-aware routing of image prompts)."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
from epd_helpers import (
    CASES,
    chat,
    chat_text,
    check_epd,
    cluster,
    encoder_totals,
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
def epd_cluster(tiny_vl_model_dir):
    c = cluster(tiny_vl_model_dir, workers=0, prefill=1, decode=1, encode=2)
    yield c
    c.stop()


def test_epd_mode_equals_offline_engine(epd_cluster, reference):
    check_epd(epd_cluster, reference, 2)


def test_repeated_image_hits_encoder_cache(epd_cluster, reference):
    wait_encoders(epd_cluster, 2)
    img = png(64, 64, 42)
    first = chat_text(epd_cluster.base_url, [img], "Once")
    tower = encoder_totals(epd_cluster, "epdserve:encoder_tower_images")
    hits = encoder_totals(epd_cluster, "epdserve:encoder_cache_hits")
    # The image is cached on the encoder that computed it; the policy picks the least
    # loaded, so ask until a repeat landed there (each repeat is a hit or a miss).
    for _ in range(6):
        assert chat_text(epd_cluster.base_url, [img], "Once") == first
        if encoder_totals(epd_cluster, "epdserve:encoder_cache_hits") > hits:
            break
    assert encoder_totals(epd_cluster, "epdserve:encoder_cache_hits") > hits
    # At most one more tower run: the other encoder's first sight of the image.
    assert encoder_totals(epd_cluster, "epdserve:encoder_tower_images") <= tower + 1


def test_bad_image_on_epd_then_still_serving(epd_cluster, reference):
    r = chat(epd_cluster.base_url, [b"\xff\xd8\xff\xe0 truncated jpeg"])
    assert r.status_code == 400, r.text
    assert all(w.alive() for w in epd_cluster.workers)
    assert chat_text(epd_cluster.base_url, CASES[0][0], CASES[0][1]) == reference[0]


def test_encoder_changes_role_like_the_others(epd_cluster, reference):
    """An encoder moved to prefill and back (drain, flip, epoch + 1), serving all along."""
    encoder = workers_of(epd_cluster, "encode")[1].ready_field("id")
    set_role(epd_cluster, encoder, "prefill")
    assert chat_text(epd_cluster.base_url, CASES[1][0], CASES[1][1]) == reference[1]
    set_role(epd_cluster, encoder, "encode")
    wait_encoders(epd_cluster, 2)
    assert chat_text(epd_cluster.base_url, CASES[0][0], CASES[0][1]) == reference[0]


def test_encoder_stopped_under_load(epd_cluster, reference):
    """An encoder that stops answering (SIGSTOP) holds no request for long: its calls give up
    when its load stream goes silent, and the images are encoded elsewhere. Every request
    succeeds with the undisturbed output."""
    wait_encoders(epd_cluster, 2)
    url = epd_cluster.base_url
    images = [png(60, 60, 200 + i) for i in range(6)]
    expected = [chat_text(url, [img], "Stop") for img in images]
    fresh = [png(60, 60, 300 + i) for i in range(6)]  # not in any encoder cache yet
    victim = workers_of(epd_cluster, "encode")[0]
    victim.signal(signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(max_workers=len(images)) as pool:
            futures = [pool.submit(chat, url, [img], "Stop") for img in images + fresh]
            results = [f.result(timeout=180) for f in futures]
    finally:
        victim.signal(signal.SIGCONT)
    assert [r.status_code for r in results] == [200] * len(results), [r.text for r in results]
    got = [r.json()["choices"][0]["message"]["content"] for r in results]
    assert got[: len(images)] == expected
    expected_fresh = [chat_text(url, [img], "Stop") for img in fresh]
    assert got[len(images) :] == expected_fresh
    wait_encoders(epd_cluster, 2)  # the continued encoder is routed to again


def test_encoder_killed_under_load(epd_cluster, tiny_vl_model_dir):
    """Requests with fresh images in flight while an encoder is killed: every one completes
    (re-encoded by the other encoder or by the prefill worker), none hangs, and outputs equal
    a run with both encoders."""
    wait_encoders(epd_cluster, 2)
    url = epd_cluster.base_url
    images = [png(56, 56, 100 + i) for i in range(8)]
    # Expected outputs first (every image then also sits in an encoder cache; the loaded run
    # below uses the same images, so half of them live on the encoder that dies).
    expected = [chat_text(url, [img], "Look") for img in images]
    victim = workers_of(epd_cluster, "encode")[0]
    with ThreadPoolExecutor(max_workers=len(images)) as pool:
        futures = [pool.submit(chat, url, [img], "Look") for img in images]
        victim.signal(signal.SIGKILL)
        results = [f.result(timeout=180) for f in futures]
    assert [r.status_code for r in results] == [200] * len(results), [r.text for r in results]
    assert [r.json()["choices"][0]["message"]["content"] for r in results] == expected
    # Afterwards new images are encoded by the surviving encoder.
    assert chat_text(url, [png(60, 60, 7)], "After") == chat_text(url, [png(60, 60, 7)], "After")
