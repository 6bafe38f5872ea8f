"""Tokens out: stop checks, detokenization and the delta ``RequestOutput`` of each request.

``OutputProcessor`` keeps the state of every request in flight (``RequestState``: its n
sequences, their detokenizers, what was already reported). After each step the engine hands
it every sampled token (``append``): it appends the token, runs the stop checks (stop ids,
EOS, stop strings, a finished grammar, ``max_tokens``, the context length), finishes the
sequence (a ``hold_kv`` one through the KV connector, which keeps its blocks), and starts
the n > 1 children once the first completion's prompt is cached. ``make_output`` then builds
the request's delta since its last output and forgets a finished request.

A migrated request (``Resume``) reports only what follows its resumed tokens:
``RequestState.reported_tokens`` starts past them and its logprobs are those of the tokens
generated here.

Where the coming features plug in:
- speculative decoding: a step accepts several tokens per sequence; ``append`` is called
  once per accepted token, in order, and stops at the first that finishes the sequence
  (the rejected rest is dropped before it reaches here).
- tensor parallelism: nothing here; outputs are processed once, on the driver rank.
- priorities: nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.engine.detokenizer import IncrementalDetokenizer
from services.engine.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler
from services.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from services.engine.kv_connector import KVConnector


@dataclass
class RequestState:
    """Engine-side state of one request: its n sequences and what was already reported."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]  # one per sequence, by its index
    pending: list[Sequence] = field(default_factory=list)  # n > 1 children awaiting the prompt
    reported_tokens: list[int] = field(default_factory=list)  # per completion
    hold_kv: bool = False  # keep the blocks after finishing (prefill side of PD)
    error: str | None = None  # set when processing it raised: it ended alone (_fail_request)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def queued(self) -> list[Sequence]:
        """The sequences to queue now; the ``pending`` rest waits for the first's prompt."""
        return self.seqs[: 1 if self.pending else len(self.seqs)]


class OutputProcessor:
    """The requests in flight and what each sampled token does to them.

    Public surface: ``requests`` (by id), ``add``, ``append`` (one sampled token),
    ``end`` (finish a request's unfinished sequences, "abort"), ``make_output`` and
    ``outputs_of`` (the deltas of the requests of some sequences).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        connector: KVConnector,
        eos_token_ids: set[int],
        max_model_len: int,
    ) -> None:
        self.scheduler = scheduler  # n > 1 children are queued on it, sequences finished
        self.connector = connector  # keeps the blocks of a finished ``hold_kv`` sequence
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.requests: dict[str, RequestState] = {}

    def add(self, req: RequestState) -> None:
        self.requests[req.request_id] = req

    def append(
        self, req: RequestState, seq: Sequence, token: int, lp: TokenLogprobs | None, now: float
    ) -> None:
        """Append ``token`` (sampled at ``now``) to ``seq`` and finish it if it stops there."""
        if seq.first_token_time is None:
            seq.first_token_time = now
        if req.pending and seq is req.seqs[0]:
            for child in req.pending:
                self.scheduler.add(child)
            req.pending = []
        seq.append_token(token)
        if lp is not None:
            seq.logprobs.append(lp)
        p = seq.params
        past_min = seq.num_output_tokens >= p.min_tokens
        stop_str = req.detoks[seq.index].add_tokens([token], check_stop=past_min)
        grammar_done = seq.structured is not None and seq.structured.advance(token)
        if past_min and token in p.stop_token_ids:
            self._finish(req, seq, "stop", token)
        elif past_min and not p.ignore_eos and token in self.eos_token_ids:
            self._finish(req, seq, "stop", None)
        elif stop_str is not None:
            self._finish(req, seq, "stop", stop_str)
        elif grammar_done:
            self._finish(req, seq, "stop")
        elif p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            self._finish(req, seq, "length")
        elif seq.num_tokens >= self.max_model_len:
            self._finish(req, seq, "length")

    def _finish(
        self, req: RequestState, seq: Sequence, reason: str, stop: str | int | None = None
    ) -> None:
        if req.hold_kv:
            self.connector.hold(req.request_id, seq, reason, stop)
        else:
            self.scheduler.finish(seq, reason, stop)

    def end(self, req: RequestState) -> None:
        """Finish every unfinished sequence of ``req`` ("abort") and free its blocks."""
        for seq in req.seqs:
            if seq.is_finished:
                continue
            if seq in req.pending:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
            else:
                self.scheduler.finish(seq, "abort")
        req.pending = []

    def make_output(self, req: RequestState) -> RequestOutput:
        """The request's delta since its last output; a finished request is forgotten."""
        outs: list[CompletionOutput] = []
        for seq in req.seqs:
            done = seq.is_finished
            start = req.reported_tokens[seq.index]
            new_ids = seq.output_token_ids[start:]
            if not new_ids and not done:
                continue
            if done and seq.finish_reason == "abort" and start == seq.num_output_tokens:
                new_ids = []
            req.reported_tokens[seq.index] = seq.num_output_tokens
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=req.detoks[seq.index].take_delta(done),
                    token_ids=new_ids,
                    logprobs=seq.logprobs[start - seq.num_resumed_tokens :]
                    if seq.params.logprobs is not None
                    else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        finished = req.finished
        if finished:
            del self.requests[req.request_id]
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outs,
            finished=finished,
            num_cached_tokens=req.seqs[0].num_cached_tokens,
            error=req.error,
        )

    def outputs_of(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """One delta per sequence whose request is still known (sequences the scheduler or
        the connector ended outside a step's tokens)."""
        reqs = (self.requests.get(seq.request_id) for seq in seqs)
        return [self.make_output(req) for req in reqs if req is not None]
