"""Helpers for the cluster tests: start a LocalCluster of real processes on free ports."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

from services.cli.launcher import ClusterSpec, LocalCluster

TINY_NAME = "tiny-llama"
# A small KV cache keeps worker start-up quick; the tiny model needs ~512 B per token.
TINY_ENGINE = {"max_model_len": 512, "kv_cache_bytes": 32 * 1024 * 1024, "max_num_seqs": 16}


def start_cluster(model_dir: Path | None, workers: int = 1, **spec: object) -> LocalCluster:
    """A running cluster (raises with the children's output if it does not come up)."""
    overrides = {**(TINY_ENGINE if model_dir else {}), **spec.pop("engine_overrides", {})}  # type: ignore[dict-item]
    cluster = LocalCluster(
        ClusterSpec(
            model=str(model_dir) if model_dir else None,
            served_model_name=TINY_NAME if model_dir else None,
            mixed=workers, port=0, cluster="test", lease_ttl=3,
            engine_overrides=overrides,
            **spec,  # type: ignore[arg-type]
        )  # fmt: skip
    )
    try:
        cluster.start(timeout=300, progress=lambda m: print(m, file=sys.stderr))
    except BaseException:
        cluster.stop()
        raise
    return cluster


def get_json(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
