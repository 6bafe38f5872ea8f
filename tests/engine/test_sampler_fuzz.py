"""Property test of the sampler: no parameter set that SamplingParams accepts, on no row of
logits (random, ties, -inf, +inf, NaN, huge), makes it raise or return a token outside the
vocabulary; values outside the documented bounds are a ValueError at construction.

Before the hardening, ``temperature=1e-38`` divided the logits into inf, the softmax gave NaN
and ``torch.multinomial`` raised inside the engine step: the step thread died and so did the
worker (a "query of death")."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.engine.sampler import MIN_LOGPROB, Sampler
from services.engine.sampling_params import SamplingParams
from services.engine.sequence import Sequence

VOCAB = 64
EOS = 2

# Values across and beyond every bound, with the float extremes.
EXTREME_FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, 1e-38, 5e-324, 1e-6, 1e-5, 1e-2, 1.0, 2.0, 10.0, 100.0, 101.0,
                     1e300, -1e-38, -1.0, math.inf, -math.inf, math.nan]),
    st.floats(allow_nan=True, allow_infinity=True),
)  # fmt: skip
EXTREME_INTS = st.one_of(
    st.sampled_from([-(2**63) - 1, -(2**63), -2, -1, 0, 1, 2, VOCAB - 1, VOCAB, 2**31 - 1,
                     2**31, 2**63 - 1, 2**63, 2**64]),
    st.integers(min_value=-(2**70), max_value=2**70),
)  # fmt: skip


@st.composite
def param_kwargs(draw: st.DrawFn) -> dict:
    kw: dict = {"max_tokens": None}
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):  # fmt: skip
        if draw(st.booleans()):
            kw[name] = draw(EXTREME_FLOATS)
    for name in ("top_k", "seed", "min_tokens"):
        if draw(st.booleans()):
            kw[name] = draw(EXTREME_INTS)
    if draw(st.booleans()):
        kw["logprobs"] = draw(st.one_of(st.none(), st.integers(-1, 25)))
    if draw(st.booleans()):
        kw["n"] = draw(st.integers(-1, 300))
    if draw(st.booleans()):
        kw["logit_bias"] = draw(
            st.dictionaries(
                st.integers(0, VOCAB - 1),
                st.one_of(st.sampled_from([-100.0, 100.0, -1e-38, 101.0, math.nan]), st.floats()),
                max_size=8,
            )
        )
    if draw(st.booleans()):
        kw["stop_token_ids"] = draw(st.lists(st.integers(0, VOCAB - 1), max_size=4))
    return kw


@st.composite
def logit_rows(draw: st.DrawFn) -> list[float]:
    kind = draw(st.sampled_from(["random", "ties", "all_-inf", "one_finite", "nan_row",
                                 "some_nan", "some_+inf", "huge"]))  # fmt: skip
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    row = torch.randn(VOCAB, generator=g) * draw(st.sampled_from([0.01, 1.0, 30.0]))
    if kind == "ties":
        row = torch.full((VOCAB,), draw(st.sampled_from([0.0, 5.0, -3.0])))
    elif kind == "all_-inf":
        row = torch.full((VOCAB,), -math.inf)
    elif kind == "one_finite":
        row = torch.full((VOCAB,), -math.inf)
        row[draw(st.integers(0, VOCAB - 1))] = 0.5
    elif kind == "nan_row":
        row = torch.full((VOCAB,), math.nan)
    elif kind == "some_nan":
        row[torch.randperm(VOCAB, generator=g)[:5]] = math.nan
    elif kind == "some_+inf":
        row[torch.randperm(VOCAB, generator=g)[:2]] = math.inf
    elif kind == "huge":
        row = torch.sign(row) * 3.0e38
    return row.tolist()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.lists(st.tuples(param_kwargs(), logit_rows(), st.lists(st.integers(0, VOCAB - 1),
                                                                      max_size=6)),
                   min_size=1, max_size=4),
)  # fmt: skip
def test_any_accepted_params_on_any_logits_sample_a_valid_token(batch) -> None:
    seqs, rows = [], []
    for kwargs, row, output in batch:
        try:
            params = SamplingParams(**kwargs)
        except ValueError:
            continue  # outside the documented bounds: refused up front, never sampled
        assert params.temperature == 0.0 or 1e-2 <= params.temperature <= 100.0
        seq = Sequence("r", [3, 4, 5], params, index=min(params.n - 1, 255))
        for t in output:
            seq.append_token(t)
        seqs.append(seq)
        rows.append(row)
    if not seqs:
        return
    logits = torch.tensor(rows, dtype=torch.float32)
    result = Sampler({EOS}, seed=0)(logits, seqs)
    assert len(result.token_ids) == len(seqs)
    for seq, token, lp in zip(seqs, result.token_ids, result.logprobs, strict=True):
        assert isinstance(token, int) and 0 <= token < VOCAB
        if seq.params.logprobs is None:
            assert lp is None
            continue
        values = [lp.logprob] + [c.logprob for c in lp.top]
        # JSON has no NaN or infinity: logprobs are finite, -inf reported as MIN_LOGPROB.
        assert all(math.isfinite(v) and MIN_LOGPROB <= v <= 0.0 for v in values)


def test_tiny_temperature_row_is_greedy() -> None:
    """The exact request that killed two of three workers: temperature 1e-38."""
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(7)) * 10
    seqs = [Sequence("r", [1], SamplingParams(temperature=t, max_tokens=None))
            for t in (1e-38, 1e-6, 0.0)]  # fmt: skip
    result = Sampler({EOS})(logits, seqs)
    assert result.token_ids == logits.argmax(dim=-1).tolist()


def test_sampling_row_with_no_mass_falls_back_to_its_argmax() -> None:
    """Every token filtered out or NaN: the draw takes the row's best token instead of
    raising (``torch.multinomial`` refuses a row of zeros or NaN)."""
    logits = torch.full((2, VOCAB), -math.inf)
    logits[1] = math.nan
    logits[0, 9] = -math.inf
    seqs = [Sequence("r", [1], SamplingParams(temperature=1.0, seed=3, max_tokens=None))
            for _ in range(2)]  # fmt: skip
    result = Sampler({EOS})(logits, seqs)
    assert all(0 <= t < VOCAB for t in result.token_ids)
    logits = torch.full((1, VOCAB), -math.inf)
    logits[0, 17] = math.inf  # a +inf logit stays the favourite (no inf - inf = NaN)
    assert Sampler({EOS})(logits, seqs[:1]).token_ids == [17]
