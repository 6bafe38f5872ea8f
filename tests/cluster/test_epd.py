"""EPD with real processes on a tiny random Qwen2-VL: chats with images (OpenAI image_url
parts, Anthropic image blocks) give the offline engine's greedy output in mixed, EP+D and
E+P+D modes (E+P+D on a tiny Qwen2.5-VL too, whose repeated image prompts a cache-aware
router sends to the prefill worker holding them); a repeated image hits the encoder cache and skips the vision tower; the
prefill worker reads an encoder's embeddings through Mooncake; bad images are a 400 in
the API's format and the cluster keeps serving; an encoder killed under load costs no
request; the rebalancer moves a worker to encode under image-heavy load and back when the
encoders idle and decode needs it."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from cluster_helpers import (
    TINY_NAME,
    cli,
    etcd_get,
    flips,
    kv_holders,
    start_cluster,
    wait_for,
    workers,
)

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


@pytest.fixture(scope="module")
def reference(tiny_vl_model_dir) -> dict[int, str]:
    return offline_outputs(tiny_vl_model_dir)


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


# ---- mixed: the worker encodes; API errors ---------------------------------------------------


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

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(IMAGES[0])

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cat.png"
        body = {"model": TINY_NAME, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "Describe"},
                    {"type": "image_url", "image_url": {"url": url}}]}]}  # fmt: skip
        r = httpx.post(mixed_cluster.base_url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == reference[0]
    finally:
        server.shutdown()


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


# ---- EP+D: the prefill worker encodes --------------------------------------------------------


def test_ep_d_mode_equals_offline_engine(tiny_vl_model_dir, reference):
    c = cluster(tiny_vl_model_dir, workers=0, prefill=1, decode=1)
    try:
        check_outputs(c.base_url, reference)
        (prefill,) = workers_of(c, "prefill")
        port = prefill.ready_field("metrics_port")
        assert metric(port, "epdserve:image_embeddings", 'source="local"') >= 3
        assert metric(port, "epdserve:image_embeddings", 'source="fetched"') == 0
    finally:
        c.stop()


# ---- E+P+D: encoders, embeddings handed over through Mooncake --------------------------------


@pytest.fixture(scope="module")
def epd_cluster(tiny_vl_model_dir):
    c = cluster(tiny_vl_model_dir, workers=0, prefill=1, decode=1, encode=2)
    yield c
    c.stop()


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


# ---- the rebalancer moves a VL worker to encode and back -----------------------------------

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


def test_rebalancer_moves_a_vl_worker_to_encode_and_back(tiny_vl_model_dir, reference):
    """E+P+D with one encoder, one prefill and two decode workers of a VL model, queue policy.
    Image-heavy load backlogs the encoder: the rebalancer moves a decode worker (the larger,
    unpressed side) to encode, the worker drains, flips and then serves Encode calls. Then,
    with the encoders idle and decode pressed (text-only load, a low decode band), an encoder
    goes back to decode. Every request succeeds with the undisturbed output."""
    params = ",".join(f"{k}={v:g}" for k, v in ENCODE_PARAMS.items())
    c = cluster(
        tiny_vl_model_dir, workers=0, prefill=1, decode=2, encode=1,
        router={"rebalance_policy": "queue", "rebalance_params": params,
                "rebalance_interval_s": 0.5, "rebalance_hysteresis_rounds": 2,
                "rebalance_cooldown_s": 3.0, "rebalance_max_flips": 10,
                "rebalance_flip_window_s": 60.0},
    )  # fmt: skip
    try:
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
        port = next(w for w in c.workers if w.ready_field("id") == moved).ready_field(
            "metrics_port"
        )
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
    finally:
        c.stop()


# ---- Qwen2.5-VL in E+P+D; cache-aware routing of image prompts -------------------------------
# (last in the module: its cluster then never runs beside the load tests above)


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
