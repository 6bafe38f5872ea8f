"""A speculating worker's metrics (vLLM's ``spec_decode`` names with the ``epdserve:`` prefix):
the engine's counters, read at scrape time, and how a PD decode worker took an EAGLE-3 head's
states (services/engine/speculative/states_push.py)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

LABELS = ["model_name", "instance"]


def spec_metrics(ids: list[str], spec: Any) -> Iterable[Metric]:
    """Speculative decoding counters (vLLM's spec_decode names), on workers that speculate."""
    for name, doc, value in (
        ("epdserve:spec_decode_num_drafts", "Verifications: sequence-steps with draft tokens.",
         spec.num_drafts),
        ("epdserve:spec_decode_num_draft_tokens", "Draft tokens verified.", spec.num_draft_tokens),
        ("epdserve:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
         spec.num_accepted_tokens),
    ):  # fmt: skip
        c = CounterMetricFamily(name, doc, labels=LABELS)
        c.add_metric(ids, value)
        yield c
    for name, doc, values in (
        ("epdserve:spec_decode_num_draft_tokens_per_pos", "Draft tokens verified at each draft "
         "position (0: the first after the sequence's own token).", spec.proposed_per_position),
        ("epdserve:spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted at each "
         "draft position.", spec.accepted_per_position),
    ):  # fmt: skip
        c = CounterMetricFamily(name, doc, labels=[*LABELS, "position"])
        for pos, n in enumerate(values):
            c.add_metric([*ids, str(pos)], n)
        yield c


class DraftStatesCollector:
    """How an EAGLE-3 head's states reached this PD decode worker, and the room left to push
    them into (``WorkerMetrics.watch_draft_states``)."""

    def __init__(self, arena: Any, ids: list[str]) -> None:
        self.arena = arena
        self.ids = list(ids)

    def collect(self) -> Iterable[Metric]:
        c = CounterMetricFamily(
            "epdserve:spec_decode_draft_states_handoffs", "EAGLE-3 states a PD decode worker "
            "took from the prefill worker, by path: push (Mooncake, with the KV) or grpc "
            "(through the router: no region was free, or the prefill worker did not push).",
            labels=[*LABELS, "path"],
        )  # fmt: skip
        for path, n in self.arena.handoffs.items():
            c.add_metric([*self.ids, path], n)
        yield c
        g = GaugeMetricFamily(
            "epdserve:spec_decode_draft_states_free_bytes",
            "Room left in the registered buffer EAGLE-3 states are pushed into and from.",
            labels=LABELS,
        )
        g.add_metric(self.ids, self.arena.free_bytes)
        yield g
