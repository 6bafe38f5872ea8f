"""The random-mm dataset: random prompts with random images on a fraction of them, sent as
OpenAI image_url data-URL parts."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest

from services.bench.client import build_payload
from services.bench.config import BenchConfig
from services.bench.datasets import build_dataset
from tests.deps import PIL, require

require("PIL", PIL)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


def cfg(**kw) -> BenchConfig:
    return BenchConfig(base_url="http://127.0.0.1:1", endpoint="chat", dataset="random-mm", **kw)


def test_images_on_a_fraction_of_requests(tokenizer) -> None:
    from PIL import Image

    c = cfg(num_prompts=40, input_len=16, output_len=4, image_size="40x24",
            images_per_request=2, image_fraction=0.5)  # fmt: skip
    reqs = build_dataset(c, tokenizer)
    with_images = [r for r in reqs if r.images]
    assert 10 <= len(with_images) <= 30 and all(len(r.images) == 2 for r in with_images)
    url = with_images[0].images[0]
    assert url.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.size == (40, 24)
    assert len({u for r in with_images for u in r.images}) == 2 * len(with_images)
    body = build_payload(c, "m", with_images[0])
    parts = body["messages"][0]["content"]
    assert parts[0] == {"type": "text", "text": with_images[0].prompt}
    assert [p["type"] for p in parts[1:]] == ["image_url", "image_url"]
    text_only = next(r for r in reqs if not r.images)
    assert build_payload(c, "m", text_only)["messages"][0]["content"] == text_only.prompt
    assert build_dataset(c, tokenizer)[0].images == reqs[0].images  # seeded


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"endpoint": "completions"}, "needs --endpoint chat"),
        ({"image_size": "448"}, "WIDTHxHEIGHT"),
        ({"image_size": "0x10"}, "WIDTHxHEIGHT"),
        ({"images_per_request": 0}, "images-per-request"),
        ({"image_fraction": 1.5}, "image-fraction"),
    ],
)
def test_bad_settings(kw, message) -> None:
    args = {"base_url": "http://127.0.0.1:1", "endpoint": "chat", "dataset": "random-mm", **kw}
    with pytest.raises(ValueError, match=message):
        BenchConfig(**args)
