"""The rebalancing policy interface and the plain data it works on.

A policy looks at one snapshot of the workers' load (``WorkerLoad``, built from their StreamLoad
reports) and says which way it would move one worker (``Proposal``). It does not enforce the
cooldown, the cap on flips or the minimum per role: ``governor.Governor`` does that for every
policy alike, and turns proposals into decisions.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

# What a policy may propose (the metrics' REBALANCE_ACTIONS add "suppressed").
FLIP_TO_PREFILL = "flip_to_prefill"  # a decode worker becomes a prefill worker
FLIP_TO_DECODE = "flip_to_decode"  # a prefill worker becomes a decode worker
FLIP_TO_ENCODE = "flip_to_encode"  # a prefill or decode worker of a VL model becomes an encoder
FLIP_FROM_ENCODE = "flip_from_encode"  # an encoder goes back to prefill or decode
HOLD = "hold"
FLIPS = (FLIP_TO_PREFILL, FLIP_TO_DECODE, FLIP_TO_ENCODE, FLIP_FROM_ENCODE)
PD_ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class WorkerLoad:
    """One worker as the rebalancer sees it (router's latest advertisement + load report)."""

    id: str  # instance id
    role: str  # mixed | prefill | decode | encode
    state: str  # serving | draining | flipping
    queued_prefill_tokens: int = 0  # prompt tokens waiting in its engine
    num_waiting: int = 0  # requests waiting in its engine
    num_running: int = 0  # running batch
    kv_utilization: float = 0.0  # fraction of KV blocks in use
    max_num_seqs: int = 0  # batch capacity (0: unknown)
    recent_ttft_ms: float = 0.0  # mean of recent TTFTs (prefill workers: the Prefill RPC)
    recent_tpot_ms: float = 0.0  # mean of recent TPOTs
    prefill_tokens_per_s: float = 0.0  # measured prefill speed (router's view; 0: unknown)
    can_encode: bool = False  # a VL model with Mooncake: may take the encode role
    images_waiting: int = 0  # encode role: images accepted, not yet in the vision tower
    images_encoding: int = 0  # encode role: images in the vision-tower batch running now
    recent_encode_ms: float = 0.0  # encode role: recent vision-tower ms per image

    @property
    def image_backlog(self) -> int:
        """Images this encoder holds (waiting + in the tower)."""
        return self.images_waiting + self.images_encoding

    @property
    def batch_utilization(self) -> float:
        """Requests held (running + waiting) over batch capacity; 0 when unknown."""
        if self.max_num_seqs <= 0:
            return 0.0
        return (self.num_running + self.num_waiting) / self.max_num_seqs


@dataclass
class Proposal:
    """What a policy would do this round, and why."""

    action: str  # HOLD or one of FLIPS
    reason: str  # one line for logs and `epdserve status`
    inputs: dict[str, float] = field(default_factory=dict)  # the numbers it decided on
    # The role that gives a worker and the role it goes to. Implied for FLIP_TO_PREFILL
    # (decode -> prefill) and FLIP_TO_DECODE (prefill -> decode); the policy names the
    # prefill/decode side of FLIP_TO_ENCODE (donor) and FLIP_FROM_ENCODE (target).
    donor_role: str | None = None
    target_role: str | None = None

    def __post_init__(self) -> None:
        implied = {
            FLIP_TO_PREFILL: ("decode", "prefill"), FLIP_TO_DECODE: ("prefill", "decode"),
            FLIP_TO_ENCODE: (self.donor_role, "encode"),
            FLIP_FROM_ENCODE: ("encode", self.target_role),
        }  # fmt: skip
        if self.action in implied:
            self.donor_role, self.target_role = implied[self.action]
            if self.donor_role not in PD_ROLES and self.target_role not in PD_ROLES:
                raise ValueError(f"{self.action} needs a prefill or decode side")
        elif self.action != HOLD:
            raise ValueError(f"unknown action {self.action!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RebalancePolicy(ABC):
    """Decides the direction of role flips from load. Parameters are given by name to the
    constructor (validated there, ValueError on a bad one) and listed by ``params()``."""

    name: ClassVar[str]
    # name -> default; the constructor accepts exactly these (as numbers or numeric strings).
    DEFAULTS: ClassVar[dict[str, float]] = {}

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.DEFAULTS))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(unknown)} for policy {self.name!r}; "
                f"known: {', '.join(sorted(self.DEFAULTS)) or 'none'}"
            )
        self._params: dict[str, float] = dict(self.DEFAULTS)
        for key, value in params.items():
            try:
                self._params[key] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"parameter {key} must be a number, got {value!r}") from None
            # NOTE: float() reads "nan", which passes every bound in validate(), and every
            # comparison with it after is false (a NaN TTFT SLO is never missed); the admin
            # API stored it in etcd for every router.
            if math.isnan(self._params[key]):
                raise ValueError(f"parameter {key} must be a number, got {value!r}")
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on inconsistent parameters."""
        for key, value in self._params.items():
            if value < 0:
                raise ValueError(f"parameter {key} must be >= 0, got {value}")

    def params(self) -> dict[str, float]:
        return dict(self._params)

    def p(self, key: str) -> float:
        return self._params[key]

    @abstractmethod
    def propose(self, workers: list[WorkerLoad]) -> Proposal:
        """Look at the serving prefill, decode and encode workers; propose at most one flip."""


def by_role(workers: list[WorkerLoad], role: str) -> list[WorkerLoad]:
    return [w for w in workers if w.role == role and w.state == "serving"]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class Smoother:
    """Exponentially weighted means of named signals across rounds: a load report is one
    instant, and an instantaneous queue length flickers between empty and full."""

    def __init__(self) -> None:
        self._values: dict[str, float] = {}

    def update(self, key: str, value: float, weight: float) -> float:
        """Blend ``value`` in with ``weight`` (1: no smoothing); returns the new mean."""
        old = self._values.get(key)
        new = value if old is None else weight * value + (1 - weight) * old
        self._values[key] = new
        return new
