"""After the forward pass: sample every verified position and append tokens while the draft
holds (one round of the sampler per draft position, over the sequences still accepting).

Why this is exact. Round ``j`` samples the token after the ``j`` tokens appended so far from
the target's logits at that position, with the ordinary sampler and the sequence's state as
a step without speculation would see it (the earlier rounds' tokens are appended before:
penalties, logit bias, ``min_tokens``, the grammar mask, stop checks and logprobs all read
them). The draft token only decides whether another round follows: the sampled token is
kept either way, and when it differs from the draft it is the correction and the run ends.
So every appended token is drawn from exactly the distribution a plain step would draw it
from, with one draw of the sequence's generator per token: greedy and seeded outputs equal
those without speculation.

This is vLLM's rejection sampler for drafts without probabilities (n-gram, suffix, greedy
drafts), which accepts draft ``d`` with probability ``p(d)`` and otherwise draws from ``p``
with ``d`` removed: drawing ``t ~ p`` and accepting when ``t == d`` does both with one draw.
Drafts a draft model sampled from its own ``q`` (``ScheduledSeq.draft_probs``) are kept with
probability ``min(1, p(d)/q(d))``, else the token is drawn from ``normalize(max(0, p - q))``
(``Sampler.verify``): also exactly ``p``, and accepted more often. There a seeded request is
reproducible run to run but its tokens differ from those of a run without speculation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from services.engine.executor import Executor
    from services.engine.output_processor import OutputProcessor, RequestState
    from services.engine.outputs import TokenLogprobs
    from services.engine.scheduler import Scheduler
    from services.engine.scheduler_output import ScheduledSeq, SchedulerOutput


def append_sampled(
    sched: SchedulerOutput,
    logits: torch.Tensor,
    failed: dict[str, str],
    executor: Executor,
    outputs: OutputProcessor,
    scheduler: Scheduler,
    failure: Callable[[str, BaseException], str],
) -> dict[str, RequestState]:
    """Sample the step's sampling sequences (``logits``: their ``num_logit_rows`` rows each,
    in order), append the accepted tokens, count the accepted drafts' KV; a request whose
    draw or stop check raises goes to ``failed``. Returns the requests this changed."""
    items = [s for s in sched.scheduled if s.samples]
    offsets: list[int] = []
    row = 0
    for item in items:
        offsets.append(row)
        row += item.num_logit_rows
    accepted = [0] * len(items)
    touched: dict[str, RequestState] = {}
    active = list(range(len(items)))
    now = time.monotonic()
    j = 0
    while active:
        rows = [offsets[i] + j for i in active]
        sub = logits
        if rows != list(range(logits.shape[0])):
            sub = logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]
        drawn = _draw(executor, sub, [items[i] for i in active], j, failed)
        still: list[int] = []
        for i, (token, lp) in zip(active, drawn, strict=True):
            seq, drafts = items[i].seq, items[i].draft_token_ids
            req = outputs.requests.get(seq.request_id)
            if req is None or seq.request_id in failed:
                continue  # its forward pass or sampling failed
            try:
                outputs.append(req, seq, token, lp, now)
            except Exception as exc:  # noqa: BLE001 - this request's fault alone
                failed[req.request_id] = failure("checking its new token", exc)
                continue
            touched[req.request_id] = req
            if j < len(drafts) and token == drafts[j] and not seq.is_finished:
                accepted[i] += 1
                still.append(i)
        active = still
        j += 1
    spec = scheduler.speculator
    if spec is None:
        return touched
    decodes_only = all(s.samples and s.num_known_tokens == 1 for s in sched.scheduled)
    draft_rows = sum(len(s.draft_token_ids) for s in sched.scheduled)
    spec.step_done(len(sched.scheduled), draft_rows, decodes_only)
    for i, item in enumerate(items):
        seq = item.seq
        if seq.is_finished:
            if seq.finish_reason != "abort":
                spec.finished(seq)  # its output may feed later proposals
        elif item.draft_token_ids and seq.request_id not in failed:
            spec.accept(seq, accepted[i])
        if item.draft_token_ids:
            spec.observe(seq, len(item.draft_token_ids), accepted[i])
    return touched


def _draw(
    executor: Executor,
    logits: torch.Tensor,
    items: list[ScheduledSeq],
    j: int,
    failed: dict[str, str],
) -> list[tuple[int, TokenLogprobs | None]]:
    """Round ``j``'s token per item (``logits``: one row each): a draw from the target, or
    the verification of a sampled draft token against its draft distribution."""
    seqs = [item.seq for item in items]
    verify = [
        n for n, item in enumerate(items)
        if item.draft_probs is not None and j < len(item.draft_token_ids)
    ]  # fmt: skip
    if not verify:
        return executor.sample(logits, seqs, failed)
    out: list[tuple[int, TokenLogprobs | None]] = [(-1, None)] * len(items)
    verified = set(verify)
    plain = [n for n in range(len(items)) if n not in verified]
    for rows, drafts in ((plain, None), (verify, [(items[n].draft_token_ids[j],
                         items[n].draft_probs[j]) for n in verify])):  # fmt: skip
        if rows:
            index = torch.tensor(rows, dtype=torch.long, device=logits.device)
            got = executor.sample(logits[index], [seqs[n] for n in rows], failed, drafts)
            for n, result in zip(rows, got, strict=True):
                out[n] = result
    return out
