"""Prometheus metrics of one worker (vLLM's names with the ``epdserve:`` prefix) and the HTTP
endpoint that serves them.

Three sources: the request path (``WorkerMetrics.track`` wraps a request's engine output
stream: TTFT, TPOT, inter-token latency, E2E, tokens, finish reasons), the engine's load
snapshot read at scrape time (``AsyncLLMEngine.stats()``: queue, batch, KV use, prefix cache,
preemptions) and the worker's role epoch (role flips). KV-transfer metrics live in
``services/common/pd_metrics.py`` and are fed by the PD code.

Every worker has its own CollectorRegistry, so several workers in one process (tests) never
share a series; every series carries ``model_name`` and ``instance`` (the worker id).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from services.common.grpc_utils import ROLES
from services.common.metric_buckets import E2E_BUCKETS, TOKEN_BUCKETS, TTFT_BUCKETS
from services.common.metrics_http import MetricsEndpoint
from services.common.pd_metrics import KVTransferMetrics
from services.engine.expert_balance import expert_tokens
from services.worker.spec_metrics import LABELS, DraftStatesCollector, spec_metrics

log = logging.getLogger(__name__)

# Request-path histograms also carry the role the worker had when it served the request: a
# decode worker's time to first token is its decode queue, a prefill worker's the prefill.
ROLE_LABELS = [*LABELS, "role"]
# Phases a worker times (request_phase_seconds), with the role each one runs on; see
# services/common/phases.py.
WORKER_PHASES = {
    "reserve": "decode", "prefill": "prefill", "kv_transfer": "prefill",
    "decode_queue": "decode", "encode": "encode",
}  # fmt: skip
# Values of request_success_total's finished_reason: the engine's finish reasons, "abort"
# for a request whose caller went away, "error" for one the engine failed.
FINISHED_REASONS = ("stop", "length", "abort", "error")


class WorkerMetrics(MetricsEndpoint):
    """The metrics of one worker. ``engine``: an AsyncLLMEngine (``model_name``, ``stats()``);
    ``state``: the worker's WorkerState (``instance_id``, ``role_epoch``)."""

    def __init__(self, engine: Any, state: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.model_name = str(engine.model_name)
        self.instance = str(state.instance_id)
        self.state = state
        ids = (self.model_name, self.instance)
        self.ttft = Histogram(
            "epdserve:time_to_first_token_seconds",
            "Seconds from a request's arrival at the worker to its first output token.",
            ROLE_LABELS, buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "epdserve:time_per_output_token_seconds",
            "Per finished request: seconds after the first token divided by the tokens after it.",
            ROLE_LABELS, buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "epdserve:inter_token_latency_seconds",
            "Seconds between two consecutive engine outputs of one request.",
            ROLE_LABELS, buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "epdserve:e2e_request_latency_seconds",
            "Seconds from a request's arrival at the worker to its last output.",
            ROLE_LABELS, buckets=E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "epdserve:prompt_tokens", "Prompt tokens of the requests this worker served.",
            LABELS, registry=r,
        ).labels(*ids)  # fmt: skip
        self.generation_tokens = Counter(
            "epdserve:generation_tokens", "Tokens this worker generated.", LABELS, registry=r
        ).labels(*ids)
        self.success = Counter(
            "epdserve:request_success",
            "Requests that ended, by finished_reason (stop, length, abort, error).",
            [*LABELS, "finished_reason"], registry=r,
        )  # fmt: skip
        for reason in FINISHED_REASONS:
            self.success.labels(*ids, reason)
        self.request_failures = Counter(
            "epdserve:request_failures",
            "Requests that failed here because of themselves (an exception while processing "
            "them): each ended alone, the worker went on, the router did not retry it.",
            LABELS, registry=r,
        ).labels(*ids)  # fmt: skip
        self.phase = Histogram(
            "epdserve:request_phase_seconds",
            "Seconds one request spent in a phase on this worker (phase: reserve, prefill, "
            "kv_transfer, decode_queue, encode; role: the one it runs on).",
            [*LABELS, "phase", "role"], buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        for phase, role in WORKER_PHASES.items():
            self.phase.labels(*ids, phase, role)
        self.pool_calls = Counter(
            "epdserve:pooling_requests",
            "Pool calls (embeddings, rerank, score requests) by endpoint and outcome "
            "(success, invalid, error).",
            [*LABELS, "endpoint", "outcome"], registry=r,
        )  # fmt: skip
        self.pool_inputs = Counter(
            "epdserve:pooling_inputs", "Inputs pooled into one vector each, by endpoint.",
            [*LABELS, "endpoint"], registry=r,
        )  # fmt: skip
        self.pool_latency = Histogram(
            "epdserve:pooling_request_latency_seconds",
            "Seconds from a Pool call's arrival to its answer, by endpoint.",
            [*LABELS, "endpoint"], buckets=E2E_BUCKETS, registry=r,
        )  # fmt: skip
        for h in (self.ttft, self.tpot, self.itl, self.e2e):
            h.labels(*ids, state.role)
        # The request path's children, made once: ``labels`` checks, converts and locks on
        # every call, and ``track`` made four before a request reached its engine.
        self._by_role: dict[str, tuple[Any, Any, Any, Any]] = {}  # role -> ttft, itl, tpot, e2e
        self._by_reason = {reason: self.success.labels(*ids, reason) for reason in FINISHED_REASONS}
        self.kv_transfer = KVTransferMetrics(r, *ids)
        r.register(_EngineCollector(engine, state, ids))

    def observe_pool(self, endpoint: str, outcome: str, seconds: float) -> None:
        """One Pool call ended (``outcome``: success, invalid, error) after ``seconds``."""
        self.pool_calls.labels(self.model_name, self.instance, endpoint, outcome).inc()
        self.pool_latency.labels(self.model_name, self.instance, endpoint).observe(seconds)

    def pooled(self, endpoint: str, inputs: int, prompt_tokens: int) -> None:
        self.pool_inputs.labels(self.model_name, self.instance, endpoint).inc(inputs)
        self.prompt_tokens.inc(prompt_tokens)

    def observe_phase(self, phase: str, seconds: float) -> None:
        """One request's time in one of ``WORKER_PHASES``."""
        self.phase.labels(self.model_name, self.instance, phase, WORKER_PHASES[phase]).observe(
            seconds
        )

    async def track(
        self, outputs: AsyncIterator[Any], count_prompt: bool = True
    ) -> AsyncIterator[Any]:
        """Relay one request's engine outputs (RequestOutput), timing and counting them.
        ``count_prompt`` is False on a PD decode worker: the prefill worker counted it."""
        ttft, itl, tpot, e2e = self._role_series(str(self.state.role))
        arrived = last_at = time.monotonic()
        first_at: float | None = None
        per_completion: dict[int, int] = {}
        reason = "abort"  # if the stream stops before the engine says it finished
        try:
            async for out in outputs:
                now = time.monotonic()
                new = sum(len(c.token_ids) for c in out.outputs)
                if new:
                    if first_at is None:
                        first_at = now
                        ttft.observe(now - arrived)
                        if count_prompt:
                            self.prompt_tokens.inc(len(out.prompt_token_ids))
                    else:
                        itl.observe(now - last_at)
                    last_at = now
                    self.generation_tokens.inc(new)
                    for c in out.outputs:
                        per_completion[c.index] = per_completion.get(c.index, 0) + len(c.token_ids)
                if out.finished:
                    reason = next((c.finish_reason for c in out.outputs if c.finish_reason), "stop")
                    e2e.observe(now - arrived)
                    n_out = max(per_completion.values(), default=0)
                    if first_at is not None and n_out > 1:
                        tpot.observe((now - first_at) / (n_out - 1))
                yield out
        except Exception:
            reason = "error"
            raise
        finally:
            success = self._by_reason.get(reason)
            if success is None:  # a finish reason outside FINISHED_REASONS
                success = self.success.labels(self.model_name, self.instance, reason)
            success.inc()

    def _role_series(self, role: str) -> tuple[Any, Any, Any, Any]:
        """The ttft, itl, tpot and e2e children of the requests served in ``role``."""
        series = self._by_role.get(role)
        if series is None:
            ids = (self.model_name, self.instance, role)
            series = self._by_role[role] = (
                self.ttft.labels(*ids), self.itl.labels(*ids), self.tpot.labels(*ids),
                self.e2e.labels(*ids),
            )  # fmt: skip
        return series

    def watch_staging(self, *stagings: Any) -> None:
        """Export the KV staging slots' use (a worker that transfers KV through them): the
        sum over its sets (with tensor parallelism, one to send and one to receive)."""
        unique = list({id(s): s for s in stagings}.values())
        self.registry.register(_StagingCollector(unique, (self.model_name, self.instance)))

    def watch_draft_states(self, arena: Any) -> None:
        """Export how an EAGLE-3 head's states reached this decode worker (pushed with the
        KV, or through the router) and the room left to push them into."""
        self.registry.register(DraftStatesCollector(arena, [self.model_name, self.instance]))

    def observe_prefill(self, seconds: float, prompt_tokens: int) -> None:
        """A PD prefill that ran here (``Prefill`` RPC: no output stream to track): its time
        to first token and its prompt tokens."""
        self.ttft.labels(self.model_name, self.instance, str(self.state.role)).observe(seconds)
        self.prompt_tokens.inc(prompt_tokens)


class _StagingCollector:
    def __init__(self, stagings: list[Any], ids: tuple[str, str]) -> None:
        self.stagings = stagings
        self.ids = list(ids)

    def collect(self) -> Iterable[Metric]:
        for name, doc, value in (
            ("epdserve:kv_staging_slots", "KV staging slots (host blocks) of this worker.",
             sum(s.num_slots for s in self.stagings)),
            ("epdserve:kv_staging_slots_free", "KV staging slots not held by a transfer.",
             sum(s.num_free for s in self.stagings)),
        ):  # fmt: skip
            g = GaugeMetricFamily(name, doc, labels=LABELS)
            g.add_metric(self.ids, value)
            yield g


class _EngineCollector:
    """Engine load and role epoch, read at scrape time (the engine's step thread keeps the
    snapshot, so a scrape never waits for a step)."""

    def __init__(self, engine: Any, state: Any, ids: tuple[str, str]) -> None:
        self.engine = engine
        self.state = state
        self.ids = list(ids)

    def _by_class(self, s: Any) -> GaugeMetricFamily:
        """The engine's sequences by class: online (priority and default tiers) and offline
        (flex), waiting and running (what the router's rebalancer and offline gate tell apart)."""
        g = GaugeMetricFamily(
            "epdserve:num_requests_by_class",
            "Sequences waiting or running in the engine, online (priority and default tiers) "
            "and offline (flex).",
            labels=[*LABELS, "service_class", "state"],
        )
        off_w, off_r = getattr(s, "num_offline_waiting", 0), getattr(s, "num_offline_running", 0)
        for cls, waiting, running in (("online", s.num_waiting - off_w, s.num_running - off_r),
                                      ("offline", off_w, off_r)):  # fmt: skip
            g.add_metric([*self.ids, cls, "waiting"], waiting)
            g.add_metric([*self.ids, cls, "running"], running)
        return g

    def collect(self) -> Iterable[Metric]:
        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=LABELS)
            g.add_metric(self.ids, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=LABELS)
            c.add_metric(self.ids, value)
            return c

        yield counter(
            "epdserve:role_flips", "Role changes of this worker (its role epoch minus one).",
            max(0, int(self.state.role_epoch) - 1),
        )  # fmt: skip
        role = GaugeMetricFamily(
            "epdserve:worker_role", "1 for this worker's current role, 0 for the others.",
            labels=[*LABELS, "role"],
        )  # fmt: skip
        for r in ROLES:
            role.add_metric([*self.ids, r], 1.0 if self.state.role == r else 0.0)
        yield role
        try:
            s = self.engine.stats()
        except Exception:  # engine not started or dead: the worker says so elsewhere
            log.debug("no engine stats for a scrape", exc_info=True)
            return
        yield gauge("epdserve:num_requests_running", "Sequences in the running batch.",
                    s.num_running)  # fmt: skip
        yield gauge("epdserve:num_requests_waiting", "Sequences queued, not yet running.",
                    s.num_waiting)  # fmt: skip
        yield gauge(
            "epdserve:num_waiting_prompt_tokens",
            "Prompt tokens still to compute for the waiting sequences.",
            s.num_waiting_prompt_tokens,
        )
        yield gauge("epdserve:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                    s.kv_utilization)  # fmt: skip
        yield self._by_class(s)
        yield gauge(
            "epdserve:step_fixed_seconds",
            "The engine's step cost as its service tiers fit it: the fixed wall time of a step "
            "(a step of n tokens takes fixed + n * per-token).",
            getattr(s, "step_fixed_ms", 0.0) / 1000.0,
        )
        yield gauge(
            "epdserve:step_token_seconds",
            "The engine's step cost as its service tiers fit it: the wall time of a token.",
            getattr(s, "step_token_ms", 0.0) / 1000.0,
        )
        yield counter(
            "epdserve:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            getattr(s, "prefix_cache_queries", 0),
        )
        yield counter(
            "epdserve:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            getattr(s, "prefix_cache_hits", 0),
        )
        yield counter(
            "epdserve:num_preemptions", "Sequences preempted (KV freed, to be recomputed).",
            getattr(s, "num_preemptions", 0),
        )  # fmt: skip
        by_tier = CounterMetricFamily(
            "epdserve:preemptions_by_service_tier",
            "Sequences preempted, by the service tier of the preempted sequence.",
            labels=[*LABELS, "service_tier"],
        )
        for tier, n in getattr(s, "preemptions_by_tier", {}).items():
            by_tier.add_metric([*self.ids, tier], n)
        yield by_tier
        yield counter(
            "epdserve:prompt_tokens_computed",
            "Prompt tokens run through the model (the rest came from a KV cache tier).",
            getattr(s, "prompt_tokens_computed", 0),
        )
        hits = CounterMetricFamily(
            "epdserve:kv_tier_hit_blocks",
            "Prompt KV blocks copied into the device cache from a lower tier (host, store).",
            labels=[*LABELS, "tier"],
        )
        hits.add_metric([*self.ids, "host"], getattr(s, "kv_host_hit_blocks", 0))
        hits.add_metric([*self.ids, "store"], getattr(s, "kv_store_hit_blocks", 0))
        yield hits
        total = getattr(s, "kv_host_blocks_total", 0)
        yield gauge(
            "epdserve:kv_host_pool_usage_perc",
            "Fraction (0-1) of the host KV pool's blocks in use (0 without a host pool).",
            getattr(s, "kv_host_blocks_used", 0) / total if total else 0.0,
        )
        yield counter(
            "epdserve:kv_store_put_blocks", "KV blocks this worker wrote to the KV store.",
            getattr(s, "kv_store_put_blocks", 0),
        )  # fmt: skip
        if getattr(s, "spec", None) is not None:
            yield from spec_metrics(self.ids, s.spec)
        yield from _expert_metrics(self.ids, self.engine)


def _expert_metrics(ids: list[str], engine: Any) -> Iterable[Metric]:
    """Tokens routed to each expert of each sparse layer, on MoE models (the input of expert
    load balancing). Read from the model's counters at scrape time: a snapshot the step
    thread may be adding to, never torn per counter. NOTE: layers x experts series per worker
    (48 x 128 for Qwen3-30B-A3B)."""
    model = getattr(getattr(getattr(engine, "engine", None), "runner", None), "model", None)
    if not getattr(model, "moe_blocks", None):
        return
    c = CounterMetricFamily(
        "epdserve:moe_expert_tokens", "Tokens routed to each expert of each sparse layer.",
        labels=[*LABELS, "layer", "expert"],
    )  # fmt: skip
    for layer, row in enumerate(expert_tokens(model).tolist()):
        for expert, n in enumerate(row):
            c.add_metric([*ids, str(layer), str(expert)], n)
    yield c
