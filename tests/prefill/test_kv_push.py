"""KV push with the real Mooncake transfer engine between two engine processes: the prefill
engine writes a prompt's KV layer by layer into the decode engine's cache, and decoding
there gives the same tokens as one engine doing everything."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from services.engine import LLM, SamplingParams
from tests.deps import MOONCAKE, require

require("mooncake.engine", MOONCAKE)

BLOCK = 4
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def decode_process(model: str, conn) -> None:
    """Child: a decode engine with its KV cache registered with Mooncake, driven by messages."""
    from services.common.mooncake_agent import MooncakeAgent, MooncakeConfig
    from services.engine import EngineConfig
    from services.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=model, block_size=BLOCK))
    agent = MooncakeAgent(MooncakeConfig())
    layout = engine.runner.layout
    agent.register(layout.base_addr, layout.total_bytes)
    conn.send((agent.session_id, layout))
    while True:
        msg = conn.recv()
        if msg[0] == "reserve":
            _, rid, prompt = msg
            conn.send(engine.reserve(rid, prompt, GREEDY))
        elif msg[0] == "start":
            _, rid, first = msg
            tokens = list(engine.start_reserved(rid, first).outputs[0].token_ids)
            while engine.has_unfinished_requests():
                for out in engine.step():
                    tokens.extend(out.outputs[0].token_ids)
            conn.send(tokens)
        elif msg[0] == "free_blocks":
            engine.block_manager.check_invariants()
            conn.send((engine.block_manager.num_free_blocks, engine.block_manager.num_blocks))
        else:
            return


@pytest.fixture(scope="module")
def decode_peer(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=decode_process, args=(model, child), daemon=True)
    proc.start()
    assert parent.poll(120), "decode process did not start"
    session, layout = parent.recv()
    yield parent, session, layout
    parent.send(("exit",))
    proc.join(10)
    if proc.is_alive():
        proc.kill()


# 1 byte: every layer is written as soon as it is computed; the default holds this tiny
# model's layers until the end of each engine step (one write per chunk).
@pytest.mark.parametrize("min_write_bytes", [1, None])
def test_layerwise_push_matches_colocated(tiny_model_dir, decode_peer, min_write_bytes):
    from services.common.mooncake_agent import MooncakeAgent, MooncakeConfig
    from services.prefill.kv_sender import DEFAULT_MIN_WRITE_BYTES, KVSender, PushTarget

    conn, session, remote_layout = decode_peer
    model = str(tiny_model_dir("llama"))
    g = torch.Generator().manual_seed(3 if min_write_bytes else 4)  # new prompts per case
    prompts = [torch.randint(10, 49000, (n,), generator=g).tolist() for n in (7, 30, 45)]
    prompts.append(prompts[2][:40] + [11, 12, 13])  # shares 10 blocks with the previous one
    expected = [
        o.outputs[0].token_ids for o in LLM(model, block_size=BLOCK).generate(prompts, GREEDY)
    ]

    # A small step budget forces chunked prefill: blocks are pushed chunk by chunk.
    prefill = LLM(model, block_size=BLOCK, max_num_batched_tokens=16).engine
    agent = MooncakeAgent(MooncakeConfig())
    layout = prefill.runner.layout
    agent.register(layout.base_addr, layout.total_bytes)
    sender = KVSender(agent, layout, BLOCK, min_write_bytes or DEFAULT_MIN_WRITE_BYTES)
    prefill.layer_hook = sender.on_layer_done
    pushed = 0
    for i, prompt in enumerate(prompts):
        rid = f"r{min_write_bytes}-{i}"
        conn.send(("reserve", rid, prompt))
        dst_blocks, cached = conn.recv()
        if i == 3:
            assert cached >= 40  # the decode side's prefix cache: those blocks do not move
        sender.add(
            rid, PushTarget(session, remote_layout, dst_blocks, cached // BLOCK, len(prompt))
        )
        prefill.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=1), hold_kv=True)
        first = None
        while prefill.has_unfinished_requests():
            for out in prefill.step():
                first = out.outputs[0].token_ids[0]
        target = sender.wait(rid, timeout=30)
        pushed += target.bytes
        prefill.release_held(rid)
        conn.send(("start", rid, first))
        assert conn.recv() == expected[i], f"prompt {i}"
    assert pushed == agent.bytes_sent > 0
    conn.send(("free_blocks",))
    free, total = conn.recv()
    assert free == total
    assert prefill.block_manager.num_free_blocks == prefill.block_manager.num_blocks
    sender.close()


def test_push_to_unknown_session_fails_cleanly(tiny_model_dir, decode_peer):
    from services.common.mooncake_agent import MooncakeAgent, MooncakeConfig, TransferError
    from services.prefill.kv_sender import KVSender, PushTarget

    _, _, remote_layout = decode_peer
    prefill = LLM(str(tiny_model_dir("llama")), block_size=BLOCK).engine
    agent = MooncakeAgent(MooncakeConfig())
    layout = prefill.runner.layout
    agent.register(layout.base_addr, layout.total_bytes)
    sender = KVSender(agent, layout, BLOCK)
    prefill.layer_hook = sender.on_layer_done
    # Nothing listens on port 9 of loopback: every write fails.
    sender.add("x", PushTarget("127.0.0.1:9", remote_layout, list(range(8)), 0, 20))
    prefill.add_request("x", list(range(10, 30)), SamplingParams(max_tokens=1), hold_kv=True)
    while prefill.has_unfinished_requests():
        prefill.step()
    with pytest.raises(TransferError):
        sender.wait("x", timeout=30)
    prefill.release_held("x")
    assert prefill.block_manager.num_free_blocks == prefill.block_manager.num_blocks
    sender.close()
