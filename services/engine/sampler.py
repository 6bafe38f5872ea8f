"""Turns a step's logits into next tokens: logit bias, penalties, temperature, top-k/p, min-p,
seeds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from services.engine.layers import cpu_fused
from services.engine.outputs import Logprob, TokenLogprobs
from services.engine.sequence import Sequence
from services.engine.structured_output import apply_masks

if TYPE_CHECKING:
    from services.engine.sampling_params import SamplingParams


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    def __init__(self, eos_token_ids: set[int], seed: int = 0) -> None:
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """``logits``: float32 [len(seqs), vocab], on the CPU or on the model's device. The
        rows of constrained sequences are masked first (before penalties and temperature,
        and before logprobs: as in vLLM, they are of the masked distribution). The logit bias
        comes next, with the penalties: after the logprobs, which it does not change."""
        logits = apply_masks(logits, seqs)
        if logits.device.type != "cpu":
            return self._sample_on_device(logits, seqs)
        return self._sample_on_cpu(logits, seqs)

    def _sample_on_cpu(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        tokens = self._choose(self._processed(logits, seqs), seqs)
        return SampleResult(tokens, self._logprobs(logits, seqs, tokens))

    def _processed(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """``logits`` with each row's logit bias and penalties (a copy only when a row is
        changed: at batch 64 the copy alone is a 12 MB memcpy per step, for nothing in the
        common greedy / plain-sampling case)."""
        processed = apply_logit_bias(logits, seqs)  # a copy when a row has a bias
        penalized = [i for i, seq in enumerate(seqs) if _has_penalties(seq)]
        if penalized:
            if processed is logits:
                processed = logits.clone()
            for i in penalized:
                self._apply_penalties(processed[i], seqs[i])
        return processed

    def _logprobs(
        self, logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]
    ) -> list[TokenLogprobs | None]:
        """The chosen tokens' logprobs for the rows that want them, from the model's
        distribution, before any logit bias, penalty or temperature (what vLLM reports by
        default: its "raw_logprobs")."""
        want_lp = [s.params.logprobs is not None for s in seqs]
        raw_lp = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
        logprobs: list[TokenLogprobs | None] = [None] * len(seqs)
        if raw_lp is not None:
            for i, seq in enumerate(seqs):
                if not want_lp[i]:
                    continue
                k = seq.params.logprobs or 0
                top: list[Logprob] = []
                if k:
                    vals, ids = raw_lp[i].topk(k)
                    top = [Logprob(int(t), _lp(v)) for t, v in zip(ids, vals, strict=True)]
                logprobs[i] = TokenLogprobs(tokens[i], _lp(raw_lp[i, tokens[i]]), top)
        return logprobs

    def probs(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """[len(seqs), vocab] float32 on the CPU: the distribution a plain step draws each
        row's token from (grammar mask, logit bias, penalties, temperature, top-k/p, min-p;
        one-hot on the argmax for greedy rows). Speculative verification compares it with
        the draft's."""
        return self._probs(apply_masks(logits.cpu(), seqs), seqs)

    def _probs(self, masked: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        processed = self._processed(masked, seqs)
        tokens = processed.argmax(dim=-1).tolist()
        out = torch.zeros_like(processed)
        out[torch.arange(len(seqs)), torch.tensor(tokens, dtype=torch.long)] = 1.0
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rows:
            out[rows] = row_probs(
                processed[rows], [seqs[i] for i in rows], [tokens[i] for i in rows]
            )
        return out

    def verify(
        self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[tuple[int, torch.Tensor]]
    ) -> SampleResult:
        """Speculative sampling of draft tokens drawn from a distribution of their own:
        ``drafts[i]`` is row i's draft token ``d`` and the draft's distribution ``q`` it was
        drawn from. Keeps ``d`` with probability min(1, p(d) / q(d)), else draws from
        normalize(max(0, p - q)); the result is distributed as ``p`` exactly (Leviathan et
        al. 2023; vLLM's rejection sampler). Logprobs as ``__call__``'s."""
        logits = apply_masks(logits.cpu(), seqs)
        p = self._probs(logits, seqs)
        q = torch.stack([dist for _, dist in drafts]).to(p.dtype)
        d = torch.tensor([token for token, _ in drafts], dtype=torch.long)
        # Two uniforms per row: a seeded row's from its own generator, the others' from ours.
        u = torch.empty(len(seqs), 2, dtype=torch.float64)
        unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
        if unseeded:
            u[unseeded] = torch.rand(
                len(unseeded), 2, dtype=torch.float64, generator=self.generator
            )
        for i, seq in enumerate(seqs):
            if seq.generator is not None:
                u[i] = torch.rand(2, dtype=torch.float64, generator=seq.generator)
        rows = torch.arange(len(seqs))
        # NOTE: q(d) > 0 (d was drawn from q), so this is u < p(d) / q(d).
        keep = u[:, 0] * q[rows, d].double() <= p[rows, d].double()
        residual = (p - q).clamp_(min=0.0)
        empty = ~(residual.sum(dim=-1) > 0)
        residual[empty] = p[empty]  # p <= q everywhere: p == q, and d is kept above
        drawn = torch.tensor(draw(residual, u[:, 1]), dtype=torch.long)
        tokens = torch.where(keep, d, drawn).tolist()
        return SampleResult(tokens, self._logprobs(logits, seqs, tokens))

    def _sample_on_device(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """Plain greedy rows are decided on the device (one argmax, B integers copied back,
        after the logit bias); the rows that sample, penalize or want logprobs go to the CPU
        path (unbiased: it adds the bias itself), whose seeded generators make the draws
        identical on every device."""
        tokens = apply_logit_bias(logits, seqs).argmax(dim=-1).tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(seqs)
        rows = [
            i
            for i, s in enumerate(seqs)
            if not s.params.greedy or s.params.logprobs is not None or _has_penalties(s)
        ]
        if rows:
            index = torch.tensor(rows, dtype=torch.long, device=logits.device)
            sub = self._sample_on_cpu(logits[index].cpu(), [seqs[i] for i in rows])
            for j, i in enumerate(rows):
                tokens[i] = sub.token_ids[j]
                logprobs[i] = sub.logprobs[j]
        return SampleResult(tokens, logprobs)

    @staticmethod
    def skip_draw(generator: torch.Generator, vocab_size: int) -> None:
        """Advance ``generator`` exactly as one seeded sampling step does (the draw's random
        consumption does not depend on the probabilities)."""
        torch.multinomial(torch.ones(vocab_size), 1, generator=generator)

    def _apply_penalties(self, row: torch.Tensor, seq: Sequence) -> None:
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
            vals = row[seen]
            row[seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        out = seq.output_token_ids
        if out and (p.presence_penalty or p.frequency_penalty):
            ids, counts = torch.tensor(out, dtype=torch.long).unique(return_counts=True)
            row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty
        if seq.num_output_tokens < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
            if banned:
                row[torch.tensor(sorted(banned), dtype=torch.long)] = float("-inf")

    def _choose(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        tokens = _argmax(logits)
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if not rows:
            return tokens
        probs = row_probs(logits[rows], [seqs[i] for i in rows], [tokens[i] for i in rows])
        unseeded = [j for j, i in enumerate(rows) if seqs[i].generator is None]
        if unseeded:
            u = torch.rand(len(unseeded), dtype=torch.float64, generator=self.generator)
            for j, t in zip(unseeded, draw(probs[unseeded], u), strict=True):
                tokens[rows[j]] = t
        # NOTE: a seeded row keeps torch.multinomial. A migrated request recomputes its context
        # on another worker (logits differ in the last bits) and its seeded continuation must
        # equal the unmigrated one: with multinomial it did (tests/cluster/test_migration.py,
        # n = 2 seeded completions of 200 tokens, 3 of 3); with the inverse-CDF draw it
        # diverged 2 times in 3. Why the CDF draw is the more sensitive is not established.
        for j, i in enumerate(rows):
            gen = seqs[i].generator
            if gen is not None:
                tokens[i] = int(torch.multinomial(probs[j], 1, generator=gen))
        return tokens


def _argmax(logits: torch.Tensor) -> list[int]:
    """Each row's argmax, torch's indices: the C kernel on the CPU (cpu_fused: ~2.5x torch's
    at 64 x 49,152, which does not vectorize it), else torch."""
    ops = cpu_fused.ops() if logits.device.type == "cpu" and logits.dim() == 2 else None
    if ops is None or not cpu_fused.rows(logits):
        return logits.argmax(dim=-1).tolist()
    return ops.argmax(logits)


def draw(probs: torch.Tensor, u: torch.Tensor) -> list[int]:
    """One token per row of ``probs`` [B, V] (rows with mass), by inverting the row's CDF at
    ``u`` [B] (uniform in [0, 1), float64). For requests without a seed.

    NOTE: ``torch.multinomial`` (and the exponential race vLLM uses) draws a random number
    per vocabulary entry: 14 ms of CPU for 16 rows of the default model's 49,152 tokens, a
    third of a decode step; this takes one per row and a cumulative sum (~1 ms). The sum is in
    float64 so that the CDF's rounding stays far below any probability that matters; a token
    of probability 0 is never drawn (its CDF step is empty), nor past the last token with mass.
    """
    cdf = probs.to(torch.float64).cumsum_(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    picks = torch.searchsorted(cdf, target, right=True).squeeze(1)
    last = probs.shape[1] - 1 - (probs.flip(1) > 0).to(torch.int8).argmax(dim=1)
    return torch.minimum(picks, last).tolist()


# A logprob of -inf or NaN (a masked token, a NaN row) is reported as this (vLLM's value):
# JSON has neither, and a client's parser would fail on the whole response.
MIN_LOGPROB = -9999.0


def _lp(value: torch.Tensor) -> float:
    v = float(value)
    return v if v > MIN_LOGPROB else MIN_LOGPROB  # NOTE: also catches NaN


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """``logits`` (any device) plus each row's ``logit_bias``: a new tensor, or ``logits``
    itself when no row has a bias. -inf (a masked token) stays -inf."""
    biased = [(i, seq.params) for i, seq in enumerate(seqs) if seq.params.logit_bias]
    if not biased:
        return logits
    out = logits.clone()
    for i, params in biased:
        out[i] += bias_row(params, logits.shape[-1], logits.dtype, logits.device)
    return out


def bias_row(
    params: SamplingParams, vocab: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The dense row ``params.logit_bias`` adds to a row of ``vocab`` logits (0 elsewhere:
    adding 0 changes no logit). NOTE: built once per request and kept on ``params`` (its n
    sequences share it): built each step from the dict, a bias over the whole vocabulary
    cost ~25 ms of CPU a step per sequence, holding the GIL (the worker then missed its
    liveness probes)."""
    rows: dict[tuple[int, torch.dtype, torch.device], torch.Tensor]
    rows = params.__dict__.setdefault("_bias_rows", {})  # not a field: not sent, not compared
    key = (vocab, dtype, device)
    if (row := rows.get(key)) is None:
        bias = params.logit_bias or {}
        row = torch.zeros(vocab, dtype=dtype)
        ids = torch.tensor(list(bias.keys()), dtype=torch.long)
        row.index_put_((ids,), torch.tensor(list(bias.values()), dtype=dtype), accumulate=True)
        row = rows[key] = row.to(device)
    return row


def _has_penalties(seq: Sequence) -> bool:
    """Whether ``Sampler._apply_penalties`` may change this sequence's row."""
    p = seq.params
    return (
        p.repetition_penalty != 1.0
        or (bool(p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens > 0)
        or seq.num_output_tokens < p.min_tokens
    )


def row_probs(logits: torch.Tensor, seqs: list[Sequence], fallback: list[int]) -> torch.Tensor:
    """The sampling distribution of non-greedy rows (bias and penalties already applied):
    temperature, top-k, top-p, min-p; ``fallback``: each row's token when nothing is left."""
    temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype)
    return _safe_probs(_filter(_finite(logits / temps.unsqueeze(1)), seqs), fallback)


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf (never chosen) and +inf -> the largest float (a token the model or a bias
    pushed to +inf stays the favourite, without the inf - inf = NaN of a softmax)."""
    big = torch.finfo(logits.dtype).max
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=big, neginf=float("-inf"))


def _safe_probs(logits: torch.Tensor, fallback: list[int]) -> torch.Tensor:
    """Softmax of ``logits`` (rows already ``_finite``); a row with nothing left to draw from
    (every logit -inf: masked, filtered or NaN) becomes a one-hot on its ``fallback`` token,
    so a draw never sees a row without mass (``torch.multinomial`` raised on those)."""
    probs = torch.softmax(logits, dim=-1)
    # Finite logits give finite probabilities; a row of -inf alone gives NaNs, and a NaN sum.
    bad = ~(probs.sum(dim=-1) > 0)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        probs[rows] = 0.0
        probs[rows, torch.tensor([fallback[int(r)] for r in rows])] = 1.0
    return probs


def _filter(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Apply top-k, top-p and min-p per row (rows without them pass through unchanged)."""
    vocab = logits.shape[-1]
    top_k = torch.tensor(
        [s.params.top_k if s.params.top_k > 0 else vocab for s in seqs], dtype=torch.long
    ).clamp(max=vocab)
    top_p = torch.tensor([s.params.top_p for s in seqs], dtype=logits.dtype)
    min_p = torch.tensor([s.params.min_p for s in seqs], dtype=logits.dtype)
    if bool((top_k < vocab).any()) or bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab).unsqueeze(0)
        drop = ranks >= top_k.unsqueeze(1)
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token crossing it included).
        # Only rows with top_p < 1: in float32 the cumulative sum can reach 1.0 before the
        # last token, which would cut the tail off rows that asked for no top-p at all.
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if bool((min_p > 0).any()):
        probs = torch.softmax(logits, dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits
