"""Speculative sampling keeps the target distribution: the engine's acceptance code with the
real sampler on a synthetic model (a Markov chain over 6 tokens), random drafts, 20,000
sequences; the frequencies of whole 3-token outputs against their exact probabilities
(chi-square). Also the proposers and the scheduler's lookahead slots (no model)."""

from __future__ import annotations

import itertools
import math
import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from services.engine.executor import Executor
from services.engine.sampler import Sampler
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler_output import ScheduledSeq, SchedulerOutput
from services.engine.sequence import Sequence, SequenceStatus
from services.engine.speculative.acceptance import append_sampled
from services.engine.speculative.config import SpeculativeConfig
from services.engine.speculative.ngram import NgramProposer
from services.engine.speculative.speculator import Speculator
from services.engine.speculative.suffix import SuffixProposer
from tests.engine.test_scheduler import check_state, make_sched, make_seq, step, workloads

V = 6  # tokens of the synthetic model
OUT = 3  # tokens generated per sequence
N = 20_000


class _Outputs:
    """The output processor's surface that ``append_sampled`` uses: append, stop at OUT."""

    def __init__(self, seqs: list[Sequence]) -> None:
        self.requests = {s.request_id: s for s in seqs}

    def append(self, req, seq: Sequence, token: int, lp, now: float) -> None:
        seq.append_token(token)
        if seq.num_output_tokens >= OUT:
            seq.status = SequenceStatus.FINISHED


class _Scheduler:
    speculator = None


def _fail(what: str, exc: BaseException) -> str:
    raise exc


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of the chi-square distribution (Wilson-Hilferty)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


@pytest.mark.parametrize("draft_model", [False, True])
def test_speculative_sampling_keeps_the_target_distribution(draft_model):
    """Random guesses (n-gram, suffix: kept when the target's draw equals them), or drafts a
    draft model samples from a chain of its own, kept with min(1, p/q)."""
    g = torch.Generator().manual_seed(0)
    chain = torch.randn(V, V, generator=g) * 1.5  # logits of the next token given the last
    probs = torch.softmax(chain, dim=-1)
    draft_probs = torch.softmax(torch.randn(V, V, generator=g) * 1.5, dim=-1)
    rng = random.Random(1)
    seqs = [Sequence(f"r{i}", [0], SamplingParams(temperature=1.0)) for i in range(N)]
    runner = SimpleNamespace(ranks=None)  # sampling only: no model
    executor = Executor(runner, Sampler(set(), seed=0), _fail)  # type: ignore[arg-type]
    outputs = _Outputs(seqs)
    live = list(seqs)
    while live:
        sched = SchedulerOutput()
        rows: list[torch.Tensor] = []
        # The draft model's chains of 3 drafts (each drawn from q after the one before).
        chains = [torch.tensor([s.token_ids[-1] for s in live])]
        for _ in range(3):
            chains.append(torch.multinomial(draft_probs[chains[-1]], 1, generator=g).squeeze(1))
        drafted = torch.stack(chains, dim=1).tolist()
        for seq, chain_of in zip(live, drafted, strict=True):
            seq.num_computed_tokens = seq.num_tokens - 1
            drafts = [rng.randrange(V) for _ in range(rng.randrange(4))]
            if draft_model and drafts:
                drafts = chain_of[1 : 1 + len(drafts)]
            item = ScheduledSeq(seq, 1 + len(drafts), drafts)
            if draft_model and drafts:
                item.draft_probs = draft_probs[chain_of[: len(drafts)]]
            sched.scheduled.append(item)
            # Row j: the model's logits after the sequence's tokens and drafts[:j].
            rows += [chain[t] for t in [seq.token_ids[-1], *drafts]]
        append_sampled(sched, torch.stack(rows), {}, executor, outputs, _Scheduler(), _fail)  # type: ignore[arg-type]
        live = [s for s in live if not s.is_finished]
    counts: dict[tuple[int, ...], int] = {}
    for seq in seqs:
        assert seq.num_output_tokens == OUT
        key = tuple(seq.output_token_ids)
        counts[key] = counts.get(key, 0) + 1
    # Bins with an expected count under 5 are pooled into one.
    stat, pooled_obs, pooled_exp, df = 0.0, 0, 0.0, -1
    for out in itertools.product(range(V), repeat=OUT):
        p, last = 1.0, 0
        for t in out:
            p, last = p * float(probs[last, t]), t
        expected = p * N
        if expected < 5:
            pooled_obs += counts.get(out, 0)
            pooled_exp += expected
            continue
        stat += (counts.get(out, 0) - expected) ** 2 / expected
        df += 1
    if pooled_exp:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        df += 1
    assert df > 50
    assert stat < chi2_critical(df), (stat, df)


# ---- proposers ---------------------------------------------------------------------------


def test_ngram_proposes_the_continuation_of_the_longest_latest_match():
    prop = NgramProposer(2, 4)
    # [7, 8] occurs twice before the tail; [6, 7, 8] only at the first place.
    seq = make_seq([6, 7, 8, 1, 2, 9, 7, 8, 3, 4, 6, 7, 8])
    assert prop.propose(seq, 3) == [1, 2, 9]
    seq.append_token(5)  # tail [8, 5] never seen
    assert prop.propose(seq, 3) == []
    seq = make_seq([5, 7, 8, 1, 9, 7, 8, 3, 7, 8])  # two matches of length 2: the latest
    assert prop.propose(seq, 2) == [3, 7]
    assert prop.propose(make_seq([1]), 2) == []


def test_suffix_uses_the_request_and_recent_outputs():
    prop = SuffixProposer(max_depth=8, max_cached_requests=1, min_token_prob=0.1)
    seq = make_seq([1, 2, 3, 4, 1, 2])
    assert prop.propose(seq, 2) == [3, 4]
    done = make_seq([50])
    for t in [60, 61, 62, 63]:
        done.append_token(t)
    prop.finished(done)  # its output [60, 61, 62, 63] feeds later requests
    assert prop.propose(make_seq([9, 60, 61]), 3) == [62, 63]
    other = make_seq([50])
    other.append_token(70)
    prop.finished(other)  # pushes the first output out of the window of 1
    assert prop.propose(make_seq([9, 60, 61]), 3) == []


def test_suffix_drafts_grow_with_the_matched_tail():
    """Two drafts per matched token (``suffix_max_spec_factor``): a 1-token match (chat
    repeating a common word) proposes 2, a 3-token one up to 6."""
    prop = SuffixProposer(max_depth=12, max_cached_requests=0, min_token_prob=0.1)
    assert prop.propose(make_seq([5, 1, 2, 3, 4, 6, 7, 8, 9, 1]), 8) == [2, 3]
    seq = make_seq([5, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 1, 2, 3])
    assert prop.propose(seq, 8) == [4, 6, 7, 8, 9, 10]


def test_adaptive_length_backs_off_and_probes():
    cfg = SpeculativeConfig(num_speculative_tokens=4, adaptive=True, disable_by_batch_size=2)
    spec = Speculator(cfg, 1000, make_sched().bm)
    seq = make_seq([1, 2, 3, 1, 2, 3, 1, 2])
    assert spec.drafts(seq, 100) == [3, 1, 2]  # the match ends where the context does
    for _ in range(4):
        spec.observe(seq, 4, 0)
    lengths = [len(spec.drafts(seq, 100)) for _ in range(16)]
    assert lengths.count(0) == 14 and lengths.count(1) == 2  # a probe every 8 steps
    assert spec.enabled_for(2) and not spec.enabled_for(3)
    assert spec.stats.num_drafts == 4 and spec.stats.acceptance_rate == 0.0


def test_adaptive_length_doubles_on_full_acceptance_and_halves_on_rejection():
    """A fully accepted draft doubles the next (a copy runs on); after a rejection the next
    is the accepted run plus one, but at least half the draft tried; never past the max."""
    cfg = SpeculativeConfig(num_speculative_tokens=16, disable_by_batch_size=0)
    spec = Speculator(cfg, 1000, make_sched().bm)
    seq = Sequence("r", list(range(20)), SamplingParams(max_tokens=100))
    lengths = [spec.length(seq, 100)]
    for n, accepted in [(16, 3), (8, 8), (16, 16), (16, 0), (8, 1), (4, 4), (8, 7)]:
        spec.observe(seq, n, accepted)
        lengths.append(spec.length(seq, 100))
    assert lengths == [16, 8, 16, 16, 8, 4, 8, 8]


def test_draft_tokens_per_step_are_shared_by_the_batch():
    cfg = SpeculativeConfig(num_speculative_tokens=16, disable_by_batch_size=0,
                            max_draft_tokens_per_step=32, adaptive=False)  # fmt: skip
    spec = Speculator(cfg, 1000, make_sched().bm)
    seq = Sequence("r", list(range(20)), SamplingParams(max_tokens=100))
    assert [spec.length(seq, 100, b) for b in (1, 2, 3, 8, 64)] == [16, 16, 10, 4, 1]
    spec.config.max_draft_tokens_per_step = 0  # no limit
    assert spec.length(seq, 100, 64) == 16


def test_drafts_pay_for_their_share_of_the_step():
    """Each draft must pay: after a rejection of all 16 the estimated acceptance of a draft
    is 0.5 / (0.5 + 0.6) = 0.45 (averages from priors 1 and 0.2), so the j-th draft adds a
    token with chance 0.45 ** j: 4 pay alone (0.45 ** 4 = 0.04 > 0.03), 1 beside 7 others
    (0.45 > 8 x 0.03, 0.21 is not), none beside 23 (0.72 of a step for each draft). The rule
    on the average it replaced drafted 8, 2 and 0: at batch 8 the second draft cost more
    than it gained."""
    cfg = SpeculativeConfig(num_speculative_tokens=16, disable_by_batch_size=0,
                            max_draft_tokens_per_step=0, draft_token_cost=0.03)  # fmt: skip
    spec = Speculator(cfg, 1000, make_sched().bm)
    seq = Sequence("r", list(range(20)), SamplingParams(max_tokens=100))
    assert spec.length(seq, 100) == 16
    spec.observe(seq, 16, 0)  # the length rule alone would draft 8 next
    assert [spec.length(seq, 100, b) for b in (1, 8, 24)] == [4, 1, 0]
    spec.config.draft_token_cost = 0.0
    assert spec.length(seq, 100, 24) == 8


def test_paying_drafts_is_the_marginal_rule():
    """``paying_drafts``: the longest run of drafts whose chance of acceptance (``a ** j``,
    ``a`` = accepted / (accepted + rejections)) beats the cost, checked against a brute count;
    none when the first does not pay, no limit while nothing is rejected."""
    from services.engine.speculative.speculator import NO_LIMIT, _Adapt, paying_drafts

    for acc, rej, cost in [(0.5, 0.6, 0.03), (0.5, 0.6, 0.24), (2.0, 0.5, 0.03), (6.0, 0.1, 0.24),
                           (0.27, 0.73, 0.24), (0.2, 0.8, 0.24), (1.0, 0.2, 0.03)]:  # fmt: skip
        a = acc / (acc + rej)
        want = 0
        while a ** (want + 1) > cost:
            want += 1
        assert paying_drafts(_Adapt(16, acc, rej), cost) == want, (acc, rej, cost)
    assert paying_drafts(_Adapt(16, 3.0, 0.0), 0.5) == NO_LIMIT
    assert paying_drafts(_Adapt(16, 0.0, 0.5), 0.01) == 0


def test_drafts_that_never_pay_stop_and_probe_ever_less_often():
    """Chat: a sequence whose drafts are rejected stops after two verifications; a probe
    that hits restarts it, and each stop after that halves how often it probes (every 8,
    16, 32, 64 steps, never rarer), so probes that hit before drafts that miss cost little."""
    cfg = SpeculativeConfig(num_speculative_tokens=16, disable_by_batch_size=0)
    spec = Speculator(cfg, 10_000, make_sched().bm)
    seq = Sequence("r", list(range(20)), SamplingParams(max_tokens=5000))
    lengths = []
    for _ in range(2):
        lengths.append(spec.length(seq, 100))
        spec.observe(seq, lengths[-1], 0)
    assert lengths == [16, 4] and spec.length(seq, 100) == 0
    gaps, idle = [], 1
    while len(gaps) < 6:
        k = spec.length(seq, 100)
        if k == 0:
            idle += 1
            continue
        assert k == 1  # a probe
        gaps.append(idle + 1)
        spec.observe(seq, 1, 1)  # it hits; the drafts after it miss until it stops again
        while (k := spec.length(seq, 100)) > 0:
            spec.observe(seq, k, 0)
        idle = 1
    assert gaps == [8, 16, 32, 64, 64, 64]


def test_drafts_per_step_are_a_hard_cap():
    """With more running sequences than ``max_draft_tokens_per_step`` (and no batch-size
    limit) the step's drafts stay at the cap: the first sequences draft one each."""
    sched = make_sched(num_blocks=256, max_num_seqs=16, max_num_batched_tokens=256)
    cfg = SpeculativeConfig(num_speculative_tokens=4, disable_by_batch_size=0,
                            max_draft_tokens_per_step=8, adaptive=False)  # fmt: skip
    sched.speculator = Speculator(cfg, sched.max_model_len, sched.bm)
    sched.speculator.proposer = _RandomProposer(random.Random(0), full=True)
    for i in range(12):
        sched.add(make_seq(4, start=100 * i))
    step(sched)  # the prompts
    for _ in range(3):
        out = sched.schedule()
        drafts = [len(item.draft_token_ids) for item in out.scheduled]
        assert len(drafts) == 12 and sum(drafts) == 8 and max(drafts) == 1
        sched.postprocess(out)
        for item in out.scheduled:
            item.seq.append_token(7)
            sched.speculator.accept(item.seq, 0)


# ---- the scheduler with lookahead slots (property-based) ---------------------------------


class _RandomProposer:
    """Random drafts over the workload's 4-token alphabet: some accepted, some not."""

    def __init__(self, rng: random.Random, full: bool = False) -> None:
        self.rng = rng
        self.full = full  # always ``k`` drafts

    def propose(self, seq: Sequence, k: int) -> list[int]:
        n = k if self.full else self.rng.randrange(k + 1)
        return [self.rng.randrange(4) for _ in range(n)]

    def finished(self, seq: Sequence) -> None:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=workloads())
def test_scheduler_property_with_speculation(w) -> None:
    """Block accounting, prefix-cache registration and computed KV stay right when decodes
    reserve lookahead slots and keep only the accepted drafts' KV."""
    rng = random.Random(w["seed"])
    sched = make_sched(num_blocks=w["num_blocks"], max_num_seqs=w["max_num_seqs"],
                       max_num_batched_tokens=w["max_num_batched_tokens"],
                       caching=w["caching"], block_size=w["block_size"])  # fmt: skip
    cfg = SpeculativeConfig(num_speculative_tokens=3, adaptive=False, disable_by_batch_size=0)
    sched.speculator = Speculator(cfg, sched.max_model_len, sched.bm)
    sched.speculator.proposer = _RandomProposer(rng)
    bm, bs = sched.bm, w["block_size"]
    goals: dict[int, int] = {}
    for prompt, goal, _ in w["specs"]:
        seq = make_seq(prompt)
        goals[seq.seq_id] = goal
        sched.add(seq)
    kv: dict[tuple[int, int], tuple[int, ...]] = {}
    for _ in range(3000):
        if not sched.has_work:
            break
        out = sched.schedule()
        sched.resolve_stall(out)
        assert out.num_batched_tokens <= sched.max_num_batched_tokens
        for item in out.scheduled:
            s = item.seq
            assert len(s.block_table) * bs >= s.num_computed_tokens + item.num_new_tokens
            tokens = s.token_ids + item.draft_token_ids
            for pos in range(s.num_computed_tokens, s.num_computed_tokens + item.num_new_tokens):
                bid = s.block_table[pos // bs]
                assert bm.blocks[bid].ref_count == 1 and bm.blocks[bid].block_hash is None
                kv[(bid, pos % bs)] = tuple(tokens[: pos + 1])
        sched.postprocess(out)
        for item in out.scheduled:
            if not item.samples:
                continue
            s, accepted = item.seq, 0
            for j in range(len(item.draft_token_ids) + 1):
                token = rng.randrange(4)
                s.append_token(token)
                if s.num_output_tokens >= goals[s.seq_id]:
                    sched.finish(s, "length")
                    break
                if j == len(item.draft_token_ids) or token != item.draft_token_ids[j]:
                    break
                accepted += 1
            if not s.is_finished:
                sched.speculator.accept(s, accepted)
        check_state(sched, kv)
    assert not sched.has_work
    assert bm.num_free_blocks == bm.num_blocks
