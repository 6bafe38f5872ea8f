"""From per-request results to the benchmark's numbers (the definitions of vLLM's bench).

- TTFT: first non-empty chunk; TPOT: (E2EL - TTFT) / (output tokens - 1), over requests
  with at least 2 output tokens; ITL: every gap between non-empty chunks, pooled;
  E2EL: send to end of stream. Each as mean / median / std / p90 / p99 in milliseconds.
- Throughputs divide by the whole run's wall time. Goodput counts only successful
  requests meeting every given SLO (a one-token request has no TPOT and meets that SLO).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from services.bench.messages import RequestResult

PERCENTILES = (50, 90, 99)


@dataclass
class Summary:
    """One latency's distribution, in milliseconds (all 0 when there are no samples)."""

    mean: float = 0.0
    median: float = 0.0
    std: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    count: int = 0


def summarize(seconds: Sequence[float]) -> Summary:
    """Linear-interpolation percentiles (numpy's default, as vLLM and SGLang use)."""
    if len(seconds) == 0:
        return Summary()
    ms = np.asarray(seconds, dtype=float) * 1000.0
    p50, p90, p99 = np.percentile(ms, PERCENTILES).tolist()
    return Summary(float(ms.mean()), p50, float(ms.std()), p90, p99, int(ms.size))


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    if not r.success:
        return False
    tpot = r.tpot
    got = {"ttft": r.ttft, "tpot": 0.0 if tpot is None else tpot, "e2el": r.latency}
    return all(got[k] * 1000.0 <= limit for k, limit in slos.items())


def peak_concurrency(results: Sequence[RequestResult]) -> int:
    """Most requests in flight at once (sends and ends of all requests, ends first on ties)."""
    events = []
    for r in results:
        events += [(r.start, 1), (max(r.end, r.start), -1)]
    peak = cur = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        cur += step
        peak = max(peak, cur)
    return peak


@dataclass
class BenchMetrics:
    """The run's summary; ``*_throughput`` are per second of ``duration_s``."""

    duration_s: float
    completed: int
    failed: int
    total_input_tokens: int  # benchmark tokenizer's count, successful requests
    total_output_tokens: int  # server-reported usage.completion_tokens, successful requests
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    request_goodput: float | None  # None when no SLO was given
    max_concurrent: int  # peak requests in flight observed
    total_cached_tokens: int | None  # prompt tokens the server found in its prefix cache
    ttft_ms: Summary
    tpot_ms: Summary
    itl_ms: Summary
    e2el_ms: Summary
    errors: dict[str, int] = field(default_factory=dict)  # error text -> how many

    def flat(self) -> dict[str, object]:
        """vLLM's result-JSON keys: mean_ttft_ms, p99_itl_ms, ..."""
        d: dict[str, object] = {}
        for name, value in asdict(self).items():
            if name.endswith("_ms") and isinstance(value, dict):
                key = name[: -len("_ms")]
                for stat in ("mean", "median", "std", "p90", "p99"):
                    d[f"{stat}_{key}_ms"] = value[stat]
            else:
                d[name] = value
        return d


def compute_metrics(
    results: Sequence[RequestResult], duration_s: float, slos: dict[str, float] | None = None
) -> BenchMetrics:
    ok = [r for r in results if r.success]
    dur = max(duration_s, 1e-9)
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpots = [t for r in ok if (t := r.tpot) is not None]
    good = sum(meets_slos(r, slos) for r in ok) if slos else None
    return BenchMetrics(
        duration_s=duration_s,
        completed=len(ok),
        failed=len(results) - len(ok),
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / dur,
        output_throughput=total_out / dur,
        total_token_throughput=(total_in + total_out) / dur,
        request_goodput=None if good is None else good / dur,
        max_concurrent=peak_concurrency(results),
        total_cached_tokens=(
            sum(r.cached_tokens or 0 for r in ok)
            if any(r.cached_tokens is not None for r in ok)
            else None
        ),
        ttft_ms=summarize([r.ttft for r in ok]),
        tpot_ms=summarize(tpots),
        itl_ms=summarize([gap for r in ok for gap in r.itl]),
        e2el_ms=summarize([r.latency for r in ok]),
        errors=dict(Counter(r.error for r in results if not r.success).most_common()),
    )
