"""Image inputs of vision-language prompts as tensors: pixels, embeddings, M-RoPE positions
(decoding, grids and placeholder expansion come before, torch-free, in image_processing.py).

A prompt names each image with one ``<|image_pad|>`` token (as the chat template writes it);
the engine expands it to ``t * h * w / merge**2`` pad tokens, one per vision embedding, and
the language model takes the embeddings in place of the pad tokens' word embeddings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from services.engine.block_hash import image_hash_root
from services.engine.image_processing import expand_image_placeholders, load_image_processor


@dataclass
class ImageInputs:
    """The images of one prompt: processed pixels, or embeddings an encoder computed.

    A served request names each image by a content hash of its encoded bytes
    (``content_hashes``), the same whichever worker encodes it, so prefix-cache hashes agree
    between the pixel path (EP+D, mixed), the embedding path (E+P+D) and a PD decode worker,
    which has neither pixels nor embeddings.
    """

    # [num_patches, C * T * P * P] float32, from the model's image processor; None when the
    # embeddings were computed elsewhere.
    pixel_values: torch.Tensor | None
    # [num_images, 3] (t, h, w) patch grid of each image, before merging.
    image_grid_thw: torch.Tensor
    # [num_pad_tokens, hidden] vision embeddings of all images in order (an encoder's output).
    embeds: torch.Tensor | None = None
    # One sha256 hex digest per image given by the caller; None: hash the pixels.
    content_hashes: list[str] | None = None

    def tokens_per_image(self, merge: int) -> list[int]:
        return [int(t * h * w) // merge**2 for t, h, w in self.image_grid_thw.tolist()]

    def hashes(self) -> list[str]:
        """A content hash per image (the caller's, else of pixels and grid), for cache keys;
        equal placeholder tokens of different images must never share cached KV blocks."""
        if self.content_hashes is not None:
            return list(self.content_hashes)
        if self.pixel_values is None:
            raise ValueError("images without pixel values need content hashes")
        out = []
        offset = 0
        for t, h, w in self.image_grid_thw.tolist():
            n = int(t * h * w)
            patch = self.pixel_values[offset : offset + n].contiguous().float()
            offset += n
            digest = hashlib.sha256(f"{t},{h},{w};".encode())
            digest.update(patch.numpy().tobytes())
            out.append(digest.hexdigest())
        return out


def preprocess_images(
    images: Sequence[Any], processor: Any | None = None, hashes: list[str] | None = None
) -> ImageInputs:
    """Pixels and grids of PIL images; ``hashes`` names them (see ``ImageInputs``)."""
    processor = processor or load_image_processor()
    out = processor(images=list(images), return_tensors="pt")
    return ImageInputs(
        out["pixel_values"].float(), out["image_grid_thw"].long(), content_hashes=hashes
    )


def merge_embeddings(
    inputs_embeds: torch.Tensor,
    token_ids: torch.Tensor,
    image_token_id: int,
    image_embeds: torch.Tensor,
    start: int,
    prompt_token_ids: Sequence[int],
) -> torch.Tensor:
    """Put image embeddings in place of the pad tokens of one prefill chunk.

    ``token_ids``/``inputs_embeds`` are the chunk ``[start, start + len)`` of a prompt whose
    full token list is ``prompt_token_ids``; ``image_embeds`` holds the rows of all the
    prompt's pad tokens in order, so the chunk takes the rows after the pads before ``start``.
    """
    mask = token_ids == image_token_id
    n = int(mask.sum())
    if n == 0:
        return inputs_embeds
    before = sum(1 for t in prompt_token_ids[:start] if t == image_token_id)
    rows = image_embeds[before : before + n]
    if rows.shape[0] != n:
        raise ValueError(f"{n} image-pad tokens in the chunk but {rows.shape[0]} embeddings left")
    out = inputs_embeds.clone()
    out[mask] = rows.to(out.dtype)
    return out


# ---- engine integration ---------------------------------------------------------------------


@dataclass
class MultiModalState:
    """What a sequence with images carries through the engine (shared by its n completions)."""

    images: ImageInputs
    # [3, num_prompt_tokens] M-RoPE positions of the (expanded) prompt.
    positions: torch.Tensor
    # Position of the token at index i >= num_prompt_tokens is i + delta on every axis.
    delta: int
    # Seed of the sequence's block-hash chain: mixes the image hashes in, so equal pad tokens
    # of different images never share prefix-cache blocks.
    hash_root: int
    # [num_pad_tokens, hidden] vision embeddings: given (an encoder's) or computed at the
    # first prefill step.
    embeds: torch.Tensor | None = None

    def positions_of(self, start: int, end: int) -> torch.Tensor:
        """[3, end - start] positions of tokens ``[start, end)`` (prompt or generated)."""
        n = self.positions.shape[1]
        head = self.positions[:, start : min(end, n)]
        tail = torch.arange(max(start, n), max(end, n), dtype=torch.long) + self.delta
        return torch.cat([head, tail.expand(3, -1)], dim=1)


def parse_prompt(
    prompt: Any, processor: Any | None = None
) -> tuple[str | list[int], ImageInputs | None]:
    """A vLLM-style prompt: a string, token ids, or a dict with ``prompt`` or
    ``prompt_token_ids`` and optional ``multi_modal_data``: ``{"image": [PIL.Image, ...]}``,
    precomputed ``{"pixel_values": ..., "image_grid_thw": ...}`` or vision embeddings
    ``{"image_embeds": [num_pad_tokens, hidden], "image_grid_thw": ...}``; any of them with
    ``"image_hashes"`` (one string per image) names the images for the prefix cache.
    PIL images are processed by ``processor`` (the model's; default: the defaults')."""
    if not isinstance(prompt, dict):
        return prompt, None
    if "prompt_token_ids" in prompt:
        text: str | list[int] = list(prompt["prompt_token_ids"])
    elif "prompt" in prompt:
        text = prompt["prompt"]
    else:
        raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
    mm = prompt.get("multi_modal_data") or {}
    unknown = set(mm) - {"image", "pixel_values", "image_embeds", "image_grid_thw", "image_hashes"}
    if unknown:
        raise ValueError(f"unsupported multi_modal_data keys {sorted(unknown)}")
    hashes = mm.get("image_hashes")
    for key in ("pixel_values", "image_embeds"):
        if key in mm:
            if "image_grid_thw" not in mm:
                raise ValueError(f"{key} needs image_grid_thw")
            grid = torch.as_tensor(mm["image_grid_thw"]).long().reshape(-1, 3)
            if hashes is not None and len(hashes) != grid.shape[0]:
                raise ValueError(f"{len(hashes)} image_hashes for {grid.shape[0]} images")
            value = torch.as_tensor(mm[key]).float()
            if key == "pixel_values":
                return text, ImageInputs(value, grid, content_hashes=hashes)
            return text, ImageInputs(None, grid, embeds=value, content_hashes=hashes)
    if "image" in mm:
        imgs = mm["image"]
        imgs = imgs if isinstance(imgs, list | tuple) else [imgs]
        return text, preprocess_images(imgs, processor, hashes) if imgs else None
    return text, None


def build_state(
    token_ids: list[int], images: ImageInputs, image_token_id: int, merge: int
) -> tuple[list[int], MultiModalState]:
    """Expand the prompt's placeholders; compute M-RoPE positions and the hash root."""
    from services.engine.layers.mrope import mrope_positions

    ids = expand_image_placeholders(token_ids, image_token_id, images.tokens_per_image(merge))
    positions, delta = mrope_positions(ids, image_token_id, images.image_grid_thw.tolist(), merge)
    pads = sum(images.tokens_per_image(merge))
    if images.embeds is not None and images.embeds.shape[0] != pads:
        raise ValueError(f"{images.embeds.shape[0]} image embeddings for {pads} image-pad tokens")
    root = image_hash_root(images.hashes())
    return ids, MultiModalState(images, positions, delta, root, embeds=images.embeds)


def decode_mrope_positions(decodes: list[Any]) -> torch.Tensor:
    """M-RoPE positions ``[3, len(decodes)]`` (CPU) of one decode token per sequence."""
    pos = []
    for s in decodes:
        p = s.seq.num_computed_tokens
        mm = s.seq.mm
        pos.append(mm.positions_of(p, p + 1) if mm else torch.full((3, 1), p, dtype=torch.long))
    return torch.cat(pos, dim=1)


def prepare_batch(
    model: Any,
    decodes: list[Any],
    prefills: list[Any],
    input_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE positions ``[3, T]`` and input embeddings ``[T, H]`` of a flattened batch laid
    out as ``ModelRunner.execute`` lays it out (decodes, then prefill chunks); ``decodes`` and
    ``prefills`` are its ``ScheduledSeq`` lists."""
    pos: list[torch.Tensor] = [decode_mrope_positions(decodes)] if decodes else []
    embeds = model.model.embed_tokens(input_ids)
    offset = len(decodes)
    for s in prefills:
        start, n = s.seq.num_computed_tokens, s.num_new_tokens
        mm = s.seq.mm
        if mm is None:
            pos.append(torch.arange(start, start + n).expand(3, -1))
        else:
            pos.append(mm.positions_of(start, start + n))
            # Only prompt tokens are image pads (a recomputed chunk may run past the prompt).
            m = max(0, min(n, s.seq.num_prompt_tokens - start))
            chunk = slice(offset, offset + m)
            if bool((input_ids[chunk] == model.image_token_id).any()):  # else: text only
                embeds[chunk] = merge_embeddings(
                    embeds[chunk],
                    input_ids[chunk],
                    model.image_token_id,
                    _image_embeds(model, mm).to(embeds.device),
                    start,
                    s.seq.prompt_token_ids,
                )
        offset += n
    return torch.cat(pos, dim=1).to(input_ids.device), embeds


def _image_embeds(model: Any, mm: MultiModalState) -> torch.Tensor:
    """The prompt's vision embeddings, computed by the tower at first need."""
    if mm.embeds is None:
        if mm.images.pixel_values is None:
            # NOTE: a PD decode worker has neither; it recomputes prompt tokens only after a
            # preemption, and then only where its cached blocks fall short.
            raise RuntimeError("image embeddings of a recomputed prompt are unavailable")
        mm.embeds = model.encode_images(mm.images.pixel_values, mm.images.image_grid_thw)
    return mm.embeds
