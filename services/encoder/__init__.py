"""Encode role of a worker (EPD): the vision tower on batches of images, an encoder cache
keyed by image content hash, and the hand-off of embeddings to prefill workers by
reference through Mooncake (``cache.py`` holds them in registered memory, ``handoff.py``
reads them on the prefill side)."""
