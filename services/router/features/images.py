"""Images of chat requests at the router: fetch (``data:`` and ``http(s)`` URLs), decode,
check the limits, size the patch grid, and name each image by a content hash.

The router decodes only what it must to refuse bad input early and to expand the image
placeholders (the image's size gives its grid); the pixels are processed by whichever
worker encodes the image (an encoder, or the prefill / mixed worker itself).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from services.common.proto import worker_pb2 as pb
from services.router.errors import APIError, bad_request
from services.router.offload import Offload, text_size

log = logging.getLogger(__name__)

# PIL format names the image processor is known to read.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MEDIA_TYPES = {f"image/{f.lower()}": f for f in FORMATS} | {"image/jpg": "JPEG"}


@dataclass(frozen=True)
class ImageLimits:
    """The router's limits on request images (RouterConfig's ``max_image*`` fields)."""

    max_images: int = 8  # images per request
    max_bytes: int = 8 * 1024 * 1024  # encoded bytes of one image
    max_pixels: int = 4096 * 4096  # width * height of one image (before resizing)
    fetch_timeout_s: float = 10.0  # whole fetch of one http(s) image
    allow_private: bool = False  # http(s) URLs may resolve to private/loopback/link-local


@dataclass(frozen=True)
class VisionSpec:
    """What the router needs of a vision-language model to expand image placeholders."""

    image_token_id: int
    processor: Any  # the model's image processor (sizes only, see image_processing.image_grid)

    @property
    def merge(self) -> int:
        return int(self.processor.merge_size)

    @classmethod
    def load(cls, model_dir: str) -> VisionSpec | None:
        """None for a text-only model (no ``image_token_id`` in its config)."""
        import json
        from pathlib import Path

        path = Path(model_dir) / "config.json"
        if not path.exists():
            return None
        cfg = json.loads(path.read_text())
        if "image_token_id" not in cfg or "vision_config" not in cfg:
            return None
        from services.engine.image_processing import load_image_processor

        return cls(int(cfg["image_token_id"]), load_image_processor(model_dir))


def _bad(message: str, param: str) -> APIError:
    return bad_request(message, param=param, code="invalid_image")


def decode_data_url(url: str, param: str) -> bytes:
    """The bytes of a base64 ``data:image/...;base64,`` URL."""
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise _bad("image data URLs must be base64: data:image/<type>;base64,...", param)
    media = head[len("data:") : -len(";base64")].lower()
    if media and media not in MEDIA_TYPES:
        raise _bad(f"unsupported image type {media!r}; supported: {sorted(MEDIA_TYPES)}", param)
    return decode_base64(payload, param)


def decode_base64(payload: str, param: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("image data is not valid base64", param) from None


async def _check_host(
    host: str, port: int, allow_private: bool, timeout_s: float, param: str
) -> None:
    """Refuse hosts that resolve to a private, loopback, link-local or otherwise reserved
    address (a request must not make the router reach into its own network)."""
    try:
        async with asyncio.timeout(timeout_s):
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
    except TimeoutError:
        raise _bad(f"resolving image host {host!r} took longer than {timeout_s}s", param) from None
    except OSError as exc:
        raise _bad(f"cannot resolve image host {host!r}: {exc}", param) from None
    if allow_private:
        return
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if not addr.is_global or addr.is_multicast:
            raise _bad(
                f"image URL host {host!r} resolves to a non-public address ({addr}); "
                "refused (see --allow-private-image-urls)",
                param,
            )


async def fetch_url(url: str, limits: ImageLimits, param: str) -> bytes:
    """GET an http(s) image with a timeout and a byte cap; redirects are not followed (they
    could lead to an address the check above refuses)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _bad("image_url must be a data: URL or an http(s) URL", param)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    # NOTE: a DNS answer may change between this check and the connection; a deployment
    # that must rule that out puts the router behind an egress proxy.
    await _check_host(parts.hostname, port, limits.allow_private, limits.fetch_timeout_s, param)
    try:
        async with asyncio.timeout(limits.fetch_timeout_s):
            async with (
                httpx.AsyncClient(timeout=limits.fetch_timeout_s, trust_env=False) as client,
                client.stream("GET", url) as resp,
            ):
                if resp.status_code != 200:
                    raise _bad(f"fetching the image gave HTTP {resp.status_code}", param)
                chunks, size = [], 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > limits.max_bytes:
                        raise _bad(f"image exceeds the limit of {limits.max_bytes} bytes", param)
                    chunks.append(chunk)
                return b"".join(chunks)
    except TimeoutError:
        raise _bad(
            f"fetching the image took longer than {limits.fetch_timeout_s}s", param
        ) from None
    except httpx.HTTPError as exc:
        raise _bad(f"could not fetch the image: {exc}", param) from None


def check_image(data: bytes, limits: ImageLimits, param: str) -> tuple[int, int]:
    """(width, height) of a well-formed image of a supported type within the limits."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise _bad("image is empty", param)
    if len(data) > limits.max_bytes:
        raise _bad(f"image exceeds the limit of {limits.max_bytes} bytes", param)
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = img.format, img.size
            if fmt not in FORMATS:
                raise _bad(f"unsupported image type {fmt}; supported: {', '.join(FORMATS)}", param)
            # NOTE: the size comes from the header: check it before decoding any pixels.
            if width * height > limits.max_pixels:
                raise _bad(
                    f"image is {width}x{height} pixels; the limit is {limits.max_pixels}", param
                )
            img.load()  # truncated or corrupt pixel data fails here
    except Image.DecompressionBombError:
        raise _bad(f"image has more than the limit of {limits.max_pixels} pixels", param) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _bad(f"image could not be decoded: {exc}", param) from None
    return width, height


async def load_image(
    source: str | bytes, spec: VisionSpec, limits: ImageLimits, param: str
) -> pb.ImageData:
    """An image from a URL (data: or http(s)) or raw bytes, checked and sized."""
    from services.engine.image_processing import image_grid

    if isinstance(source, bytes):
        data = source
    elif source.startswith("data:"):
        data = decode_data_url(source, param)
    else:
        data = await fetch_url(source, limits, param)
    width, height = await asyncio.to_thread(check_image, data, limits, param)
    try:
        grid = image_grid(spec.processor, width, height)
    except ValueError as exc:  # the processor's own bounds (an aspect ratio past 200): was a 500
        raise _bad(f"image of {width}x{height} pixels cannot be processed: {exc}", param) from None
    return pb.ImageData(hash=hashlib.sha256(data).hexdigest(), data=data, grid_thw=grid)


def expand_placeholders(ids: list[int], spec: VisionSpec, images: list[pb.ImageData]) -> list[int]:
    """The templated prompt with each image's single pad token repeated once per embedding."""
    from services.engine.image_processing import expand_image_placeholders

    per_image = [int(t * h * w) // spec.merge**2 for t, h, w in (i.grid_thw for i in images)]
    try:
        return expand_image_placeholders(ids, spec.image_token_id, per_image)
    except ValueError as exc:
        raise bad_request(f"image placeholders do not match the images: {exc}") from None


async def chat_prompt(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    sources: list[str | bytes],
    limits: ImageLimits,
    param: str = "messages",
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    offload: Offload | None = None,
    variables: dict[str, Any] | None = None,
) -> tuple[list[int], list[pb.ImageData]]:
    """Token ids of a chat (placeholders expanded) and its images, fetched and checked in
    parallel; ``sources`` are the images in the order their parts appear in ``messages``;
    ``tools``, ``add_generation_prompt`` and the request's ``variables`` go to the chat
    template, which runs on ``offload``'s threads when given (else inline)."""

    async def render() -> list[int]:
        template = tokenizer.apply_chat_template
        kwargs = {
            **(variables or {}),
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
        }
        if offload is None:
            return template(messages, **kwargs)  # type: ignore[no-any-return]
        return await offload.run(text_size(messages, tools), template, messages, **kwargs)

    if not sources:
        return await render(), []
    spec: VisionSpec | None = tokenizer.vision
    if spec is None:
        raise _bad("this model does not accept images", param)
    if len(sources) > limits.max_images:
        raise _bad(
            f"{len(sources)} images in the request; at most {limits.max_images} are accepted",
            param,
        )
    images = list(
        await asyncio.gather(
            *(load_image(s, spec, limits, f"{param} (image {i})") for i, s in enumerate(sources))
        )
    )
    return expand_placeholders(await render(), spec, images), images
