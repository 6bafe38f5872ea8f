"""Sampler with hand-made logits and real Sequence objects."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from services.engine.sampler import Sampler, _filter
from services.engine.sampling_params import SamplingParams
from services.engine.sequence import Sequence

EOS = 2


def seq_of(prompt: list[int] | None = None, output: list[int] = (), index: int = 0, **params):
    params.setdefault("max_tokens", None)
    seq = Sequence("r", prompt or [10, 11], SamplingParams(**params), index=index)
    for t in output:
        seq.append_token(t)
    return seq


def logits_from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) if p > 0 else -math.inf for p in probs]])


def draw_many(sampler: Sampler, logits: torch.Tensor, seq: Sequence, n: int) -> Counter:
    return Counter(sampler(logits, [seq]).token_ids[0] for _ in range(n))


# ---- greedy and the filters that reduce to it ------------------------------------------------


def test_greedy_is_argmax() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=g)
    seqs = [seq_of(temperature=0.0) for _ in range(6)]
    res = Sampler({EOS})(logits, seqs)
    assert res.token_ids == logits.argmax(dim=-1).tolist()
    assert res.logprobs == [None] * 6


def test_sampler_does_not_modify_the_input_logits() -> None:
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    seqs = [
        seq_of(output=[3, 3], temperature=0.8, repetition_penalty=1.5, presence_penalty=1.0),
        seq_of(temperature=0.0, min_tokens=1, stop_token_ids=[4]),
    ]
    Sampler({EOS})(logits, seqs)
    assert torch.equal(logits, before)


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1.0, "top_k": 1},
        {"temperature": 2.0, "top_k": 1},
        {"temperature": 1.0, "top_p": 1e-6},
        {"temperature": 3.0, "top_p": 1e-3},
        {"temperature": 1.0, "min_p": 1.0},
    ],
)
def test_filters_that_keep_one_token_equal_greedy(params: dict) -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 500, generator=g)
    sampler = Sampler({EOS}, seed=3)
    for _ in range(5):
        seqs = [seq_of(**params) for _ in range(8)]
        assert sampler(logits, seqs).token_ids == logits.argmax(dim=-1).tolist()


def test_top_k_keeps_exactly_the_k_best() -> None:
    logits = logits_from_probs([0.1, 0.3, 0.05, 0.25, 0.2, 0.1])
    counts = draw_many(Sampler({EOS}, seed=0), logits, seq_of(top_k=3), 600)
    assert set(counts) == {1, 3, 4}


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.5, {0}), (0.7, {0, 1}), (0.8, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_smallest_prefix_reaching_p(top_p: float, kept: set[int]) -> None:
    # Probabilities 0.5, 0.3, 0.15, 0.05: the token crossing top_p is kept.
    logits = logits_from_probs([0.15, 0.5, 0.05, 0.3])
    order = [1, 3, 0, 2]  # token ids by decreasing probability
    counts = draw_many(Sampler({EOS}, seed=1), logits, seq_of(top_p=top_p), 1500)
    assert set(counts) == {order[i] for i in kept}


def test_min_p_drops_tokens_below_fraction_of_max() -> None:
    logits = logits_from_probs([0.5, 0.2, 0.09, 0.21])
    counts = draw_many(Sampler({EOS}, seed=2), logits, seq_of(min_p=0.2), 800)
    # threshold = 0.2 * 0.5 = 0.1: only token 2 (0.09) is dropped.
    assert set(counts) == {0, 1, 3}


def test_top_k_and_top_p_combine() -> None:
    logits = logits_from_probs([0.4, 0.3, 0.2, 0.1])
    # top_k=3 renormalises to 4/9, 3/9, 2/9; top_p=0.7 then keeps tokens 0 and 1.
    counts = draw_many(Sampler({EOS}, seed=3), logits, seq_of(top_k=3, top_p=0.7), 800)
    assert set(counts) == {0, 1}


def test_rows_without_filters_pass_through_unchanged_in_mixed_batch() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 8192, generator=g) * 3
    logits[2, 0] = 30.0  # one token with float32 probability 1.0
    seqs = [seq_of(top_k=1), seq_of(), seq_of()]
    out = _filter(logits.clone(), seqs)
    assert torch.isinf(out[0]).sum() == 8191
    # No top-k, no top-p, no min-p: nothing may be dropped from these rows.
    assert torch.equal(out[1], logits[1])
    assert torch.equal(out[2], logits[2])


def test_temperature_shapes_the_distribution() -> None:
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    sampler = Sampler({EOS}, seed=5)
    cold = draw_many(sampler, logits, seq_of(temperature=0.05), 400)
    hot = draw_many(sampler, logits, seq_of(temperature=50.0), 2000)
    assert cold == Counter({0: 400})  # p(other) ~ 3 * e^-20
    assert set(hot) == {0, 1, 2, 3}
    assert all(350 < c < 650 for c in hot.values())  # close to uniform


# ---- seeds ------------------------------------------------------------------------------------


def _stream(seq: Sequence, logits: torch.Tensor, steps: int, sampler: Sampler | None = None):
    sampler = sampler or Sampler({EOS})
    return [sampler(logits, [seq]).token_ids[0] for _ in range(steps)]


def test_seeded_sampling_is_reproducible() -> None:
    logits = torch.zeros(1, 1000)  # uniform: any difference in the generator shows
    a = _stream(seq_of(seed=123, temperature=1.0), logits, 40, Sampler({EOS}, seed=0))
    b = _stream(seq_of(seed=123, temperature=1.0), logits, 40, Sampler({EOS}, seed=99))
    c = _stream(seq_of(seed=124, temperature=1.0), logits, 40)
    assert a == b
    assert a != c
    assert sum(x != y for x, y in zip(a, c, strict=True)) > 30
    # The n > 1 completions of a seeded request differ from each other.
    d = _stream(seq_of(seed=123, temperature=1.0, index=1), logits, 40)
    assert d != a


def test_seeded_sequence_is_independent_of_its_batch() -> None:
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(1, 1024, generator=g) * 2
    alone = _stream(seq_of(seed=7, temperature=0.9), logits, 40)
    assert len(set(alone)) > 10  # a spread-out distribution, so the test can tell
    mine = seq_of(seed=7, temperature=0.9)
    sampler = Sampler({EOS}, seed=1)
    together = []
    for i in range(40):
        others = [seq_of(temperature=1.3, top_k=5), seq_of(temperature=0.0), seq_of(top_p=0.5)]
        batch = [others[i % 3], mine, others[(i + 1) % 3]]
        rows = torch.cat([torch.randn(1, 1024, generator=g), logits, logits * 0.5])
        together.append(sampler(rows, batch).token_ids[1])
    assert together == alone


def test_unseeded_sampling_follows_the_sampler_seed() -> None:
    logits = torch.zeros(1, 1000)
    a = _stream(seq_of(temperature=1.0), logits, 30, Sampler({EOS}, seed=11))
    b = _stream(seq_of(temperature=1.0), logits, 30, Sampler({EOS}, seed=11))
    c = _stream(seq_of(temperature=1.0), logits, 30, Sampler({EOS}, seed=12))
    assert a == b
    assert a != c


# ---- penalties ---------------------------------------------------------------------------------


def test_repetition_penalty_values() -> None:
    seq = seq_of(prompt=[1], output=[3, 3], repetition_penalty=2.0)
    row = torch.tensor([0.5, 1.0, 4.0, -2.0, 3.0])
    Sampler({EOS})._apply_penalties(row, seq)
    # Seen tokens (prompt and output): positive logits divided, negative ones multiplied.
    assert row.tolist() == [0.5, 0.5, 4.0, -4.0, 3.0]


def test_presence_and_frequency_penalty_values() -> None:
    seq = seq_of(prompt=[1], output=[3, 3, 4], presence_penalty=0.5, frequency_penalty=0.25)
    row = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    Sampler({EOS})._apply_penalties(row, seq)
    # Only output tokens count: 3 seen twice (0.5 + 2 * 0.25), 4 once (0.5 + 0.25).
    assert row.tolist() == pytest.approx([0.0, 1.0, 2.0, 2.0, 3.25])


def test_negative_presence_penalty_encourages() -> None:
    seq = seq_of(output=[1], presence_penalty=-1.0, temperature=0.0)
    logits = torch.tensor([[1.5, 1.0, 0.0]])
    assert Sampler({EOS})(logits, [seq]).token_ids == [1]


@pytest.mark.parametrize(
    "params",
    [{"repetition_penalty": 1.3}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.2}],
)
def test_penalised_repeated_token_loses_argmax(params: dict) -> None:
    logits = torch.tensor([[0.0, 2.0, 1.9, 0.0, 0.0]])
    fresh = seq_of(prompt=[0], temperature=0.0, **params)
    repeated = seq_of(prompt=[0], output=[1], temperature=0.0, **params)
    sampler = Sampler({EOS})
    assert sampler(logits, [fresh]).token_ids == [1]
    assert sampler(logits, [repeated]).token_ids == [2]


def test_presence_penalty_ignores_prompt_tokens() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.9]])
    seq = seq_of(prompt=[1, 1, 1], temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)
    assert Sampler({EOS})(logits, [seq]).token_ids == [1]


def test_penalties_apply_per_row() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.9], [0.0, 2.0, 1.9]])
    seqs = [
        seq_of(prompt=[0], output=[1], temperature=0.0, presence_penalty=1.0),
        seq_of(prompt=[0], output=[1], temperature=0.0),
    ]
    assert Sampler({EOS})(logits, seqs).token_ids == [2, 1]


# ---- min_tokens ------------------------------------------------------------------------------


def test_min_tokens_masks_eos_and_stop_token_ids() -> None:
    logits = torch.tensor([[0.0, 1.0, 9.0, 0.0, 8.0, 5.0]])  # EOS (2) best, then 4, then 5
    sampler = Sampler({EOS})
    p = {"temperature": 0.0, "min_tokens": 2, "stop_token_ids": [4]}
    assert sampler(logits, [seq_of(**p)]).token_ids == [5]
    assert sampler(logits, [seq_of(output=[0], **p)]).token_ids == [5]
    # Once min_tokens were generated the EOS is allowed again.
    assert sampler(logits, [seq_of(output=[0, 0], **p)]).token_ids == [EOS]
    # ignore_eos: EOS is not a stop, so it is not masked; stop tokens still are.
    assert sampler(logits, [seq_of(ignore_eos=True, **p)]).token_ids == [EOS]
    logits2 = torch.tensor([[0.0, 1.0, 0.0, 0.0, 8.0, 5.0]])
    assert sampler(logits2, [seq_of(ignore_eos=True, **p)]).token_ids == [5]
    # Without min_tokens nothing is masked.
    assert sampler(logits, [seq_of(temperature=0.0, stop_token_ids=[4])]).token_ids == [EOS]


def test_min_tokens_masks_eos_when_sampling() -> None:
    logits = torch.tensor([[0.0, 0.0, 20.0, 0.0]])  # EOS has probability ~1
    seq = seq_of(temperature=1.0, min_tokens=1, seed=3)
    counts = draw_many(Sampler({EOS, 3}), logits, seq, 300)
    assert EOS not in counts and 3 not in counts
    assert set(counts) == {0, 1}


# ---- logprobs --------------------------------------------------------------------------------


def test_logprobs_from_raw_logits_before_penalties_and_temperature() -> None:
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 40, generator=g)
    seqs = [
        seq_of(output=[5, 5], logprobs=5, temperature=0.7, repetition_penalty=1.5, seed=1),
        seq_of(logprobs=0, temperature=0.0, presence_penalty=1.0, output=[9]),
        seq_of(logprobs=None),
    ]
    res = Sampler({EOS})(logits, seqs)
    ref = torch.log_softmax(logits, dim=-1)
    lp0, lp1, lp2 = res.logprobs
    assert lp2 is None
    assert lp0.token_id == res.token_ids[0]
    assert lp0.logprob == pytest.approx(float(ref[0, res.token_ids[0]]), abs=1e-6)
    assert len(lp0.top) == 5
    vals, ids = ref[0].topk(5)
    assert [t.token_id for t in lp0.top] == ids.tolist()
    assert [t.logprob for t in lp0.top] == pytest.approx(vals.tolist(), abs=1e-6)
    assert all(a.logprob >= b.logprob for a, b in zip(lp0.top, lp0.top[1:], strict=False))
    # logprobs=0: the sampled token's logprob, no alternatives.
    assert lp1.token_id == res.token_ids[1]
    assert lp1.top == []
    assert lp1.logprob == pytest.approx(float(ref[1, res.token_ids[1]]), abs=1e-6)


def test_logprob_of_greedy_token_is_the_max() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    res = Sampler({EOS})(logits, [seq_of(temperature=0.0, logprobs=3)])
    lp = res.logprobs[0]
    expected = torch.log_softmax(logits[0], dim=-1)
    assert lp.token_id == 1
    assert lp.logprob == pytest.approx(float(expected[1]))
    assert [t.token_id for t in lp.top] == [1, 2, 0]
    assert sum(math.exp(t.logprob) for t in lp.top) == pytest.approx(1.0)


def test_draw_follows_the_distribution_and_never_picks_a_token_without_mass():
    """Inverse-CDF sampling (one uniform per row): a chi-square test on 40,000 draws of a
    fixed distribution with zero-mass tokens at both ends and in the middle."""
    from services.engine.sampler import draw

    p = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    n = 40_000
    gen = torch.Generator().manual_seed(1)
    u = torch.rand(n, dtype=torch.float64, generator=gen)
    picks = torch.tensor(draw(p.expand(n, -1), u))
    counts = torch.bincount(picks, minlength=p.numel()).double()
    assert counts[p == 0].sum() == 0
    expected = p[p > 0].double() * n
    chi2 = float(((counts[p > 0] - expected) ** 2 / expected).sum())
    assert chi2 < 16.27  # 3 degrees of freedom, p = 0.001
    # The ends of [0, 1): the first and the last token with mass.
    edges = torch.tensor([0.0, 1.0 - 2**-53], dtype=torch.float64)
    assert draw(p.expand(2, -1), edges) == [1, 5]
