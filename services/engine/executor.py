"""Running a step's batch: the model's forward pass and the sampler, one failing request
ended alone.

``Executor.execute`` runs the scheduled batch through the model runner; when the batch
raises, it re-runs it one sequence at a time to find the culprit (nothing was advanced yet,
so a re-run computes and writes exactly the KV the batch would have). ``Executor.sample``
draws the next tokens, row by row when the batch's draw raises. A request whose forward pass
or draw fails is reported in ``failed`` with its error (from the engine's ``failure``
callback, which also decides when failures in a row mean the engine itself is broken).

Where the coming features plug in:
- tensor parallelism: ``execute`` is the one call that drives every rank (the batch sent
  to the rank processes, every rank's forward pass, the logits gathered on rank 0), as
  vLLM's executor does (tp_ranks.py).
- speculative decoding: ``execute`` runs the draft and the target, ``sample`` verifies the
  draft tokens and returns the accepted ones per sequence.
- priorities: nothing here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from services.engine.distributed import RankFailure
from services.engine.eplb import ExpertPlacement
from services.engine.expert_balance import BalanceReport, rebalance_experts
from services.engine.model_runner import ModelRunner
from services.engine.outputs import TokenLogprobs
from services.engine.sampler import Sampler
from services.engine.scheduler_output import ScheduledSeq, SchedulerOutput
from services.engine.sequence import Sequence
from services.engine.tp_ranks import RankProcesses

logger = logging.getLogger(__name__)

LayerHook = Callable[[int, list[ScheduledSeq]], None]


class Executor:
    """The model runner and the sampler, with per-request failure isolation.

    Public surface: ``execute`` (logits of a batch) and ``sample`` (its next tokens).
    """

    def __init__(
        self,
        runner: ModelRunner,
        sampler: Sampler,
        failure: Callable[[str, BaseException], str],
    ) -> None:
        self.runner = runner
        # The other tensor-parallel ranks (tp_ranks.py): each step's batch goes to them first.
        self.ranks: RankProcesses | None = runner.ranks
        self.sampler = sampler
        # A draft model's proposer (speculative/draft_model.py): fills the step's drafts first.
        self.drafter: Any = None
        # Called with what failed (for the error text) and the exception; returns the
        # request's error, or raises when the engine, not the request, is at fault.
        self.failure = failure

    def execute(
        self, sched: SchedulerOutput, layer_hook: LayerHook | None
    ) -> tuple[torch.Tensor, dict[str, str]]:
        """The step's logits, and {request id: error} of the sequences whose forward pass
        failed (taken out of ``sched``)."""
        if self.drafter is not None:
            self.drafter.fill(sched.scheduled)
        if self.ranks is not None:
            logits = self._execute_group(sched, layer_hook)
            if self.drafter is not None:
                self.drafter.after_target(sched.scheduled)
            return logits, {}
        try:
            logits = self._run(sched.scheduled, layer_hook)
        except Exception as exc:  # noqa: BLE001 - isolated below
            if len(sched.scheduled) == 1:
                rid = sched.scheduled[0].seq.request_id
                error = self.failure("running its forward pass", exc)
                sched.scheduled.clear()
                return torch.empty(0, 0), {rid: error}
            logger.warning("a batch of %d failed (%r); running it one by one",
                           len(sched.scheduled), exc)  # fmt: skip
        else:
            if self.drafter is not None:
                self.drafter.after_target(sched.scheduled)
            return logits, {}
        # NOTE: nothing was advanced (postprocess comes after), so running a sequence again
        # computes and writes exactly the KV the batch would have.
        rows: list[torch.Tensor] = []
        failed: dict[str, str] = {}
        for item in list(sched.scheduled):
            try:
                out = self.runner.execute([item], layer_hook)
            except Exception as exc:  # noqa: BLE001
                failed[item.seq.request_id] = self.failure("running its forward pass", exc)
                sched.scheduled.remove(item)
                continue
            if item.samples:
                rows.append(out)
        return (torch.cat(rows) if rows else torch.empty(0, 0)), failed

    def _run(self, scheduled: list[ScheduledSeq], hook: LayerHook | None) -> torch.Tensor:
        """The batch's logits; a batch naming more LoRA adapters than the engine has slots
        runs in several passes (each sequence's attention reads only its own KV, so the
        passes compute what one would), its sampling rows put back in the batch's order."""
        lora = self.runner.lora
        runs = lora.split(scheduled, _adapter_of) if lora is not None else [scheduled]
        if len(runs) == 1:
            return self._forward(scheduled, hook)
        # Each sampling sequence's logit rows (one per verified position) in the batch.
        rows_of: dict[int, range] = {}
        start = 0
        for s in scheduled:
            rows_of[id(s)] = range(start, start + s.num_logit_rows)
            start += s.num_logit_rows
        parts: list[torch.Tensor] = []
        index: list[int] = []
        for run in runs:
            out = self._forward(run, hook)
            if out.shape[0]:
                parts.append(out)
                index += [r for s in run for r in rows_of[id(s)]]
        if not parts:
            return torch.empty(0, 0)
        logits = torch.cat(parts)
        ordered = torch.empty_like(logits)
        ordered[torch.tensor(index, device=logits.device)] = logits
        return ordered

    def _forward(self, scheduled: list[ScheduledSeq], hook: LayerHook | None) -> torch.Tensor:
        """One pass of the model over ``scheduled``, on every tensor-parallel rank."""
        if self.ranks is not None:
            self.ranks.send(scheduled)
        return self.runner.execute(scheduled, hook)

    def rebalance_experts(
        self, num_slots: int | None = None, placements: list[ExpertPlacement] | None = None
    ) -> BalanceReport:
        """Re-place the MoE experts on the ranks for the load recorded so far (EPLB), or as
        ``placements`` say; call between steps."""
        send = self.ranks.command if self.ranks is not None else None
        return rebalance_experts(self.runner, send, num_slots, placements)

    def check_health(self) -> None:
        """Raise when the engine cannot serve any more (a tensor-parallel rank died)."""
        if self.ranks is not None:
            self.ranks.check()

    def _execute_group(self, sched: SchedulerOutput, layer_hook: LayerHook | None) -> torch.Tensor:
        """Every rank runs the batch. NOTE: no one-by-one retry here: a rank that raised left
        the others inside a collective, so any failure ends the whole group."""
        try:
            return self._run(sched.scheduled, layer_hook)
        except RankFailure:
            raise
        except Exception as exc:
            raise RankFailure(f"the tensor-parallel group failed a step: {exc!r}") from exc

    def sample(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        failed: dict[str, str],
        drafts: list[tuple[int, torch.Tensor]] | None = None,
    ) -> list[tuple[int, TokenLogprobs | None]]:
        """(token, logprobs) per sequence; a sequence whose sampling raises gets (-1, None)
        and its request an entry in ``failed``. With ``drafts`` (a sampled draft token and
        its draft distribution per row): their verification (``Sampler.verify``)."""

        def draw(rows: torch.Tensor, part: list[Sequence], first: int) -> Any:
            if drafts is None:
                return self.sampler(rows, part)
            return self.sampler.verify(rows, part, drafts[first : first + len(part)])

        try:
            result = draw(logits, seqs, 0)
            return list(zip(result.token_ids, result.logprobs, strict=True))
        except Exception:  # noqa: BLE001 - find the row at fault
            logger.warning("sampling a batch of %d failed; sampling it row by row", len(seqs))
        out: list[tuple[int, TokenLogprobs | None]] = []
        for i, seq in enumerate(seqs):
            try:
                one = draw(logits[i : i + 1], [seq], i)
                out.append((one.token_ids[0], one.logprobs[0]))
            except Exception as exc:  # noqa: BLE001
                failed[seq.request_id] = self.failure("sampling its next token", exc)
                out.append((-1, None))
        return out


def _adapter_of(item: ScheduledSeq) -> str | None:
    return item.seq.lora
