"""KV memory pressure on a real tiny model: a request waits (it is not aborted) while blocks
are held outside the batch by a finished prefill awaiting its push or a decode reservation,
and then runs to its reference output; only a request that can never fit is refused, with a
ValueError before any work; imported (PD decode) requests never run past max_num_seqs."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.engine.async_engine import AsyncLLMEngine
from services.engine.config import EngineConfig
from services.engine.llm_engine import LLMEngine
from services.engine.resume import Resume
from services.engine.sampling_params import SamplingParams
from tests.engine.test_correctness import hf_greedy

BS = 4
NUM_BLOCKS = 8  # 32 token slots
MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
FIRST_ONLY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 49000, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def config(model):
    """``config(**overrides)``: an engine config whose KV cache has ``NUM_BLOCKS`` blocks."""
    probe = LLMEngine(
        EngineConfig(model=model, dtype="float32", block_size=BS, kv_cache_bytes=1 << 20)
    )
    block_bytes = probe.runner.bytes_per_block

    def make(num_blocks: int = NUM_BLOCKS, **overrides) -> EngineConfig:
        kw = dict(
            model=model, dtype="float32", block_size=BS, kv_cache_bytes=num_blocks * block_bytes
        )
        return EngineConfig(**{**kw, **overrides})

    return make


@pytest.fixture(scope="module")
def reference(model):
    """``reference(prompt)``: transformers' greedy tokens."""
    return lambda prompt: hf_greedy(model, [prompt], MAX_TOKENS)[0][0]


def run(engine: LLMEngine) -> dict[str, list[int]]:
    """Step until every request finished; each request's output tokens."""
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)
    return out


def prefill_held(engine: LLMEngine, rid: str, prompt: list[int]) -> int:
    """Run ``prompt``'s prefill with its KV held (the prefill side of PD); its first token."""
    engine.add_request(rid, prompt, FIRST_ONLY, hold_kv=True)
    (first,) = run(engine)[rid]
    assert rid in engine.held
    return first


@pytest.mark.parametrize("holder", ["held", "reserved"])
def test_blocks_held_outside_the_batch_make_a_request_wait(config, reference, holder):
    engine = LLMEngine(config())
    assert engine.block_manager.num_blocks == NUM_BLOCKS
    if holder == "held":
        prefill_held(engine, "h", tokens(20, 1))  # 5 blocks until its push is done
        release = engine.release_held
    else:
        engine.reserve("h", tokens(20, 1), GREEDY)  # 5 blocks awaiting imported KV
        release = engine.free_reserved
    assert engine.block_manager.num_free_blocks == 3
    prompt = tokens(16, 2)  # 4 blocks, 6 with its outputs
    engine.add_request("r", prompt, GREEDY)
    for _ in range(3):
        assert engine.step() == []  # the old engine aborted it here: "kv cache too small"
        assert engine.blocked_on_memory
    assert list(engine.scheduler.waiting)[0].request_id == "r"
    release("h")
    assert run(engine) == {"r": reference(prompt)}
    assert not engine.blocked_on_memory
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_blocks == NUM_BLOCKS


def test_async_step_thread_sleeps_while_blocked_and_wakes_on_release(config, reference):
    prompt = tokens(16, 2)

    async def main() -> None:
        engine = AsyncLLMEngine(config())
        await engine.start()
        steps = 0

        def count(_engine, _outputs) -> None:
            nonlocal steps
            steps += 1

        engine.on_step = count
        task: asyncio.Task[list[int]] | None = None
        try:
            async for _ in engine.generate("h", tokens(20, 1), FIRST_ONLY, hold_kv=True):
                pass

            async def collect() -> list[int]:
                got: list[int] = []
                async for out in engine.generate("r", prompt, GREEDY):
                    got.extend(out.outputs[0].token_ids)
                    assert out.outputs[0].finish_reason != "abort"
                return got

            before = steps
            task = asyncio.create_task(collect())
            await asyncio.sleep(0.5)
            steps_while_blocked = steps - before
            assert not task.done()
            # A thread spinning on the blocked step makes thousands of steps in 0.5 s; one
            # that sleeps until woken (or 50 ms) about ten.
            assert steps_while_blocked < 100, steps_while_blocked
            await engine.call(lambda e: e.release_held("h"))
            assert await asyncio.wait_for(task, 60) == reference(prompt)
        finally:
            # NOTE: a stream cancelled after shutdown would wait forever for its abort.
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await engine.shutdown()

    asyncio.run(main())


def test_a_request_that_can_never_fit_is_refused_before_any_work(config):
    engine = LLMEngine(config())
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with pytest.raises(ValueError, match="fit in the KV cache"):
        engine.add_request("a", tokens(32, 1), GREEDY)  # 33 tokens: 9 blocks
    # The prompt fits, but not with the outputs a migrated request resumes with.
    resume = Resume(tuple(tokens(12, 3)))
    with pytest.raises(ValueError, match="fit in the KV cache"):
        engine.add_request("b", tokens(20, 2), long, resume=resume)
    with pytest.raises(ValueError, match="fit in the KV cache"):
        engine.reserve("c", tokens(20, 2), long, resume=resume)
    assert not engine.requests and not engine.scheduler.has_work and not engine.reserved
    assert engine.block_manager.num_free_blocks == NUM_BLOCKS
    # 31 + 1 tokens fill the cache exactly: accepted.
    engine.add_request("d", tokens(31, 4), FIRST_ONLY)
    assert len(run(engine)["d"]) == 1


def test_a_request_that_grows_past_the_cache_alone_is_aborted_not_left_waiting(config):
    engine = LLMEngine(config())
    engine.add_request("a", tokens(20, 1), SamplingParams(temperature=0, max_tokens=40))
    outs = []
    for _ in range(100):
        outs += engine.step()
        if not engine.has_unfinished_requests():
            break
    final = outs[-1].outputs[0]
    assert outs[-1].finished and final.finish_reason == "abort"
    assert final.stop_reason == "kv cache too small"
    # It stopped when its 33 tokens and the next one no longer fit in 8 blocks of 4.
    assert sum(len(o.outputs[0].token_ids) for o in outs) == NUM_BLOCKS * BS + 1 - 20


def test_start_reserved_at_max_num_seqs_queues_the_request(config, reference):
    """PD decode side with max_num_seqs 2: three imported requests; the third waits with its
    KV in place until a running slot frees, and every output equals the reference."""
    prefill = LLMEngine(config(num_blocks=64))
    decode = LLMEngine(config(num_blocks=64, max_num_seqs=2))
    prompts = {f"r{i}": tokens(9 + i, 10 + i) for i in range(3)}
    firsts = {}
    for rid, prompt in prompts.items():
        firsts[rid] = prefill_held(prefill, rid, prompt)
        blocks, _ = prefill.held_blocks(rid)
        data = prefill.read_kv(blocks)
        prefill.release_held(rid)
        dst, cached = decode.reserve(rid, prompt, GREEDY)
        assert cached == 0
        decode.write_kv(dst, data[:, :, : len(dst)])
    got = {}
    for rid in prompts:
        got[rid] = list(decode.start_reserved(rid, firsts[rid]).outputs[0].token_ids)
        assert len(decode.scheduler.running) <= 2
    assert [s.request_id for s in decode.scheduler.waiting] == ["r2"]
    while decode.has_unfinished_requests():
        for o in decode.step():
            got[o.request_id].extend(o.outputs[0].token_ids)
        assert len(decode.scheduler.running) <= 2
    assert got == {rid: reference(prompt) for rid, prompt in prompts.items()}
    decode.block_manager.check_invariants()
