"""The end-of-run table (vLLM's layout) and the full result as JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import UTC, datetime
from typing import Any

from services.bench.config import BenchConfig
from services.bench.messages import RequestResult
from services.bench.metrics import BenchMetrics, Summary

_WIDTH = 50
_MAX_ERRORS_SHOWN = 5


def _row(label: str, value: object) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label:<40}{text:>10}"


def _section(title: str) -> str:
    return f"{title:-^{_WIDTH}}"


def _latency_rows(name: str, s: Summary) -> list[str]:
    return [
        _row(f"Mean {name} (ms):", s.mean),
        _row(f"Median {name} (ms):", s.median),
        _row(f"P90 {name} (ms):", s.p90),
        _row(f"P99 {name} (ms):", s.p99),
    ]


def format_table(cfg: BenchConfig, model: str, m: BenchMetrics) -> str:
    rate = "inf" if math.isinf(cfg.request_rate) else f"{cfg.request_rate:g}"
    lines = [
        f"{' Serving Benchmark Result ':=^{_WIDTH}}",
        _row("Model:", model),
        _row("Endpoint:", cfg.endpoint),
        _row("Dataset:", cfg.dataset),
        _row("Request rate (req/s):", rate),
        _row("Burstiness:", f"{cfg.burstiness:g}"),
        _row("Max concurrency:", cfg.max_concurrency or "none"),
        _row("Successful requests:", m.completed),
        _row("Failed requests:", m.failed),
        _row("Benchmark duration (s):", m.duration_s),
        _row("Total input tokens:", m.total_input_tokens),
        _row("Total generated tokens:", m.total_output_tokens),
        _row("Request throughput (req/s):", m.request_throughput),
    ]
    if m.request_goodput is not None:
        slos = " ".join(f"{k}:{v:g}" for k, v in cfg.slos.items())
        lines += [
            _row("Goodput SLOs (ms):", slos),
            _row("Request goodput (req/s):", m.request_goodput),
        ]
    lines += [
        _row("Output token throughput (tok/s):", m.output_throughput),
        _row("Total token throughput (tok/s):", m.total_token_throughput),
        _row("Peak concurrent requests:", m.max_concurrent),
        *(
            [_row("Prefix-cached input tokens:", m.total_cached_tokens)]
            if m.total_cached_tokens is not None
            else []
        ),
        _section("Time to First Token"),
        *_latency_rows("TTFT", m.ttft_ms),
        _section("Time per Output Token (excl. 1st token)"),
        *_latency_rows("TPOT", m.tpot_ms),
        _section("Inter-token Latency"),
        *_latency_rows("ITL", m.itl_ms),
        _section("End-to-end Latency"),
        *_latency_rows("E2EL", m.e2el_ms),
    ]
    if m.errors:
        lines.append(_section("Errors"))
        for text, count in list(m.errors.items())[:_MAX_ERRORS_SHOWN]:
            lines.append(f"{count} x {text[:200]}")
    lines.append("=" * _WIDTH)
    return "\n".join(lines)


def result_dict(
    cfg: BenchConfig, model: str, m: BenchMetrics, results: list[RequestResult], t0: float = 0.0
) -> dict[str, Any]:
    """Config, vLLM-style flat metrics, and every request (seconds; ``start`` from ``t0``)."""
    config = dataclasses.asdict(cfg)
    config["request_rate"] = "inf" if math.isinf(cfg.request_rate) else cfg.request_rate
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model_id": model,
        "config": config,
        **m.flat(),
        "requests": [
            {
                "success": r.success,
                "error": r.error,
                "prompt_len": r.prompt_len,
                "server_prompt_tokens": r.server_prompt_tokens,
                "cached_tokens": r.cached_tokens,
                "expected_output_len": r.expected_output_len,
                "output_tokens": r.output_tokens,
                "usage_reported": r.usage_reported,
                "chunks": r.chunks,
                "start": r.start - t0,
                "ttft": r.ttft,
                "latency": r.latency,
                "tpot": r.tpot,
                "itl": r.itl,
                "generated_text": r.generated_text,
            }
            for r in results
        ],
    }


def write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
