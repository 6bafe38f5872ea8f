"""``queue``: thresholds on queued prefill work vs decode load, like Dynamo's load planner.

Prefill pressure: prompt tokens queued per serving prefill worker. Decode pressure: the larger
of KV utilisation and batch utilisation ((running + waiting) / max_num_seqs) averaged over the
serving decode workers. Both are smoothed across rounds (an exponentially weighted mean with
``smoothing`` = weight of the newest round), since one load report is one instant. High and
low thresholds form a band (hysteresis on the signal):

- prefill queue above ``prefill_queue_high`` and decode pressure below ``decode_load_low``:
  move a decode worker to prefill;
- decode pressure above ``decode_load_high`` and prefill queue below ``prefill_queue_low``:
  move a prefill worker to decode;
- otherwise hold.

With encoders in the cluster, ``encode.EncodeRule`` moves workers to and from encode, with
prefill pressure = queue / ``prefill_queue_high`` and decode pressure = load /
``decode_load_high``. An idle encoder is the first donor for a pressed side; a flip to encode
comes after the prefill/decode rules.
"""

from __future__ import annotations

from services.router.rebalance.base import (
    FLIP_FROM_ENCODE,
    FLIP_TO_DECODE,
    FLIP_TO_PREFILL,
    HOLD,
    Proposal,
    RebalancePolicy,
    Smoother,
    WorkerLoad,
    by_role,
    mean,
)
from services.router.rebalance.encode import ENCODE_DEFAULTS, EncodeRule, validate_encode_params


def decode_pressure(w: WorkerLoad) -> float:
    return max(w.kv_utilization, w.batch_utilization)


class QueuePolicy(RebalancePolicy):
    name = "queue"
    DEFAULTS = {
        "prefill_queue_high": 2048.0,  # queued prompt tokens per prefill worker
        "prefill_queue_low": 256.0,
        "decode_load_high": 0.8,  # max(KV utilisation, batch utilisation) of decode workers
        "decode_load_low": 0.4,
        "smoothing": 0.3,  # weight of the newest round in the smoothed signals (1: none)
        **ENCODE_DEFAULTS,
    }

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self._smooth = Smoother()
        self._encode = EncodeRule()

    def validate(self) -> None:
        super().validate()
        if self.p("prefill_queue_low") >= self.p("prefill_queue_high"):
            raise ValueError("prefill_queue_low must be < prefill_queue_high")
        if self.p("decode_load_low") >= self.p("decode_load_high"):
            raise ValueError("decode_load_low must be < decode_load_high")
        if not 0 < self.p("smoothing") <= 1:
            raise ValueError("smoothing must be in (0, 1]")
        validate_encode_params(self._params)

    def propose(self, workers: list[WorkerLoad]) -> Proposal:
        prefills, decodes = by_role(workers, "prefill"), by_role(workers, "decode")
        if not prefills or not decodes:
            return Proposal(HOLD, "not a PD cluster (needs serving prefill and decode workers)")
        alpha = self.p("smoothing")
        raw_queue = sum(w.queued_prefill_tokens for w in prefills) / len(prefills)
        raw_load = mean([decode_pressure(w) for w in decodes])
        queue = self._smooth.update("queue", raw_queue, alpha)
        load = self._smooth.update("load", raw_load, alpha)
        inputs = {
            "prefill_queue_now": raw_queue,
            "decode_load_now": round(raw_load, 4),
            "prefill_queue_tokens_per_worker": round(queue, 1),
            "decode_load": round(load, 4),
            "prefill_workers": float(len(prefills)),
            "decode_workers": float(len(decodes)),
        }
        pressure = {"prefill": queue / self.p("prefill_queue_high"),
                    "decode": load / self.p("decode_load_high")}  # fmt: skip
        encode, encode_inputs = self._encode.propose(workers, self._params, pressure, alpha)
        inputs.update(encode_inputs)
        if encode is not None:
            encode.inputs = inputs
            if encode.action == FLIP_FROM_ENCODE:
                return encode
        if queue > self.p("prefill_queue_high") and load < self.p("decode_load_low"):
            return Proposal(
                FLIP_TO_PREFILL,
                f"prefill queue {queue:.0f} tok/worker > {self.p('prefill_queue_high'):.0f} "
                f"and decode load {load:.2f} < {self.p('decode_load_low'):.2f}",
                inputs,
            )
        if load > self.p("decode_load_high") and queue < self.p("prefill_queue_low"):
            return Proposal(
                FLIP_TO_DECODE,
                f"decode load {load:.2f} > {self.p('decode_load_high'):.2f} and prefill "
                f"queue {queue:.0f} tok/worker < {self.p('prefill_queue_low'):.0f}",
                inputs,
            )
        if encode is not None:
            return encode
        return Proposal(HOLD, f"within bands (queue {queue:.0f}, decode load {load:.2f})", inputs)
