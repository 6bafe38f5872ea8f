"""The encode side of rebalancing, shared by the ``queue`` and ``slo`` policies: move a worker
of a vision-language model to the encode role when the encoders' image backlog is high, and an
encoder back to prefill or decode when the encoders idle and that side needs a worker.

Encoder backlog: images held (waiting + in the vision tower, from the encoders' load reports)
per serving encoder, smoothed across rounds like the queue policy's signals. Prefill and decode
pressure come from the policy, normalised so that 1.0 is its "high" mark (queue: its high
thresholds; slo: the SLOs):

- backlog above ``encode_queue_high`` and a prefill/decode side below 1.0 that has a worker
  able to encode: the less pressed side gives a worker to encode (``flip_to_encode``);
- backlog below ``encode_queue_low``, more than one encoder, and a side at 1.0 or above: an
  encoder goes to the more pressed side (``flip_from_encode``);
- otherwise nothing: the policy's prefill/decode rules decide.

Only a cluster that has an encoder is balanced this way. Without one, images are encoded by
the prefill workers (EP+D): a deployment choice, and `epdserve roles set ID encode` adds the
first encoder. Like every role, the last encoder is never taken away by the rebalancer.
"""

from __future__ import annotations

from collections.abc import Mapping

from services.router.rebalance.base import (
    FLIP_FROM_ENCODE,
    FLIP_TO_ENCODE,
    PD_ROLES,
    Proposal,
    Smoother,
    WorkerLoad,
    by_role,
    mean,
)

# Parameters of the encode rule, in the DEFAULTS of each policy that uses it.
ENCODE_DEFAULTS = {
    "encode_queue_high": 8.0,  # images held per encoder above which it wants another encoder
    "encode_queue_low": 1.0,  # images held per encoder below which encoders count as idle
}


def validate_encode_params(params: Mapping[str, float]) -> None:
    if params["encode_queue_low"] >= params["encode_queue_high"]:
        raise ValueError("encode_queue_low must be < encode_queue_high")


class EncodeRule:
    """Proposes flips to and from encode; holds the smoothed backlog between rounds."""

    def __init__(self) -> None:
        self._smooth = Smoother()

    def propose(
        self,
        workers: list[WorkerLoad],
        params: Mapping[str, float],
        pressure: Mapping[str, float],
        smoothing: float = 1.0,
    ) -> tuple[Proposal | None, dict[str, float]]:
        """(a flip to or from encode, or None; the numbers looked at). ``pressure``: prefill
        and decode pressure, 1.0 at the policy's high mark."""
        encoders = by_role(workers, "encode")
        if not encoders:
            return None, {}
        raw = sum(w.image_backlog for w in encoders) / len(encoders)
        backlog = self._smooth.update("backlog", raw, smoothing)
        high, low = params["encode_queue_high"], params["encode_queue_low"]
        inputs = {
            "encode_backlog_now": raw,
            "encode_backlog_per_worker": round(backlog, 2),
            "encode_ms_per_image": round(
                mean([w.recent_encode_ms for w in encoders if w.recent_encode_ms > 0]), 2
            ),
            "encode_workers": float(len(encoders)),
        }
        if backlog > high:
            donors = self._donors(workers, pressure)
            inputs["encode_capable_donors"] = float(
                sum(len([w for w in by_role(workers, r) if w.can_encode]) for r in donors)
            )
            if donors:
                role = donors[0]
                return Proposal(
                    FLIP_TO_ENCODE,
                    f"encoder backlog {backlog:.1f} images/worker > {high:g} and {role} "
                    f"pressure {pressure[role]:.2f} < 1",
                    donor_role=role,
                ), inputs
        elif backlog < low and len(encoders) > 1:
            needy = sorted((r for r in PD_ROLES if pressure[r] >= 1), key=lambda r: -pressure[r])
            if needy:
                role = needy[0]
                return Proposal(
                    FLIP_FROM_ENCODE,
                    f"encoder backlog {backlog:.1f} images/worker < {low:g} and {role} "
                    f"pressure {pressure[role]:.2f} >= 1",
                    target_role=role,
                ), inputs
        return None, inputs

    @staticmethod
    def _donors(workers: list[WorkerLoad], pressure: Mapping[str, float]) -> list[str]:
        """The prefill/decode sides that could give a worker to encode, best first: not
        pressed (< 1), with a worker of a model that can encode; a side that would be left
        empty comes last (the governor then says so), then the less pressed, then the larger.
        NOTE: a worker of a text-only model never qualifies (can_encode is False)."""
        sides = [
            r
            for r in PD_ROLES
            if pressure[r] < 1 and any(w.can_encode for w in by_role(workers, r))
        ]
        return sorted(
            sides,
            key=lambda r: (
                len(by_role(workers, r)) <= 1,
                pressure[r],
                -len(by_role(workers, r)),
                r,
            ),
        )
