"""Images before they become tensors: decoding them, the image processor, patch grids and
prompt placeholders (torch-free: the router sizes images and expands placeholders with it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def load_image_processor(model_path: str | None = None) -> Any:
    """The PIL Qwen2-VL image processor (torchvision is not needed), configured from the
    model folder's ``preprocessor_config.json`` when it has one, else the defaults."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    if model_path is not None:
        try:
            return Qwen2VLImageProcessorPil.from_pretrained(model_path)
        except OSError:  # no preprocessor_config.json
            pass
    return Qwen2VLImageProcessorPil()


def open_images(data: Sequence[bytes]) -> list[Any]:
    """Encoded images (PNG, JPEG, ...) as RGB PIL images; ValueError for bytes PIL cannot
    read (the router checked them, but a worker does not trust its callers)."""
    import io

    from PIL import Image

    out = []
    for i, raw in enumerate(data):
        try:
            with Image.open(io.BytesIO(raw)) as img:
                out.append(img.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ValueError(f"image {i} could not be decoded: {exc}") from None
    return out


def image_grid(processor: Any, width: int, height: int) -> tuple[int, int, int]:
    """The (t, h, w) patch grid the processor gives an image of this size, from its size
    alone (no pixels touched): what the router needs to expand placeholders."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    patch, merge = int(processor.patch_size), int(processor.merge_size)
    h, w = smart_resize(
        height, width, factor=patch * merge,
        min_pixels=int(processor.size["shortest_edge"]),
        max_pixels=int(processor.size["longest_edge"]),
    )  # fmt: skip
    return 1, h // patch, w // patch


def expand_image_placeholders(
    token_ids: Sequence[int], image_token_id: int, tokens_per_image: Sequence[int]
) -> list[int]:
    """Replace the i-th single image-pad token with ``tokens_per_image[i]`` copies.

    A prompt whose pad runs already have the expanded lengths (e.g. from the HF processor)
    is returned unchanged.
    """
    runs = _runs(token_ids, image_token_id)
    if [end - start for start, end in runs] == list(tokens_per_image):
        return list(token_ids)
    if len(runs) != len(tokens_per_image) or any(end - start != 1 for start, end in runs):
        raise ValueError(
            f"prompt has {len(runs)} image placeholders for {len(tokens_per_image)} images"
        )
    out: list[int] = []
    prev = 0
    for (start, _), n in zip(runs, tokens_per_image, strict=True):
        out.extend(token_ids[prev:start])
        out.extend([image_token_id] * n)
        prev = start + 1
    out.extend(token_ids[prev:])
    return out


def _runs(token_ids: Sequence[int], tok: int) -> list[tuple[int, int]]:
    runs = []
    i = 0
    while i < len(token_ids):
        if token_ids[i] == tok:
            j = i
            while j < len(token_ids) and token_ids[j] == tok:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs
