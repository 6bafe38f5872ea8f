"""Router images (services/router/features/images.py): data URLs, decoding and limits, http(s) fetch
with the private-address guard and byte cap, placeholder expansion; every failure a 400."""

from __future__ import annotations

import asyncio
import base64

import pytest

from services.router.errors import APIError
from services.router.features.images import (
    ImageLimits,
    VisionSpec,
    chat_prompt,
    check_image,
    decode_data_url,
    fetch_url,
)
from tests.conftest import image_bytes
from tests.deps import PIL, require
from tests.local_http import QuietHandler, base_url, local_http

require("PIL", PIL)

LIMITS = ImageLimits(max_images=2, max_bytes=50_000, max_pixels=200 * 200, allow_private=True)


def bad(fn, *args, match: str):
    with pytest.raises(APIError) as info:
        result = fn(*args)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    assert info.value.status == 400 and match in info.value.message, info.value.message


def test_data_urls():
    png = image_bytes(20, 10, 0)
    assert decode_data_url("data:image/png;base64," + base64.b64encode(png).decode(), "p") == png
    bad(decode_data_url, "data:image/png,rawbytes", "p", match="must be base64")
    bad(decode_data_url, "data:image/tiff;base64,AAAA", "p", match="unsupported image type")
    bad(decode_data_url, "data:image/png;base64,%%%", "p", match="not valid base64")


def test_check_image_limits_and_corruption():
    assert check_image(image_bytes(30, 20, 1), LIMITS, "p") == (30, 20)
    assert check_image(image_bytes(30, 20, 1, "JPEG"), LIMITS, "p") == (30, 20)
    bad(check_image, b"", LIMITS, "p", match="empty")
    bad(check_image, b"not an image at all", LIMITS, "p", match="could not be decoded")
    truncated = image_bytes(64, 64, 2)[:300]
    bad(check_image, truncated, LIMITS, "p", match="could not be decoded")
    bad(check_image, image_bytes(30, 20, 3), ImageLimits(max_pixels=599), "p", match="pixels")
    bad(check_image, image_bytes(180, 180, 4), LIMITS, "p", match="exceeds the limit")
    bad(check_image, image_bytes(8, 8, 5, "TIFF"), LIMITS, "p", match="unsupported image type")


@pytest.fixture(scope="module")
def http_server():
    body = image_bytes(16, 16, 6)

    class Handler(QuietHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/missing":
                self.send_error(404)
                return
            payload = body * 100 if self.path == "/huge" else body
            self.send_response(200)
            self.end_headers()
            self.wfile.write(payload)

    with local_http(Handler) as server:
        yield base_url(server), body


def test_fetch_guards(http_server):
    base, body = http_server
    assert asyncio.run(fetch_url(base + "/img.png", LIMITS, "p")) == body
    strict = ImageLimits(allow_private=False)
    bad(fetch_url, base + "/img.png", strict, "p", match="non-public address")
    bad(fetch_url, "http://[::1]:1/x", strict, "p", match="non-public address")
    bad(fetch_url, "http://169.254.169.254/latest", strict, "p", match="non-public address")
    bad(fetch_url, base + "/missing", LIMITS, "p", match="HTTP 404")
    bad(fetch_url, base + "/huge", LIMITS, "p", match="exceeds the limit")
    bad(fetch_url, "ftp://example.com/x.png", LIMITS, "p", match="data: URL or an http(s)")


class TextTokenizer:
    vision = None

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=True):
        return [1, 2, 3]


def test_chat_prompt_expands_placeholders_and_counts_images(tiny_vl_model_dir):
    from services.router.tokenization import Tokenizer

    tok = Tokenizer.load(str(tiny_vl_model_dir))
    assert isinstance(tok.vision, VisionSpec)
    img = image_bytes(56, 84, 7)  # 56x84 -> grid (1, 6, 4) -> 6 image tokens
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image"}]}]
    ids, images = asyncio.run(chat_prompt(tok, msgs, [img], LIMITS))
    assert list(images[0].grid_thw) == [1, 6, 4] and len(images[0].hash) == 64
    assert ids.count(tok.vision.image_token_id) == 6
    bad(chat_prompt, tok, msgs, [img] * 3, LIMITS, match="at most 2")
    # NOTE: within the pixel limit, but past the processor's aspect ratio (200): its
    # ValueError was a 500 internal_error
    bad(chat_prompt, tok, msgs, [image_bytes(1, 300, 8)], LIMITS, match="aspect ratio")
    bad(chat_prompt, TextTokenizer(), msgs, [img], LIMITS, match="does not accept images")
