"""The default token budget under the serving benchmark's closed loop (issue 17): 16 clients,
128-token prompts, 64 tokens out, each finished request followed at once by the next. No
model: the real Scheduler and BlockManager, one ``schedule``/``postprocess`` per step."""

from __future__ import annotations

from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler
from services.engine.sequence import Sequence

CLIENTS, PROMPT, OUTPUT, REQUESTS = 16, 128, 64, 48


def closed_loop(cap: int, ahead: int = 0) -> list[tuple[int, int]]:
    """The benchmark's closed loop through the scheduler with ``max_prefill_tokens_while_
    decoding`` ``cap``; ``ahead`` requests start one step before the other 16 - ahead (the
    broken wave of issue 17: their successors arrive beside the others' decodes). Returns the
    (decode rows, prompt tokens) of every step that ran both."""
    cfg = EngineConfig()
    sched = Scheduler(BlockManager(4096, 16, True), cfg.max_num_seqs,
                      cfg.max_num_batched_tokens, 8192,
                      max_prefill_tokens_while_decoding=cap)  # fmt: skip
    sent = done = 0
    mixed: list[tuple[int, int]] = []

    def send() -> None:
        nonlocal sent
        prompt = [(sent * 7919 + j) % 30000 + 100 for j in range(PROMPT)]
        sched.add(Sequence(f"r{sent}", prompt, SamplingParams(max_tokens=OUTPUT)))
        sent += 1

    for _ in range(ahead):
        send()
    for n in range(10_000):
        if n == 1:
            while sent < CLIENTS:
                send()
        if done == REQUESTS:
            break
        out = sched.schedule()
        decodes = sum(1 for s in out.scheduled if s.seq.num_output_tokens)
        if decodes and out.num_batched_tokens > decodes:
            mixed.append((decodes, out.num_batched_tokens - decodes))
        sched.postprocess(out)
        for item in out.scheduled:
            if item.samples:
                item.seq.append_token(7)
                if item.seq.num_output_tokens == OUTPUT:
                    sched.finish(item.seq, "length")
                    done += 1
                    if sent < REQUESTS:
                        send()
    assert done == REQUESTS
    return mixed


def test_a_wave_of_the_benchmarks_prompts_never_stalls_running_decodes() -> None:
    """With the default budget the 16 prompts that arrive together (the previous 16 ended
    in one step) are computed in one step: no running sequence's next token waits behind a
    prompt. With a budget of 1024 half of them ran in the second step, beside the first
    half's first decodes (8 decodes per wave waiting a whole prefill step: the ITL p99 of
    the served benchmark)."""
    assert closed_loop(0) == []


def test_a_prompt_beside_running_decodes_is_chunked_and_the_wave_comes_back_together() -> None:
    """One request a step ahead of its wave: with no cap its successor arrives beside the
    other 15 decodes and its whole 128-token prompt runs in their step, wave after wave (and
    it runs ahead again: the chain of serve8's step log). With a cap of 32 only 32 prompt
    tokens go beside those decodes; the rest run with the next wave, which arrives at an
    engine with no decodes: one step, and the chain is broken after the first wave."""
    uncapped = closed_loop(0, ahead=1)
    assert (15, PROMPT) in uncapped  # the tail step, each wave
    capped = closed_loop(32, ahead=1)
    assert all(prompt <= 32 for decodes, prompt in capped if decodes >= 8)
    assert sum(d for d, _ in capped) < sum(d for d, _ in uncapped)


def test_a_wave_beside_fewer_decodes_than_prompts_is_not_capped() -> None:
    """Three requests ahead, 13 behind: the 13 arrive beside 3 decodes, far fewer than 8 a
    prompt: the wave runs in one step whatever the cap (its TTFT is worth more than three
    gaps)."""
    capped = closed_loop(32, ahead=3)
    assert any(prompt >= 13 * PROMPT for _, prompt in capped)
