"""Turning speculation on in an engine: the scheduler's speculator and, for a draft model, its
proposer in the executor (which runs it over each step's batch before the target)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.engine.speculative.speculator import Proposer, Speculator

if TYPE_CHECKING:
    from services.engine.config import EngineConfig
    from services.engine.executor import Executor
    from services.engine.scheduler import Scheduler


def start_speculation(
    config: EngineConfig, max_model_len: int, executor: Executor, scheduler: Scheduler
) -> None:
    spec = config.speculative
    assert spec is not None
    proposer: Proposer | None = None
    if spec.method in ("draft_model", "eagle3"):
        from services.engine.speculative.draft_model import DraftModelProposer
        from services.engine.speculative.eagle3 import Eagle3Proposer

        cls = Eagle3Proposer if spec.method == "eagle3" else DraftModelProposer
        drafter = cls.load(spec, config, max_model_len, executor.runner)
        executor.drafter = proposer = drafter
    scheduler.speculator = Speculator(spec, max_model_len, scheduler.bm, proposer)
