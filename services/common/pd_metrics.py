"""Metrics fed by PD disaggregation and the rebalancer: defined here, incremented by them.

Both classes register into a registry their owner passes in (a worker's or the router's own
CollectorRegistry, never the process-global one) and create their series at zero, so that
dashboards and alerts see them before the first transfer or decision.

Who increments what:

- ``KVTransferMetrics`` (one per worker, ``WorkerMetrics.kv_transfer``): the prefill side of a
  worker, once per request whose KV it pushed to a decode worker.
  ``record(nbytes, seconds)`` after ``KVSender.wait`` returns (``services/prefill/role.py``,
  ``PrefillRole.run``: ``pushed.bytes`` / ``pushed.seconds``); ``record_failure()`` when the
  push raises ``TransferError`` or times out. The decode side counts
  ``record_failure()`` for a reservation reclaimed by its deadline
  (``services/decode/kv_receiver.py``, ``KVReceiver._reap_loop``).
- ``RebalanceMetrics`` (one per router, ``RouterMetrics.rebalance``): the rebalancer, once per
  decision it takes, ``decision(policy, action)``, ``action`` one of ``REBALANCE_ACTIONS``.
- A prefill worker's TTFT and prompt tokens (``WorkerMetrics.observe_prefill(seconds,
  prompt_tokens)``): the ``Prefill`` RPC in ``services/worker/server.py``, where it already
  feeds ``ttft_ms``; ``Generate`` and ``Decode`` streams are timed by ``WorkerMetrics.track``.
- Role flips (``epdserve:role_flips_total``) need no wiring: a worker exports its role epoch
  minus one (the epoch is bumped by every role change), see ``services/worker/metrics.py``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from services.common.metric_buckets import KV_TRANSFER_BUCKETS

# What the rebalancer decided in one round. flip_to_*: it asked a worker to change role
# (flip_to_encode: a prefill/decode worker of a vision-language model to encode);
# flip_from_encode: an encoder back to prefill or decode; hold: it looked and left the roles
# as they are; suppressed: it wanted a flip but the cooldown, the cap on flips or the minimum
# workers per role held it back.
REBALANCE_ACTIONS = (
    "flip_to_prefill", "flip_to_decode", "flip_to_encode", "flip_from_encode", "hold",
    "suppressed",
)  # fmt: skip
# The rebalancer's policies (issue 6); their series exist from the start at zero.
REBALANCE_POLICIES = ("static", "queue", "slo")


class KVTransferMetrics:
    """KV cache pushed from this (prefill) worker into decode workers' reserved blocks."""

    def __init__(self, registry: CollectorRegistry, model_name: str, instance: str) -> None:
        labels = ["model_name", "instance"]
        self.bytes = Counter(
            "epdserve:kv_transfer_bytes", "Bytes of KV cache transferred to decode workers.",
            labels, registry=registry,
        ).labels(model_name, instance)  # fmt: skip
        self.seconds = Histogram(
            "epdserve:kv_transfer_seconds",
            "Seconds one request spent inside its KV write calls (writes overlap the prefill).",
            labels, buckets=KV_TRANSFER_BUCKETS, registry=registry,
        ).labels(model_name, instance)  # fmt: skip
        self.failures = Counter(
            "epdserve:kv_transfer_failures",
            "KV transfers that failed or timed out, and decode reservations that expired unused.",
            labels, registry=registry,
        ).labels(model_name, instance)  # fmt: skip

    def record(self, nbytes: int, seconds: float) -> None:
        """One request's KV arrived in the decode worker."""
        self.bytes.inc(nbytes)
        self.seconds.observe(seconds)

    def record_failure(self) -> None:
        self.failures.inc()


class RebalanceMetrics:
    """Decisions of the router's role rebalancer."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "epdserve:rebalance_decisions",
            "Role rebalancing decisions, by policy and action (flip_to_prefill, flip_to_decode, "
            "flip_to_encode, flip_from_encode, hold, suppressed).",
            ["policy", "action"], registry=registry,
        )  # fmt: skip
        for policy in REBALANCE_POLICIES:
            for action in REBALANCE_ACTIONS:
                self.decisions.labels(policy, action)

    def decision(self, policy: str, action: str) -> None:
        if action not in REBALANCE_ACTIONS:
            raise ValueError(f"unknown rebalance action {action!r}; one of {REBALANCE_ACTIONS}")
        self.decisions.labels(policy, action).inc()
