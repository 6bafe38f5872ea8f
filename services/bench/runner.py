"""One benchmark run: find the model, build prompts, send them on schedule, summarize."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, TextIO

import httpx
import numpy as np

from services.bench.arrivals import dispatch, gamma_gaps
from services.bench.client import first_model, send_request
from services.bench.config import BenchConfig
from services.bench.datasets import build_dataset
from services.bench.messages import RequestResult, SampleRequest
from services.bench.metrics import BenchMetrics, compute_metrics
from services.bench.progress import Progress

_CONNECT_TIMEOUT_S = 30.0


@dataclass
class BenchRun:
    """Everything a run produced."""

    model: str  # the model name that was sent
    metrics: BenchMetrics
    results: list[RequestResult]  # in dataset order
    t0: float  # perf_counter() when the first timed request left


def load_tokenizer(path: str | None) -> Any:
    """``AutoTokenizer`` of ``path``, or of the embedded default model's converted folder."""
    from transformers import AutoTokenizer

    if path is None:
        from services.engine.model_loader import resolve_model

        path = resolve_model(None)
    return AutoTokenizer.from_pretrained(path)


def make_client(
    cfg: BenchConfig, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """One connection per request that may be in flight, so that none waits in the pool.
    ``trust_env=False``: no proxy from the environment, only ``--base-url`` is contacted."""
    conns = (cfg.max_concurrency or cfg.num_prompts) + 1
    return httpx.AsyncClient(
        timeout=httpx.Timeout(cfg.timeout_s, connect=min(_CONNECT_TIMEOUT_S, cfg.timeout_s)),
        limits=httpx.Limits(max_connections=conns, max_keepalive_connections=conns),
        trust_env=False,
        transport=transport,
    )


async def run_benchmark(
    cfg: BenchConfig,
    tokenizer: Any = None,
    samples: list[SampleRequest] | None = None,
    progress_stream: TextIO | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> BenchRun:
    """Run ``cfg``; ``tokenizer``/``samples`` may be given to skip loading/building them,
    ``transport`` replaces the network (tests). Raises ``RuntimeError`` if the warm-up
    request fails (nothing is timed then)."""
    async with make_client(cfg, transport) as client:
        model = cfg.model or await first_model(client, cfg.root_url)
        if samples is None:
            samples = build_dataset(cfg, tokenizer or load_tokenizer(cfg.tokenizer))
        if cfg.warmup:
            probe = await send_request(client, cfg, model, samples[0])
            if not probe.success:
                raise RuntimeError(f"warm-up request to {cfg.url} failed: {probe.error}")
        gaps = gamma_gaps(
            len(samples), cfg.request_rate, cfg.burstiness, np.random.default_rng([cfg.seed, 2])
        )
        bar = Progress(len(samples), cfg.progress, progress_stream)

        async def send(req: SampleRequest) -> RequestResult:
            result = await send_request(client, cfg, model, req)
            bar.update(result.success)
            return result

        t0 = time.perf_counter()
        results = await dispatch(samples, gaps, send, cfg.max_concurrency)
        duration = time.perf_counter() - t0
        bar.close()
    return BenchRun(model, compute_metrics(results, duration, cfg.slos), results, t0)
