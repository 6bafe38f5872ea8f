"""Turns a policy's proposals into decisions: hysteresis, cooldown, a cap on flips per
window, at least one serving worker per role (encode included), one flip at a time, and only a
worker that can encode (a vision-language model) to encode. Pure and clock-injected."""

from __future__ import annotations

import collections
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from services.router.rebalance.base import HOLD, Proposal, WorkerLoad, by_role

SUPPRESSED = "suppressed"


@dataclass
class GovernorConfig:
    """Damping shared by every policy."""

    hysteresis_rounds: int = 3  # a proposal must repeat this many rounds in a row
    cooldown_s: float = 30.0  # no flip sooner than this after the previous one
    max_flips: int = 2  # at most this many flips ...
    flip_window_s: float = 300.0  # ... per this many seconds

    def __post_init__(self) -> None:
        if self.hysteresis_rounds < 1:
            raise ValueError("hysteresis_rounds must be >= 1")
        if self.cooldown_s < 0 or self.flip_window_s <= 0:
            raise ValueError("cooldown_s must be >= 0 and flip_window_s > 0")
        if self.max_flips < 1:
            raise ValueError("max_flips must be >= 1")


@dataclass
class Decision:
    """One rebalancing round: what was decided, on whom, why, from which inputs."""

    policy: str
    action: str  # one of base.FLIPS | hold | suppressed
    reason: str
    worker_id: str | None = None  # the worker to flip (flips only)
    proposed: str = HOLD  # what the policy proposed
    target_role: str | None = None  # the role ``worker_id`` goes to (flips only)
    inputs: dict[str, float] = field(default_factory=dict)
    at: float = 0.0  # wall-clock time (seconds since the epoch)
    dry_run: bool = False
    applied: bool = False  # the desired role was written to etcd
    model: str = ""  # the base model whose workers this round looked at

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Governor:
    def __init__(self, cfg: GovernorConfig | None = None) -> None:
        self.cfg = cfg or GovernorConfig()
        self._streak: tuple[str, int] = (HOLD, 0)
        self._flips: collections.deque[float] = collections.deque()  # monotonic times

    def decide(
        self,
        policy: str,
        proposal: Proposal,
        workers: list[WorkerLoad],
        now: float | None = None,
        manual: bool = False,
        dry_run: bool = False,
    ) -> Decision:
        """``manual``: an operator asked for this round (no hysteresis); ``dry_run``: decide
        but record nothing (no streak, no flip counted)."""
        now = time.monotonic() if now is None else now
        d = Decision(policy, HOLD, proposal.reason, proposed=proposal.action,
                     inputs=dict(proposal.inputs), at=time.time(), dry_run=dry_run)  # fmt: skip
        action = proposal.action
        streak = self._streak[1] + 1 if self._streak[0] == action else 1
        if not dry_run:
            self._streak = (action, streak)
        if action == HOLD:
            return d
        while self._flips and now - self._flips[0] > self.cfg.flip_window_s:
            self._flips.popleft()
        donor_role, target_role = proposal.donor_role, proposal.target_role
        donors = by_role(workers, donor_role or "")
        # NOTE: a worker of a text-only model never becomes an encoder, whatever proposed it.
        eligible = [w for w in donors if target_role != "encode" or w.can_encode]
        held_back = None
        if not manual and streak < self.cfg.hysteresis_rounds:
            d.reason = f"{proposal.reason}; seen {streak}/{self.cfg.hysteresis_rounds} rounds"
            return d  # not yet persistent: hold
        if any(w.state == "flipping" for w in workers):
            held_back = "a role change is already under way"
        elif len(donors) <= 1:
            held_back = f"it would leave no serving {donor_role} worker"
        elif not eligible:
            held_back = f"no serving {donor_role} worker can encode (a text-only model)"
        elif self._flips and now - self._flips[-1] < self.cfg.cooldown_s:
            held_back = f"cooldown ({now - self._flips[-1]:.0f}s of {self.cfg.cooldown_s:.0f}s)"
        elif len(self._flips) >= self.cfg.max_flips:
            held_back = f"cap of {self.cfg.max_flips} flips per {self.cfg.flip_window_s:.0f}s"
        if held_back is not None:
            d.action, d.reason = SUPPRESSED, f"{proposal.reason}; suppressed: {held_back}"
            return d
        # The least busy donor gives the fewest requests to wait for.
        donor = min(
            eligible,
            key=lambda w: (w.num_running + w.num_waiting + w.image_backlog,
                           w.queued_prefill_tokens, w.id),
        )  # fmt: skip
        d.action, d.worker_id, d.target_role = action, donor.id, target_role
        if not dry_run:
            self._flips.append(now)
            self._streak = (HOLD, 0)
        return d
