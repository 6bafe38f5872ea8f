"""Chained block hashes, the prefix-cache key shared by the engine and the router (torch-free).

A full block is identified by hash(parent block's hash, the block's tokens), so equal hashes
mean equal prefixes up to and including the block. The chain starts at ``ROOT_HASH`` for a
text prompt and at ``image_hash_root`` of its images for a prompt with images. The router
(services/router/routing/kv_index.py) imports this module alone: it must never pull in torch.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

# Seed of every hash chain; it changes when the hashing scheme changes.
ROOT_HASH = 0x6570647365727665  # "epdserve"


def hash_block(parent_hash: int, token_ids: list[int] | tuple[int, ...]) -> int:
    """Chained 64-bit hash of one full block. Stable across processes and machines
    (unlike Python's ``hash``), so the router can compute the same values."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<Q", parent_hash))
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    return int.from_bytes(h.digest(), "little")


def hash_prompt_blocks(token_ids: list[int], block_size: int, root: int = ROOT_HASH) -> list[int]:
    """Chained hashes of every full block of ``token_ids``, from ``root`` (the block
    manager's ``chain_root``; a prompt with images: ``image_hash_root``)."""
    hashes: list[int] = []
    parent = root
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


def image_hash_root(hashes: Sequence[str]) -> int:
    """Seed of the block-hash chain of a prompt with images named by ``hashes`` (sha256
    hex digests, in prompt order): the images' pad tokens alone do not say which image
    they stand for. NOTE: the engine (multimodal.build_state) and the router (kv_index.py)
    both seed their chains with this one function."""
    words = [int(h[i : i + 8], 16) & 0x7FFFFFFF for h in hashes for i in range(0, 64, 8)]
    return hash_block(ROOT_HASH, words)


def adapter_hash_root(root: int, adapter: str) -> int:
    """Seed of the hash chain of a prompt run with LoRA adapter ``adapter`` (its id), from
    the chain's seed without one: the same tokens under another adapter have other KV.
    NOTE: -1 is no token id, so this never equals a block's hash."""
    return hash_block(root, [-1, *adapter.encode()])
