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


def test_a_wave_of_the_benchmarks_prompts_never_stalls_running_decodes() -> None:
    """With the default budget the 16 prompts that arrive together (the previous 16 ended
    in one step) are computed in one step: no running sequence's next token waits behind a
    prompt. With a budget of 1024 half of them ran in the second step, beside the first
    half's first decodes (8 decodes per wave waiting a whole prefill step: the ITL p99 of
    the served benchmark)."""
    cfg = EngineConfig()
    sched = Scheduler(BlockManager(4096, 16, True), cfg.max_num_seqs,
                      cfg.max_num_batched_tokens, 8192)  # fmt: skip
    sent = done = 0
    mixed_steps: list[tuple[int, int]] = []  # (decode rows, prompt tokens) of mixed steps

    def send() -> None:
        nonlocal sent
        prompt = [(sent * 7919 + j) % 30000 + 100 for j in range(PROMPT)]
        sched.add(Sequence(f"r{sent}", prompt, SamplingParams(max_tokens=OUTPUT)))
        sent += 1

    for _ in range(CLIENTS):
        send()
    for _ in range(10_000):
        if done == REQUESTS:
            break
        out = sched.schedule()
        assert not out.is_empty
        decodes = sum(1 for s in out.scheduled if s.seq.num_output_tokens)
        prompt_tokens = out.num_batched_tokens - decodes
        if decodes and prompt_tokens:
            mixed_steps.append((decodes, prompt_tokens))
        sched.postprocess(out)
        for item in out.scheduled:
            if item.samples:
                item.seq.append_token(7)
                if item.seq.num_output_tokens == OUTPUT:
                    sched.finish(item.seq, "length")
                    done += 1
                    if sent < REQUESTS:
                        send()  # the client's next request, there before the next step
    assert done == REQUESTS
    assert mixed_steps == []
