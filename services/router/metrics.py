"""Prometheus metrics of one router (own registry: no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "epdserve_router_requests", "HTTP API requests", ["api", "status"], registry=r
        )
        self.inflight = Gauge(
            "epdserve_router_inflight_requests", "requests being generated", registry=r
        )
        self.ttft = Histogram(
            "epdserve_router_time_to_first_token_seconds", "time to first token", ["api"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "epdserve_router_request_latency_seconds", "end-to-end request latency", ["api"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "epdserve_router_prompt_tokens", "prompt tokens processed", registry=r
        )
        self.completion_tokens = Counter(
            "epdserve_router_completion_tokens", "tokens generated", registry=r
        )
        self.workers = Gauge(
            "epdserve_router_workers", "known workers", ["role", "state"], registry=r
        )
        self.worker_queue = Gauge(
            "epdserve_worker_waiting_requests", "queued requests per worker", ["worker"], registry=r
        )
        self.worker_kv = Gauge(
            "epdserve_worker_kv_utilization", "KV cache utilisation per worker", ["worker"],
            registry=r,
        )  # fmt: skip
