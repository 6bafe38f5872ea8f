"""Prometheus metrics of images in a worker: the encoder cache and vision tower (encode
role), and where a prefill / mixed worker got each image's embeddings from."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

LABELS = ["model_name", "instance"]


class ImageMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str, instance: str) -> None:
        ids = (model_name, instance)
        self.cache_hits = Counter(
            "epdserve:encoder_cache_hits",
            "Images an encoder found in its encoder cache (the vision tower was skipped).",
            LABELS, registry=registry,
        ).labels(*ids)  # fmt: skip
        self.cache_misses = Counter(
            "epdserve:encoder_cache_misses",
            "Images an encoder did not find in its encoder cache.",
            LABELS, registry=registry,
        ).labels(*ids)  # fmt: skip
        self.tower_images = Counter(
            "epdserve:encoder_tower_images",
            "Images an encoder ran through the vision tower.",
            LABELS, registry=registry,
        ).labels(*ids)  # fmt: skip
        self.batch_images = Histogram(
            "epdserve:encoder_batch_images",
            "Images per vision-tower batch of an encoder.",
            LABELS, buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry,
        ).labels(*ids)  # fmt: skip
        embeddings = Counter(
            "epdserve:image_embeddings",
            "Images of prompts run by this prefill / mixed worker, by where their embeddings "
            "came from: fetched (an encoder's, read through Mooncake) or local (vision tower "
            "run here).",
            [*LABELS, "source"], registry=registry,
        )  # fmt: skip
        self.fetched = embeddings.labels(*ids, "fetched")
        self.local = embeddings.labels(*ids, "local")
