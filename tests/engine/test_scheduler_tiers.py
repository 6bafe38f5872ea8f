"""Service tiers in the scheduler, without a model: the queues' order (tier, priority,
arrival), preemption of offline work for online work (never the reverse), the token budget
online work leaves, offline aging (the starvation bound) and the block manager's
invariants, on random workloads (hypothesis) and a few fixed ones."""

from __future__ import annotations

import math
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.engine.block_manager import BlockManager
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler
from services.engine.sequence import Sequence, SequenceStatus

BS = 4


class Clock:
    """The scheduler's clock in tests: one step is one second."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_sched(clock: Clock, aging: float = math.inf, **kw) -> Scheduler:
    bm = BlockManager(kw.pop("num_blocks", 64), kw.pop("block_size", BS), kw.pop("caching", True))
    return Scheduler(
        bm,
        kw.pop("max_num_seqs", 8),
        kw.pop("max_num_batched_tokens", 64),
        kw.pop("max_model_len", 1024),
        offline_aging_s=aging,
        max_offline_batched_tokens=kw.pop("offline_tokens", None),
        clock=clock,
        offline_step_share=kw.pop("share", None),
    )


_ids = iter(range(10**9))


def make_seq(prompt: list[int] | int, tier: str, priority: int = 0, at: float = 0.0) -> Sequence:
    if isinstance(prompt, int):
        prompt = [1000 + next(_ids) % 1000 + i for i in range(prompt)]
    params = SamplingParams(service_tier=tier, priority=priority)
    return Sequence(f"req-{next(_ids)}", prompt, params, arrival_time=at)


def step(sched: Scheduler, goals: dict[int, int], clock: Clock | None = None, delay: float = 0.0):
    """One engine step without a model; sequences finish at ``goals[seq_id]`` outputs. With
    ``clock``, the step takes 20 ms + 1 ms per token (and ``delay``: other processes) on it."""
    out = sched.schedule()
    if clock is not None:
        clock.now += 0.020 + 0.001 * out.num_batched_tokens + delay
    sched.postprocess(out)
    for item in out.scheduled:
        if item.samples:
            item.seq.append_token(7)
            if item.seq.num_output_tokens >= goals[item.seq.seq_id]:
                sched.finish(item.seq, "length")
    return out


def fit_step_cost(sched: Scheduler, clock: Clock) -> None:
    """Steps of 5, 9 and 14 tokens of the queued offline work, each costing 20 ms + 1 ms per
    token on ``clock``: two steps of different sizes fit the line exactly (20 tokens' worth)."""
    for tokens in (5, 9, 14):
        sched.policy.max_offline_batched_tokens = tokens
        out = sched.schedule()
        clock.now += 0.020 + 0.001 * out.num_batched_tokens
        sched.postprocess(out)
    sched.policy.max_offline_batched_tokens = None
    assert abs(sched.policy.step_cost.fixed_tokens - 20.0) < 1e-6


def offline_then_online(
    sched: Scheduler, clock: Clock, offline: list[int], online: int, online_goal: int
) -> tuple[list[Sequence], Sequence, dict[int, int]]:
    """Offline sequences of the prompt lengths ``offline`` queued (their goals never reached),
    the step cost fitted on them (``fit_step_cost``), then one online sequence of ``online``
    prompt tokens added that ends at ``online_goal`` outputs: (offline, online, goals)."""
    queued = [make_seq(n, "flex") for n in offline]
    seq = make_seq(online, "default")
    goals = {s.seq_id: 1000 for s in queued} | {seq.seq_id: online_goal}
    for s in queued:
        sched.add(s)
    fit_step_cost(sched, clock)
    sched.add(seq)
    return queued, seq, goals


def offline_tokens(out) -> int:
    """The offline (``flex``) tokens a step scheduled."""
    return sum(i.num_new_tokens for i in out.scheduled if i.seq.params.service_tier == "flex")


def rank(sched: Scheduler, seq: Sequence) -> tuple[int, int]:
    """(rank, priority) as tier_policy.py states it: priority 0, default 2, flex 4; a flex
    sequence without a step for ``aging`` 3 (2 without a share), for twice that 2."""
    policy, tier = sched.policy, seq.params.service_tier
    waited, aging = policy.clock() - seq.last_run_time, policy.offline_aging_s
    aged = max(seq.aged, 2 if waited >= 2 * aging else 1 if waited >= aging else 0)
    r = {"priority": 0, "default": 2, "flex": 4}[tier]
    if tier == "flex" and aged:
        r = 2 if aged == 2 or policy.offline_step_share is None else 3
    return r, seq.params.priority


# ---- fixed cases -------------------------------------------------------------------------------


def full_batch_then(tier: str, newcomer: str, goal: int):
    """Two running ``tier`` sequences fill the batch (max_num_seqs 2); then a ``newcomer``
    tier sequence (``goal`` outputs) arrives and one step runs."""
    sched = make_sched(Clock(), max_num_seqs=2)
    batch = [make_seq(5, tier) for _ in range(2)]
    goals = {s.seq_id: 100 for s in batch}
    for s in batch:
        sched.add(s)
    step(sched, goals)
    assert sched.running == batch
    new = make_seq(5, newcomer)
    goals[new.seq_id] = goal
    sched.add(new)
    return sched, batch, new, goals, step(sched, goals)


def test_online_arrival_preempts_offline_batch_for_its_slot() -> None:
    sched, offline, online, goals, out = full_batch_then("flex", "default", 3)
    # The newest offline sequence makes room; the other keeps running behind the online one.
    assert out.preempted == [offline[1]]
    assert [s.seq for s in out.scheduled] == [online, offline[0]]
    assert offline[1].status == SequenceStatus.WAITING and offline[1].block_table == []
    while not online.is_finished:
        step(sched, goals)
    step(sched, goals)
    assert offline[1] in sched.running  # it comes back once the online request is done
    sched.bm.check_invariants()


def test_offline_never_preempts_online() -> None:
    sched, _, offline, _, out = full_batch_then("default", "flex", 1)
    assert out.preempted == [] and offline in sched.waiting


def test_waiting_order_is_tier_then_priority_then_arrival() -> None:
    clock = Clock()
    sched = make_sched(clock, max_num_seqs=1)
    seqs = [
        make_seq(3, "flex", 0, at=0),
        make_seq(3, "default", 5, at=1),
        make_seq(3, "default", -1, at=2),
        make_seq(3, "priority", 9, at=3),
        make_seq(3, "default", 5, at=4),
    ]
    for s in seqs:
        sched.add(s)
    sched.schedule()
    assert sched.running == [seqs[3]]
    assert list(sched.waiting) == [seqs[2], seqs[1], seqs[4], seqs[0]]


def test_offline_gets_the_budget_online_leaves() -> None:
    clock = Clock()
    sched = make_sched(clock, max_num_batched_tokens=10)
    offline = make_seq(20, "flex")
    sched.add(offline)
    online = make_seq(8, "default")
    sched.add(online)
    out = sched.schedule()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(online, 8), (offline, 2)]


def test_offline_share_of_a_step_is_capped() -> None:
    clock = Clock()
    sched = make_sched(clock, aging=5.0, max_num_batched_tokens=10, offline_tokens=3)
    offline = [make_seq(20, "flex"), make_seq(4, "flex")]
    online = make_seq(4, "default")
    goals = {s.seq_id: 100 for s in (*offline, online)}
    for s in (*offline, online):
        sched.add(s)
    out = step(sched, goals)
    # Online takes its 4; flex gets 3 of the 6 left (the second flex waits).
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(online, 4), (offline[0], 3)]
    clock.now = 5.0  # aged: scheduled as online work, not capped any more
    out = step(sched, goals)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(online, 1), (offline[0], 9)]


def test_offline_work_takes_its_share_of_a_step_with_online_work() -> None:
    """A step costs 20 ms + 1 ms per token (the clock moves while it runs, so the scheduler
    fits the model: 20 tokens' worth of fixed cost). With online work in the engine, offline
    tokens are held to 10 % of the step's cost without them (the fraction carried to the next
    step), and to none beside an online prefill; without online work, to 2 fixed costs."""
    clock = Clock()
    sched = make_sched(clock, max_num_batched_tokens=256, share=0.1)
    offline = [make_seq(100, "flex") for _ in range(4)]
    goals = {s.seq_id: 100 for s in offline}
    for s in offline:
        sched.add(s)
    fit_step_cost(sched, clock)
    assert step(sched, goals).num_batched_tokens == 40  # no online work: 2 fixed costs
    online = make_seq(8, "default")
    goals[online.seq_id] = 100
    sched.add(online)
    out = step(sched, goals)  # its prefill (its TTFT): no offline tokens (2 on the old code)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(online, 8)]
    out = step(sched, goals)  # the online decode: 10 % of 20 + 1 tokens
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(online, 1), (offline[0], 2)]
    taken = [sum(i.num_new_tokens for i in step(sched, goals).scheduled) - 1 for _ in range(9)]
    assert sum(taken) == 21 - 2 and set(taken) == {2, 3}  # 2.1 a step (old code: 2 each)


def test_a_running_offline_request_does_not_age() -> None:
    """Aging counts from a sequence's last step: a long offline prompt served a few tokens a
    step beside online work for longer than ``aging`` keeps its offline share (aged from its
    arrival, it would take the whole budget online work leaves after 5 s)."""
    clock = Clock()
    sched = make_sched(clock, aging=5.0, max_num_batched_tokens=64, share=0.1)
    offline, online = make_seq(200, "flex"), make_seq(4, "default")
    goals = {offline.seq_id: 1, online.seq_id: 1000}
    sched.add(offline)
    sched.add(online)
    for t in range(20):
        clock.now = float(t)
        out = step(sched, goals)
        # 10 % of (24 assumed fixed tokens + 1 online decode): 2.5 a step, none beside the
        # online prefill of the first step
        want = [] if t == 0 else [2 + (t % 2 == 0)]
        assert [s.num_new_tokens for s in out.scheduled if s.seq is offline] == want, t
    assert not offline.aged


def test_an_offline_request_ages_past_a_stream_of_online_requests() -> None:
    """The starvation bound: with one running slot and an online request arriving every
    step, a flex request that arrived first runs once it has waited ``aging`` seconds (twice
    that with a step share, whose aged rank is still offline work) and the online request
    running then is done (no later online request goes first)."""
    for aging, share, expect_run in ((math.inf, None, False), (10.0, None, True),
                                     (10.0, 0.05, True)):  # fmt: skip
        clock = Clock()
        sched = make_sched(clock, aging=aging, max_num_seqs=1, share=share)
        offline = make_seq(4, "flex", at=0)
        goals = {offline.seq_id: 2}
        sched.add(offline)
        first_run = None
        for t in range(60):
            clock.now = float(t)
            s = make_seq(4, "default", at=clock.now)
            goals[s.seq_id] = 3  # each online request holds the slot 3 steps
            sched.add(s)
            out = step(sched, goals)
            if first_run is None and any(i.seq is offline for i in out.scheduled):
                first_run = t
        if expect_run:  # with a share, the slot is online work's: it takes twice as long
            assert first_run is not None and first_run <= aging * (1 if share is None else 2) + 3
            assert offline.is_finished
        else:
            assert first_run is None


def test_an_aged_offline_request_goes_first_among_offline_work_only() -> None:
    """With a share, a flex request that no step ran for ``aging`` takes a running flex
    one's slot (in an engine full of offline work it would wait for ever), not online
    work's, and stays inside the offline share of the step (aged into the default rank, it
    took the whole budget online work left)."""
    clock = Clock()
    sched = make_sched(clock, aging=5.0, max_num_seqs=2, max_num_batched_tokens=64, share=0.1)
    online, running, waiting = make_seq(4, "default"), make_seq(40, "flex"), make_seq(8, "flex")
    goals = {s.seq_id: 1000 for s in (online, running, waiting)}
    for s in (online, running, waiting):
        sched.add(s)
    for t in range(5):
        clock.now = float(t)
        assert waiting not in [i.seq for i in step(sched, goals).scheduled]
    clock.now = 5.0
    out = step(sched, goals)
    assert out.preempted == [running] and online in sched.running
    # 10 % of (24 assumed fixed tokens + 1 online decode)
    assert [(i.seq, i.num_new_tokens) for i in out.scheduled] == [(online, 1), (waiting, 2)]
    assert waiting.aged == 1


def test_online_reservation_preempts_offline_work_for_blocks() -> None:
    """The decode side of PD: an online reservation that finds the cache full frees an
    offline sequence's blocks; an offline one fails (the caller says the cache is full)."""
    clock = Clock()
    sched = make_sched(clock, num_blocks=4)
    offline = make_seq(15, "flex")
    sched.add(offline)
    step(sched, {offline.seq_id: 100})
    assert sched.bm.num_free_blocks == 0
    assert sched.allocate_imported(make_seq(8, "flex")) is None
    online = make_seq(8, "default")
    assert sched.allocate_imported(online) is not None
    assert offline.block_table == [] and offline in sched.waiting
    assert sched.preemptions_by_tier == {"priority": 0, "default": 0, "flex": 1}
    sched.bm.check_invariants()


# ---- property-based ------------------------------------------------------------------------------


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4]))
    specs = []
    for _ in range(draw(st.integers(1, 10))):
        tier = draw(st.sampled_from(["priority", "default", "default", "flex", "flex"]))
        prompt = draw(st.lists(st.integers(0, 3), min_size=1, max_size=14))
        specs.append((prompt, tier, draw(st.integers(-1, 1)), draw(st.integers(1, 6)),
                      draw(st.integers(0, 8))))  # fmt: skip
    longest = max(len(p) + out for p, _, _, out, _ in specs)
    return dict(
        block_size=block_size,
        num_blocks=-(-longest // block_size) + draw(st.sampled_from([0, 1, 2, 4, 16])),
        max_num_seqs=draw(st.integers(1, 5)),
        max_num_batched_tokens=draw(st.integers(1, 24)),
        caching=draw(st.booleans()),
        aging=draw(st.sampled_from([2.0, 5.0, math.inf])),
        offline_tokens=draw(st.sampled_from([None, None, 1, 3])),
        share=draw(st.sampled_from([None, 0.05, 0.5])),
        specs=specs,
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=workloads())
def test_tier_scheduling_property(w) -> None:
    rng = random.Random(w["seed"])
    clock = Clock()
    sched = make_sched(clock, w["aging"], num_blocks=w["num_blocks"], block_size=w["block_size"],
                       caching=w["caching"], max_num_seqs=w["max_num_seqs"],
                       offline_tokens=w["offline_tokens"], share=w["share"],
                       max_num_batched_tokens=w["max_num_batched_tokens"])  # fmt: skip
    bm = sched.bm
    pending = [(at, make_seq(p, tier, prio, at=at), out) for p, tier, prio, out, at in w["specs"]]
    goals = {s.seq_id: g for _, s, g in pending}
    last_arrival = max(at for at, _, _ in pending)
    shares = taken = 0.0  # offline tokens the share allowed / took in steps with online decodes
    for t in range(3000):
        clock.now = float(t)
        for at, seq, _ in pending:
            if at == t:
                sched.add(seq)
        if t > last_arrival and not sched.has_work:
            break
        running_before = list(sched.running)
        waiting_before = list(sched.waiting)
        keys = {s.seq_id: rank(sched, s) for s in running_before + waiting_before}
        out = sched.schedule()
        scheduled = [i.seq for i in out.scheduled]
        admitted = [s for s in scheduled if s in waiting_before]
        still_waiting = [s for s in sched.waiting if s in waiting_before]

        # -- order: nothing admitted from the queue ahead of a better queued sequence --
        for a in admitted:
            for w_ in still_waiting:
                assert keys[w_.seq_id] >= keys[a.seq_id], (a, w_)
        # -- preemption: never a sequence better than one left running --
        for p in out.preempted:
            assert p in running_before and p.block_table == []
            for r in sched.running:
                assert keys.get(r.seq_id, keys[p.seq_id]) <= keys[p.seq_id], (p, r)
        # -- budget: a worse rank gets tokens only once every better running one has --
        worst = max((keys[s.seq_id][0] for s in scheduled), default=-1)
        for r in sched.running:
            if r not in scheduled:
                assert keys[r.seq_id][0] >= worst, (r, worst)
        assert out.num_batched_tokens <= sched.max_num_batched_tokens
        # -- the offline share: the clock stands still in a step, so the fixed cost is the prior --
        # (the fraction of a token a step with online work cannot use carries to the next:
        # over the steps with online decodes, offline work takes at most the sum of their
        # shares, plus the fraction still carried; beside an online prefill, none)
        if w["share"] is not None and not out.preempted:
            online_tokens = sum(
                i.num_new_tokens for i in out.scheduled if keys[i.seq.seq_id][0] < 3
            )
            offline_tokens = out.num_batched_tokens - online_tokens
            online = any(k[0] < 3 for k in keys.values())
            prefill = any(keys[s.seq_id][0] < 3 and (s.in_prefill or not s.num_output_tokens)
                          for s in sched.running if s.seq_id in keys)  # fmt: skip
            if not online:
                assert offline_tokens <= 2 * 24, offline_tokens
            elif prefill:
                assert offline_tokens == 0, (offline_tokens, online_tokens)
            else:
                shares += w["share"] * (24 + online_tokens)
                taken += offline_tokens
                assert taken < shares + 1.0, (taken, shares)  # + what a preempting step left
        assert len(sched.running) <= sched.max_num_seqs
        if out.is_empty:
            assert out.preempted or not sched.has_work

        sched.postprocess(out)
        for item in out.scheduled:
            if item.samples:
                item.seq.append_token(rng.randrange(4))
                if item.seq.num_output_tokens >= goals[item.seq.seq_id]:
                    sched.finish(item.seq, "length")

        # -- blocks --
        bm.check_invariants()
        holders = [0] * bm.num_blocks
        for s in sched.running:
            assert s.status == SequenceStatus.RUNNING
            assert len(s.block_table) == bm.blocks_needed(s.num_computed_tokens)
            for bid in s.block_table:
                holders[bid] += 1
        for s in sched.waiting:
            assert s.block_table == [] and s.num_computed_tokens == 0
        assert holders == [b.ref_count for b in bm.blocks]
    else:
        raise AssertionError("the workload did not finish in 3000 steps")
    assert all(s.is_finished for _, s, _ in pending)
    assert bm.num_free_blocks == bm.num_blocks


def test_offline_stats_count_flex_sequences_only() -> None:
    """EngineStats' offline share (the load report's, which the router's rebalancer takes off
    the load it decides roles on): flex sequences waiting, their prompt tokens, running, and
    the blocks they hold."""
    from services.engine.tier_policy import offline_stats

    sched, offline, online, goals, _ = full_batch_then("flex", "default", 3)
    late = make_seq(9, "flex")
    sched.add(late)
    assert offline_stats(sched.waiting, sched.running) == {
        "num_offline_waiting": 2,  # the preempted one and the late one
        "num_offline_running": 1,
        "num_offline_waiting_prompt_tokens": 5 + 1 + 9,  # recomputes its prompt and output
        "num_offline_blocks": 2,
    }
    # A decode worker's PD reservations hold blocks too: a flex one counts, an online one not.
    held_off, held_on = make_seq(10, "flex"), make_seq(11, "default")
    held_off.block_table, held_on.block_table = [7, 8, 9], [10]
    assert (
        offline_stats(sched.waiting, sched.running, [held_off, held_on])["num_offline_blocks"]
        == 2 + 3
    )
