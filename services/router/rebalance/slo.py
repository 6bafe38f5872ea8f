"""``slo``: predict TTFT and TPOT against their SLOs; flip toward the role that misses, like
xLLM's SLO-aware policy.

- TTFT prediction: the prefill workers' recent TTFT plus the time to clear the queued prompt
  tokens per prefill worker at their measured prefill speed (the router times its Prefill
  calls), or ``prefill_tokens_per_s`` until something was measured.
- TPOT prediction: the decode workers' recent TPOT scaled by the batch they hold
  ((running + waiting) / running): waiting requests will join the batch and slow each step.

A role "misses" when its prediction exceeds its SLO. The flip goes toward the role that misses
only if the other role would still meet its SLO with one worker fewer (its prediction scaled
by n / (n - 1), with ``margin`` of headroom): moving a worker must not just move the miss.

With encoders in the cluster, ``encode.EncodeRule`` moves workers to and from encode, with
prefill pressure = predicted TTFT / SLO and decode pressure = predicted TPOT / SLO (raw, not
smoothed, like the predictions). An idle encoder is the first donor for a role that misses; a
flip to encode comes after the prefill/decode rules.
"""

from __future__ import annotations

from services.router.rebalance.base import (
    FLIP_FROM_ENCODE,
    FLIP_TO_DECODE,
    FLIP_TO_PREFILL,
    HOLD,
    Proposal,
    RebalancePolicy,
    WorkerLoad,
    by_role,
    mean,
)
from services.router.rebalance.encode import ENCODE_DEFAULTS, EncodeRule, validate_encode_params


class SLOPolicy(RebalancePolicy):
    name = "slo"
    DEFAULTS = {
        "ttft_slo_ms": 2000.0,
        "tpot_slo_ms": 100.0,
        "prefill_tokens_per_s": 4000.0,  # prefill speed of one worker until one is measured
        "margin": 0.8,  # the donor role must stay under margin * SLO after giving a worker
        **ENCODE_DEFAULTS,
    }

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self._encode = EncodeRule()

    def validate(self) -> None:
        super().validate()
        for key in ("ttft_slo_ms", "tpot_slo_ms", "prefill_tokens_per_s"):
            if self.p(key) <= 0:
                raise ValueError(f"parameter {key} must be > 0")
        if not 0 < self.p("margin") <= 1:
            raise ValueError("parameter margin must be in (0, 1]")
        validate_encode_params(self._params)

    def speed(self, prefills: list[WorkerLoad]) -> float:
        """Prompt tokens/s of one prefill worker: measured, else the parameter."""
        measured = [w.prefill_tokens_per_s for w in prefills if w.prefill_tokens_per_s > 0]
        return mean(measured) if measured else self.p("prefill_tokens_per_s")

    def predict(self, prefills: list[WorkerLoad], decodes: list[WorkerLoad]) -> tuple[float, float]:
        """(predicted TTFT ms, predicted TPOT ms) with the workers as they are."""
        queue = sum(w.queued_prefill_tokens for w in prefills) / len(prefills)
        ttft = mean([w.recent_ttft_ms for w in prefills]) + queue / self.speed(prefills) * 1000
        tpots = []
        for w in decodes:
            held = w.num_running + w.num_waiting
            tpots.append(w.recent_tpot_ms * (held / w.num_running if w.num_running else 1.0))
        return ttft, mean(tpots)

    def propose(self, workers: list[WorkerLoad]) -> Proposal:
        prefills, decodes = by_role(workers, "prefill"), by_role(workers, "decode")
        if not prefills or not decodes:
            return Proposal(HOLD, "not a PD cluster (needs serving prefill and decode workers)")
        ttft, tpot = self.predict(prefills, decodes)
        ttft_slo, tpot_slo, margin = self.p("ttft_slo_ms"), self.p("tpot_slo_ms"), self.p("margin")
        np, nd = len(prefills), len(decodes)
        # The donor's prediction with one worker fewer (infinite when it would have none).
        ttft_fewer = ttft * np / (np - 1) if np > 1 else float("inf")
        tpot_fewer = tpot * nd / (nd - 1) if nd > 1 else float("inf")
        inputs = {
            "prefill_tokens_per_s": round(self.speed(prefills), 1),
            "ttft_pred_ms": round(ttft, 2), "tpot_pred_ms": round(tpot, 2),
            "ttft_slo_ms": ttft_slo, "tpot_slo_ms": tpot_slo,
            "prefill_workers": float(np), "decode_workers": float(nd),
        }  # fmt: skip
        ttft_miss, tpot_miss = ttft / ttft_slo, tpot / tpot_slo
        pressure = {"prefill": ttft_miss, "decode": tpot_miss}
        encode, encode_inputs = self._encode.propose(workers, self._params, pressure)
        inputs.update(encode_inputs)
        if encode is not None:
            encode.inputs = inputs
            if encode.action == FLIP_FROM_ENCODE:
                return encode
        if ttft_miss > 1 and ttft_miss >= tpot_miss and tpot_fewer < margin * tpot_slo:
            return Proposal(
                FLIP_TO_PREFILL,
                f"TTFT {ttft:.0f} ms misses SLO {ttft_slo:.0f}; TPOT with one decode worker "
                f"fewer {tpot_fewer:.0f} ms < {margin:.2f} x {tpot_slo:.0f}",
                inputs,
            )
        if tpot_miss > 1 and tpot_miss >= ttft_miss and ttft_fewer < margin * ttft_slo:
            return Proposal(
                FLIP_TO_DECODE,
                f"TPOT {tpot:.0f} ms misses SLO {tpot_slo:.0f}; TTFT with one prefill worker "
                f"fewer {ttft_fewer:.0f} ms < {margin:.2f} x {ttft_slo:.0f}",
                inputs,
            )
        if encode is not None:
            return encode
        return Proposal(
            HOLD, f"TTFT {ttft:.0f}/{ttft_slo:.0f} ms, TPOT {tpot:.0f}/{tpot_slo:.0f} ms", inputs
        )
