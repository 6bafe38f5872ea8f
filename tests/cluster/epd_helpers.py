"""Helpers of the EPD cluster tests (test_epd*.py): a tiny random Qwen2-VL cluster's
settings, chats with images through the OpenAI and Anthropic APIs, the offline engine's
greedy output of the same chats, and the workers' image metrics."""

from __future__ import annotations

import base64
import re
import time

import httpx
from cluster_helpers import TINY_NAME, start_cluster

from tests.conftest import image_bytes as png
from tests.deps import MOONCAKE, PIL, require

# Before the images below are drawn: a test module importing this skips without them.
require("mooncake.engine", MOONCAKE)
require("PIL", PIL)

MAX_TOKENS = 8
ENGINE = {"max_model_len": 512, "kv_cache_bytes": 16 * 1024 * 1024, "max_num_seqs": 16}
ROUTER = {"max_images": 3, "max_image_bytes": 300_000, "allow_private_image_urls": True}
# A short embedding-read deadline: an encoder killed mid-test must not stall a prefill long.
WORKER = {"kv_transfer_timeout_s": 10.0}


IMAGES = [png(56, 84, 1), png(112, 112, 2), png(70, 40, 3, "JPEG")]


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def openai_messages(images: list[bytes], text: str = "Describe") -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": text}]
    for img in images:
        media = "image/jpeg" if img[:2] == b"\xff\xd8" else "image/png"
        parts.append({"type": "image_url", "image_url": {"url": data_url(img, media)}})
    return [{"role": "user", "content": parts}]


def chat(url: str, images: list[bytes], text: str = "Describe", **extra) -> httpx.Response:
    body = {"model": TINY_NAME, "messages": openai_messages(images, text),
            "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, **extra}  # fmt: skip
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def chat_text(url: str, images: list[bytes], text: str = "Describe") -> str:
    r = chat(url, images, text)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def anthropic_text(url: str, images: list[bytes], text: str = "Describe") -> str:
    blocks: list[dict] = [{"type": "text", "text": text}]
    for img in images:
        blocks.append({"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": base64.b64encode(img).decode(),
        }})  # fmt: skip
    r = httpx.post(
        url + "/v1/messages",
        json={"model": TINY_NAME, "max_tokens": MAX_TOKENS, "temperature": 0,
              "messages": [{"role": "user", "content": blocks}]},
        timeout=120,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["content"][0]["text"]


CASES = [([IMAGES[0]], "Describe"), ([IMAGES[1], IMAGES[2]], "Compare these"), ([], "Hello")]


def offline_outputs(model_dir) -> dict[int, str]:
    """Greedy text of each case from the offline engine (PIL images, pixel path)."""
    from services.engine import LLM, SamplingParams
    from services.engine.image_processing import open_images
    from services.router.features.images import VisionSpec
    from services.router.tokenization import Tokenizer

    tok = Tokenizer.load(str(model_dir))
    assert isinstance(tok.vision, VisionSpec)
    llm = LLM(str(model_dir), dtype="float32", kv_cache_bytes=1 << 24)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = {}
    for i, (images, text) in enumerate(CASES):
        parts = [{"type": "text", "text": text}] + [{"type": "image"} for _ in images]
        ids = tok.apply_chat_template([{"role": "user", "content": parts if images else text}])
        prompt: dict = {"prompt_token_ids": ids}
        if images:
            prompt["multi_modal_data"] = {"image": open_images(images)}
        out[i] = llm.generate(prompt, params)[0].outputs[0].text
    return out


def cluster(model_dir, router: dict | None = None, worker: dict | None = None, **spec):
    return start_cluster(
        model_dir, engine_overrides=ENGINE, router_overrides={**ROUTER, **(router or {})},
        worker_overrides={**WORKER, **(worker or {})}, **spec,
    )  # fmt: skip


def check_outputs(url: str, reference: dict[int, str]) -> None:
    for i, (images, text) in enumerate(CASES):
        assert chat_text(url, images, text) == reference[i], f"case {i}"
    assert anthropic_text(url, CASES[0][0], CASES[0][1]) == reference[0]


def metric(port: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(_total)?\{{([^}}]*)\}} (\S+)$", line)
        if m and labels in m.group(2):
            total += float(m.group(3))
    return total


def workers_of(c, role: str):
    return [w for w, r in zip(c.workers, c.worker_roles(), strict=True) if r == role]


def wait_encoders(c, n: int, timeout: float = 60.0) -> None:
    """Until the router has load reports from ``n`` serving encoders (admin status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(c.base_url + "/admin/status", timeout=10,
                      headers={"Authorization": f"Bearer {c.admin_token}"})  # fmt: skip
        workers = r.json().get("workers", []) if r.status_code == 200 else []
        if sum(1 for w in workers if w["role"] == "encode" and w["state"] == "serving") >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"router did not see {n} usable encoders: {r.text}")


def encoder_totals(c, name: str) -> float:
    return sum(metric(w.ready_field("metrics_port"), name) for w in workers_of(c, "encode"))


def check_epd(c, reference: dict[int, str], encoders: int) -> None:
    """Offline outputs from an E+P+D cluster, every image's embeddings read from an
    encoder by a prefill worker."""
    wait_encoders(c, encoders)
    check_outputs(c.base_url, reference)
    ports = [w.ready_field("metrics_port") for w in workers_of(c, "prefill")]
    assert sum(metric(p, "epdserve:image_embeddings", 'source="fetched"') for p in ports) >= 3
    assert sum(metric(p, "epdserve:image_embeddings", 'source="local"') for p in ports) == 0


def set_role(c, worker_id: str, role: str) -> None:
    """Through the admin API, then until the router sees the worker serving in ``role``."""
    auth = {"Authorization": f"Bearer {c.admin_token}"}
    r = httpx.post(f"{c.base_url}/admin/workers/{worker_id}/role", json={"role": role},
                   headers=auth, timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = httpx.get(c.base_url + "/admin/status", headers=auth, timeout=10).json()
        w = next(w for w in workers["workers"] if w["id"] == worker_id)
        if w["role"] == role and w["state"] == "serving":
            return
        time.sleep(0.2)
    raise AssertionError(f"{worker_id} did not become {role}: {w}")
