"""``static``: never flips; roles stay as the operator set them."""

from __future__ import annotations

from services.router.rebalance.base import HOLD, Proposal, RebalancePolicy, WorkerLoad


class StaticPolicy(RebalancePolicy):
    name = "static"

    def propose(self, workers: list[WorkerLoad]) -> Proposal:
        return Proposal(HOLD, "static policy: roles never change")
