"""Prometheus metrics of one router (own registry: no process-global state).

The router sees requests as clients do (``epdserve:router_*``: outcomes, client-side TTFT
and latency, tokens) and the cluster as its worker pool does (``epdserve:workers``, each
worker's last load report). Engine-side metrics come from the workers' own endpoints
(``services/worker/metrics.py``); rebalancer decisions from ``services/common/pd_metrics.py``.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.grpc_utils import ROLES
from services.common.metric_buckets import E2E_BUCKETS, TTFT_BUCKETS
from services.common.pd_metrics import RebalanceMetrics
from services.engine.service_tiers import SERVICE_TIERS

APIS = ("chat", "completions", "messages", "count_tokens", "tokenize", "detokenize",
        "responses", "embeddings", "rerank", "score")  # fmt: skip
# Path of each API endpoint, for requests counted before their handler ran.
API_OF_PATH = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
               "/v1/messages": "messages", "/v1/messages/count_tokens": "count_tokens",
               "/tokenize": "tokenize", "/detokenize": "detokenize",
               "/v1/responses": "responses", "/v1/embeddings": "embeddings",
               "/v1/rerank": "rerank", "/v2/rerank": "rerank", "/v1/score": "score"}  # fmt: skip
# Values of router_requests_total's outcome label.
OUTCOMES = ("success", "invalid", "unavailable", "timeout", "cancelled", "error")
# Values of epdserve:workers' state label.
WORKER_STATES = ("serving", "draining", "sleeping", "loading", "unreachable", "starting")
# Phases of a request the router times (router_request_phase_seconds), with the role of the
# worker each one runs on ("router": the router itself). See services/router/phases.py.
ROUTER_PHASES = {"queue": "router", "encode": "encode", "reserve": "decode", "prefill": "prefill"}


def outcome_of(status: int | str) -> str:
    """The outcome label of an HTTP status: success (2xx), cancelled (499: the client went
    away), unavailable (503: no usable worker), timeout (504), invalid (other 4xx: the
    request's fault) or error (other 5xx)."""
    code = int(status)
    if code < 400:
        return "success"
    if code == 499:
        return "cancelled"
    if code == 503:
        return "unavailable"
    if code == 504:
        return "timeout"
    return "invalid" if code < 500 else "error"


def _counter(
    registry: CollectorRegistry, name: str, doc: str, label: str, values: tuple[str, ...]
) -> Counter:
    """A counter with one label, every value of it exported from the start (as 0)."""
    counter = Counter(name, f"{doc} ({', '.join(values)}).", [label], registry=registry)
    for value in values:
        counter.labels(value)
    return counter


class _Children(dict):
    """A labelled metric's children by their label values (``children[values]``): the metric's
    ``labels`` checks and converts its arguments and takes a lock on every call (~1 us, nine
    calls a request); a child once made is looked up here."""

    def __init__(self, metric: Any) -> None:
        super().__init__()
        self.metric = metric

    def __missing__(self, values: tuple[str, ...]) -> Any:
        child = self[values] = self.metric.labels(*values)
        return child


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "epdserve:router_requests", "API requests by api and outcome "
            "(success, invalid, unavailable, timeout, cancelled, error).",
            ["api", "outcome"], registry=r,
        )  # fmt: skip
        for api in APIS:
            for outcome in OUTCOMES:
                self.requests.labels(api, outcome)
        self.inflight = Gauge(
            "epdserve:router_num_requests_running", "Requests the router is generating now.",
            registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "epdserve:router_time_to_first_token_seconds",
            "Seconds from a request's arrival at the router to its first output (client view).",
            ["api", "model_name"], buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "epdserve:router_e2e_request_latency_seconds",
            "Seconds from a request's arrival at the router to its last output (client view).",
            ["api", "model_name"], buckets=E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.phase = Histogram(
            "epdserve:router_request_phase_seconds",
            "Seconds one request spent in a phase, as the router times it (phase: queue, "
            "encode, reserve, prefill; role: where it ran).",
            ["model_name", "phase", "role"], buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "epdserve:router_prompt_tokens", "Prompt tokens of completed requests.",
            ["model_name"], registry=r,
        )  # fmt: skip
        self.completion_tokens = Counter(
            "epdserve:router_generation_tokens", "Tokens generated for completed requests.",
            ["model_name"], registry=r,
        )  # fmt: skip
        self.workers = Gauge(
            "epdserve:workers", "Workers the router knows, by base model, role and state "
            "(serving, draining, sleeping, loading, unreachable, starting: not serving yet).",
            ["model_name", "role", "state"], registry=r,
        )  # fmt: skip
        self.worker_waiting = Gauge(
            "epdserve:router_worker_num_requests_waiting",
            "Queued requests of each worker, from its latest load report.",
            ["instance", "role", "model_name"], registry=r,
        )  # fmt: skip
        self.worker_waiting_tokens = Gauge(
            "epdserve:router_worker_num_waiting_prompt_tokens",
            "Prompt tokens queued for prefill on each worker, from its latest load report.",
            ["instance", "role", "model_name"], registry=r,
        )  # fmt: skip
        self.worker_kv = Gauge(
            "epdserve:router_worker_kv_cache_usage_perc",
            "KV-cache use (0-1) of each worker, from its latest load report.",
            ["instance", "role", "model_name"], registry=r,
        )  # fmt: skip
        self.worker_images = Gauge(
            "epdserve:router_worker_images_pending",
            "Images an encoder holds (waiting or in the vision tower), from its latest load "
            "report.",
            ["instance", "role", "model_name"], registry=r,
        )  # fmt: skip
        self.migrations = Counter(
            "epdserve:router_migrations", "Requests continued on another worker after theirs "
            "died or hung mid-stream, by reason (died, hung).", ["reason"], registry=r,
        )  # fmt: skip
        for reason in ("died", "hung"):
            self.migrations.labels(reason)
        self.tier_requests = Counter(
            "epdserve:router_tier_requests", "Requests that completed, by service tier "
            "(priority, default, flex).", ["service_tier"], registry=r,
        )  # fmt: skip
        self.tier_tokens = Counter(
            "epdserve:router_tier_tokens", "Tokens of completed requests by service tier and "
            "kind (prompt, generation).", ["service_tier", "kind"], registry=r,
        )  # fmt: skip
        for tier in SERVICE_TIERS:
            self.tier_requests.labels(tier)
            for kind in ("prompt", "generation"):
                self.tier_tokens.labels(tier, kind)
        self.offline_queue = Histogram(
            "epdserve:router_offline_queue_seconds", "Seconds an offline (flex) request waited "
            "in the router's offline queue for headroom.", buckets=E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.offline_requests = Gauge(
            "epdserve:router_offline_requests", "Offline (flex) requests in the router, by "
            "state (waiting, running).", ["state"], registry=r,
        )  # fmt: skip
        # Batch APIs (batches/executor.py), as run by this router (the leader).
        self.batches_running = Gauge(
            "epdserve:router_batches_running", "Batches this router's executor runs now (the "
            "leader's; 0 on the others).", registry=r,
        )  # fmt: skip
        ended = ("completed", "failed", "cancelled", "expired")
        self.batches_ended = _counter(r, "epdserve:router_batches_ended", "Batches this router "
                                      "ended, by final status", "status", ended)  # fmt: skip
        self.batch_lines = _counter(r, "epdserve:router_batch_lines", "Batch lines (requests) "
                                    "this router answered (both Batch APIs), by outcome",
                                    "outcome", ("completed", "failed"))  # fmt: skip
        self.rebalance = RebalanceMetrics(r)
        per_request = (self.requests, self.ttft, self.e2e, self.phase, self.prompt_tokens,
                       self.completion_tokens, self.tier_requests, self.tier_tokens)  # fmt: skip
        self._children = {id(m): _Children(m) for m in per_request}
        self.update_pool(None)

    def count_request(self, api: str, status: int | str) -> None:
        self._children[id(self.requests)][api, outcome_of(status)].inc()

    def first_token(self, api: str, model: str, started: float) -> None:
        """A request's first output arrived; ``started``: its time.monotonic() on arrival."""
        self._children[id(self.ttft)][api, model].observe(time.monotonic() - started)

    def observe_phase(self, model: str, phase: str, seconds: float) -> None:
        """One request's time in one of ``ROUTER_PHASES``."""
        self._children[id(self.phase)][model, phase, ROUTER_PHASES[phase]].observe(seconds)

    def done(self, api: str, model: str, started: float, prompt: int, completion: int) -> None:
        """A request's last output arrived, with its usage counts."""
        children = self._children
        children[id(self.e2e)][api, model].observe(time.monotonic() - started)
        children[id(self.prompt_tokens)][(model,)].inc(prompt)
        children[id(self.completion_tokens)][(model,)].inc(completion)

    def tier_done(self, tier: str, prompt: int, completion: int) -> None:
        """A request of service tier ``tier`` completed with these usage counts."""
        children = self._children
        children[id(self.tier_requests)][(tier,)].inc()
        children[id(self.tier_tokens)][tier, "prompt"].inc(prompt)
        children[id(self.tier_tokens)][tier, "generation"].inc(completion)

    def update_offline(self, offline: Any) -> None:
        """Refresh the offline-queue gauges from an OfflineAdmission (before a scrape)."""
        self.offline_requests.labels("waiting").set(offline.waiting)
        self.offline_requests.labels("running").set(offline.running)

    def update_pool(self, pool: Any) -> None:
        """Refresh the membership and per-worker gauges from a WorkerPool (before a scrape)."""
        handles = list(pool.handles.values()) if pool is not None else []
        starting = pool.starting.rows() if pool is not None else []  # routing/starting.py
        # NOTE: every (role, state) of each model is exported, zeros included; with no
        # worker known, of model "" (a dashboard shows zeros rather than no data).
        models = {h.info.model for h in handles} | {s["model"] for s in starting} or {""}
        counts = {(model, role, state): 0 for model in models for role in ROLES
                  for state in WORKER_STATES}  # fmt: skip
        gauges = (self.workers, self.worker_waiting, self.worker_waiting_tokens, self.worker_kv,
                  self.worker_images)  # fmt: skip
        for gauge in gauges:
            gauge.clear()
        for h in handles:
            draining = h.info.draining or (h.load is not None and h.load.draining)
            state = "unreachable" if not h.reachable() else "draining" if draining else "serving"
            if state == "serving" and h.info.state == "sleeping":
                state = "sleeping"
            elif h.info.state == "loading":  # unreachable while it restarts with the new model
                state = "loading"
            key = (h.info.model, h.info.role, state)
            counts[key] = counts.get(key, 0) + 1
            if h.load is not None:
                labels = (h.id, h.info.role, h.info.model)
                self.worker_waiting.labels(*labels).set(h.load.num_waiting)
                self.worker_waiting_tokens.labels(*labels).set(h.load.num_waiting_prompt_tokens)
                self.worker_kv.labels(*labels).set(h.load.kv_utilization)
                self.worker_images.labels(*labels).set(
                    h.load.images_waiting + h.load.images_encoding
                )
        for s in starting:
            counts[(s["model"], s["role"], "starting")] += 1
        for (model, role, state), n in counts.items():
            self.workers.labels(model, role, state).set(n)
