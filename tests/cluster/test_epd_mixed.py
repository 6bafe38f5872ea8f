"""A mixed worker of a tiny random Qwen2-VL (real processes) encodes images itself: chats
with images (OpenAI image_url parts, Anthropic image blocks, Responses input_image parts, an
http URL) give the offline engine's greedy output; bad images are a 400 in the API's format
and the worker keeps serving."""

from __future__ import annotations

import base64

import httpx
import pytest
from cluster_helpers import TINY_NAME
from epd_helpers import (
    CASES,
    IMAGES,
    MAX_TOKENS,
    chat,
    chat_text,
    check_outputs,
    cluster,
    data_url,
)

from tests.conftest import image_bytes as png
from tests.deps import MOONCAKE, PIL, require
from tests.local_http import QuietHandler, base_url, local_http

require("mooncake.engine", MOONCAKE)
require("PIL", PIL)
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


@pytest.fixture(scope="module")
def mixed_cluster(tiny_vl_model_dir):
    c = cluster(tiny_vl_model_dir, workers=1)
    yield c
    c.stop()


def test_mixed_mode_equals_offline_engine(mixed_cluster, reference):
    check_outputs(mixed_cluster.base_url, reference)


def test_responses_input_image_equals_offline_engine(mixed_cluster, reference):
    """input_text and input_image parts of the Responses API: the chat case's output."""
    (images, text), want = CASES[1], reference[1]
    content = [{"type": "input_text", "text": text}] + [
        {"type": "input_image",
         "image_url": data_url(img, "image/jpeg" if img[:2] == b"\xff\xd8" else "image/png")}
        for img in images
    ]  # fmt: skip
    body = {"model": TINY_NAME, "input": [{"role": "user", "content": content}], "store": False,
            "max_output_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}  # fmt: skip
    r = httpx.post(mixed_cluster.base_url + "/v1/responses", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["output"][0]["content"][0]["text"] == want


def test_http_image_url(mixed_cluster, reference):
    """An http URL on 127.0.0.1 (allowed by this router's --allow-private-image-urls)."""

    class Handler(QuietHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(IMAGES[0])

    with local_http(Handler) as server:
        url = base_url(server) + "/cat.png"
        body = {"model": TINY_NAME, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "Describe"},
                    {"type": "image_url", "image_url": {"url": url}}]}]}  # fmt: skip
        r = httpx.post(mixed_cluster.base_url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == reference[0]


BAD = [
    ("corrupt", [b"\x89PNG\r\n\x1a\n" + b"\x00" * 64], "could not be decoded"),
    ("not an image", [b"hello world, not pixels"], "could not be decoded"),
    ("too many", [IMAGES[0]] * 4, "at most 3"),
    ("too large", [png(400, 400, 9)], "exceeds the limit"),
]


@pytest.mark.parametrize(("name", "images", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_images_are_400(mixed_cluster, name, images, message):
    r = chat(mixed_cluster.base_url, images)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and message in err["message"]


def test_bad_image_type_and_anthropic_format(mixed_cluster, reference):
    url = mixed_cluster.base_url
    body = {"model": TINY_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(IMAGES[0], "image/tiff")}}]}]}  # fmt: skip
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and "unsupported image type" in r.json()["error"]["message"]
    r = httpx.post(
        url + "/v1/messages",
        json={"model": TINY_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(b"garbage").decode()}}]}]},
        timeout=30,
    )  # fmt: skip
    assert r.status_code == 400
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "could not be decoded" in r.json()["error"]["message"]
    # The cluster still serves images.
    assert chat_text(url, CASES[0][0], CASES[0][1]) == reference[0]
