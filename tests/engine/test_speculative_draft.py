"""Draft-model speculation: greedy output equal to the engine without speculation with a
different random draft and with the target as its own draft (which must accept almost every
draft); seeded sampling reproducible run to run; preemption and chunked prefill; no block
leaks. (The min(1, p/q) rule's distribution: test_speculative_sampling.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from services.engine import LLM, SamplingParams
from services.engine.config import EngineConfig
from tests.engine.conftest import KV_BYTES
from tests.engine.test_correctness import kv_handoff, prompts_of_mixed_lengths
from tests.engine.test_speculative import CASES, copy_bias, repetitive_prompts, run, same


def draft_engine(target: str, draft: str, k: int = 3, **kwargs):
    cfg = {"method": "draft_model", "model": draft, "num_speculative_tokens": k,
           "disable_by_batch_size": 0, "adaptive": False}  # fmt: skip
    kwargs.setdefault("kv_cache_bytes", KV_BYTES)
    return LLM(target, dtype="float32", block_size=4, speculative_config=json.dumps(cfg),
               **kwargs).engine  # fmt: skip


def _budget_blocks(ctx) -> int:
    """Run on a tensor-parallel rank: the blocks its own KV budget pays for."""
    return ctx.runner._num_kv_blocks()


@pytest.fixture(scope="module")
def draft(tiny_model_dir) -> str:
    """Another random model of another family, with the same tokenizer."""
    return str(tiny_model_dir("qwen2"))


@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_equals_no_speculation(model, draft, plain, tp):
    """A logit bias keeps both models' output within a few tokens, so that some drafts of
    the unrelated draft model are accepted and some rejected. With a target of two
    tensor-parallel ranks, the draft runs whole on the driver and both ranks verify."""
    prompts = repetitive_prompts()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                            logit_bias=copy_bias(), logprobs=2)  # fmt: skip
    engine = draft_engine(model, draft, tensor_parallel_size=tp)
    try:
        assert engine.runner.tp.size == tp and engine.executor.drafter.runner.tp.size == 1
        if tp > 1:  # the draft's KV is the driver's alone: rank 1's budget is the target's
            per_block = engine.runner.bytes_per_block
            assert engine.runner.ranks.call(_budget_blocks, timeout=30) == [KV_BYTES // per_block]
            assert engine.runner.num_blocks < KV_BYTES // per_block
        same(run(engine, prompts, params), run(plain, prompts, params))
        stats = engine.stats().spec
        assert stats is not None
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    finally:
        engine.close()


def test_target_as_its_own_draft_accepts_all(model, plain):
    prompts = prompts_of_mixed_lengths()
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    engine = draft_engine(model, model, k=4)
    # One budget for both caches, of as many blocks each.
    assert engine.runner.num_blocks == KV_BYTES // (2 * engine.runner.bytes_per_block)
    same(run(engine, prompts, params), run(plain, prompts, params))
    stats = engine.stats().spec
    assert stats is not None and stats.num_draft_tokens > 50
    assert stats.acceptance_rate > 0.95, stats


def test_seeded_sampling_is_reproducible(model):
    """With the p/q rule seeded tokens differ from those without speculation, but not from
    run to run (n = 2 children, each with its own draft draws)."""
    prompts = repetitive_prompts()[:3]
    params = SamplingParams(n=2, temperature=0.9, top_p=0.95, seed=7, max_tokens=16,
                            ignore_eos=True, logit_bias=copy_bias())  # fmt: skip
    engine = draft_engine(model, model, k=3)
    first = run(engine, prompts, params)
    engine.block_manager.reset_prefix_cache()
    assert run(engine, prompts, params) == first
    assert first[0][0][1] != first[0][1][1]  # the two children differ
    stats = engine.stats().spec
    assert stats is not None
    # Same weights, same temperature: q == p up to rounding, almost every draft is kept.
    assert stats.acceptance_rate > 0.9, stats


def test_preemption_and_chunked_prefill(model, plain):
    """A cache too small for the batch: sequences are preempted (their draft KV rebuilt on
    new blocks) and prompts chunked; greedy output unchanged, every block back."""
    prompts = prompts_of_mixed_lengths()
    prompts = prompts + [prompts[4][:40] + p for p in prompts[:3]]
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    want = run(plain, prompts, params)
    per_block = plain.runner.bytes_per_block
    small = draft_engine(
        model,
        model,
        k=4,
        kv_cache_bytes=per_block * 56,  # 28 blocks each (target, draft)
        max_num_batched_tokens=24,
    )
    same(run(small, prompts, params), want)
    assert small.scheduler.num_preemptions > 0
    stats = small.stats().spec
    assert stats is not None and stats.acceptance_rate > 0.9, stats
    assert small.block_manager.num_free_blocks == small.block_manager.num_blocks


def test_pd_decode_side_rebuilds_the_draft_kv(model, plain):
    """Only the target's KV crosses in PD: the decode side's draft computes its own from the
    prompt at the first decode (the target as its draft accepts all: the rebuilt KV is right)."""
    prompt = prompts_of_mixed_lengths()[4]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ref = run(plain, [prompt], params)[0][0][1]
    engine = draft_engine(model, model, k=3)
    first = SamplingParams(temperature=0, max_tokens=1)
    assert tuple(kv_handoff(plain, engine, prompt, first, params)) == ref
    stats = engine.stats().spec
    assert stats is not None and stats.num_draft_tokens > 5 and stats.acceptance_rate > 0.9, stats
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_sampled_grammar_and_greedy_penalties(model, draft, plain):
    """Sampled drafts against a grammar mask (a draft it forbids has p = 0: always rejected)
    and greedy drafts against penalties: outputs the grammar accepts, and greedy output with
    penalties equal to no speculation."""
    engine = draft_engine(model, draft)
    prompts = repetitive_prompts()[:3]
    penalties = CASES["penalties"]
    same(run(engine, prompts, penalties), run(plain, prompts, penalties))
    structured = CASES["structured"]
    for outs in run(engine, prompts, structured):
        assert re.fullmatch(r"(ab|cd)[a-z ]{3,12}x", outs[0][2]), outs[0][2]
    stats = engine.stats().spec
    assert stats is not None and stats.num_draft_tokens > 0


def test_draft_kv_is_trusted_only_on_the_same_blocks(model):
    """What the draft's cache holds for a sequence: the tokens it was computed for, as far as
    the sequence still has them (a rejected draft ends it) and on the blocks it was written
    to (a preempted sequence comes back on others: only the blocks it kept count)."""
    from services.engine.sequence import Sequence
    from services.engine.speculative.draft_model import _DraftKV

    proposer = draft_engine(model, model).executor.drafter
    seq = Sequence("r", list(range(100, 110)), SamplingParams())
    seq.append_token(7)
    seq.block_table = [5, 6, 9]  # block size 4: positions 0-11
    # Computed for positions 0-9 and a draft 8 at position 10 (the sequence has 7 there).
    seq.draft_state = _DraftKV([*range(100, 110), 8], 10, [5, 6, 9], None)
    assert proposer._valid(seq) == 10  # the last token is always fed again
    seq.append_token(3)
    assert proposer._valid(seq) == 10  # the draft was rejected
    seq.draft_state.tokens[10] = 7
    assert proposer._valid(seq) == 11  # ... accepted
    seq.block_table = [5, 2, 9]  # the second block was given back and another one taken
    assert proposer._valid(seq) == 4


def test_draft_model_config_errors(tmp_path):
    with pytest.raises(ValueError, match="need a 'model'"):
        EngineConfig(speculative_config='{"method": "draft_model"}')
    with pytest.raises(ValueError, match="need a 'model'"):
        EngineConfig(speculative_config='{"method": "ngram", "model": "x"}')


def biased_eagle3_head(target: str, out) -> str:
    """``build_eagle3_head`` over a 4,096-token draft vocabulary that holds the tokens
    ``copy_bias()`` favours (so some drafts are accepted)."""
    bias = copy_bias()
    return build_eagle3_head(target, out, sorted(set(range(100, 4100 - len(bias))) | set(bias)))


def build_eagle3_head(target: str, out, draft_vocab: list[int], seed: int = 0) -> str:
    """A random EAGLE-3 head for ``target`` in the public checkpoint format: config.json as
    vLLM's ``LlamaForCausalLMEagle3`` reads it and ``pytorch_model.bin`` with the EAGLE-3
    names (``midlayer.*``, ``fc``, ``norm``, ``lm_head`` over ``draft_vocab``, ``d2t``, ``t2d``;
    no embedding: the target's is shared)."""
    import torch

    tcfg = json.loads((Path(target) / "config.json").read_text())
    hidden, vocab, heads, kv, inter = tcfg["hidden_size"], tcfg["vocab_size"], 4, 2, 96
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads,
        "num_key_value_heads": kv, "num_hidden_layers": 1, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
        "vocab_size": vocab, "draft_vocab_size": len(draft_vocab), "tie_word_embeddings": False,
        # The tiny target has 2 layers: vLLM's default (2, L/2, L-3) needs at least 4.
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 1]},
    }  # fmt: skip
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    ids = torch.tensor(sorted(draft_vocab))
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    weights = {
        "fc.weight": w(hidden, 3 * hidden),
        "midlayer.self_attn.q_proj.weight": w(heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": w(kv * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": w(kv * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": w(hidden, heads * head_dim),
        "midlayer.mlp.gate_proj.weight": w(inter, hidden),
        "midlayer.mlp.up_proj.weight": w(inter, hidden),
        "midlayer.mlp.down_proj.weight": w(hidden, inter),
        "midlayer.input_layernorm.weight": torch.ones(hidden),
        "midlayer.hidden_norm.weight": torch.ones(hidden),
        "midlayer.post_attention_layernorm.weight": torch.ones(hidden),
        "norm.weight": torch.ones(hidden),
        "lm_head.weight": w(len(draft_vocab), hidden),
        "d2t": ids - torch.arange(len(draft_vocab)),
        "t2d": t2d,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    torch.save(weights, out / "pytorch_model.bin")
    return str(out)


def test_eagle3_head_greedy_equals_no_speculation(model, plain, tmp_path):
    """A random head over a 4,096-token draft vocabulary that holds the biased tokens: its
    drafts are verified exactly whatever they are (some accepted, most not)."""
    bias = copy_bias()
    head = biased_eagle3_head(model, tmp_path / "eagle3")
    cfg = {"method": "eagle3", "model": head, "num_speculative_tokens": 3,
           "disable_by_batch_size": 0, "adaptive": False}  # fmt: skip
    engine = LLM(model, dtype="float32", block_size=4, kv_cache_bytes=KV_BYTES,
                 speculative_config=json.dumps(cfg)).engine  # fmt: skip
    prompts = repetitive_prompts()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logit_bias=bias,
                            logprobs=1)  # fmt: skip
    same(run(engine, prompts, params), run(plain, prompts, params))
    stats = engine.stats().spec
    assert stats is not None
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens, stats
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_eagle3_preempted_sequences_hold_no_hidden_states(model, plain, tmp_path):
    """A cache too small for the batch: a preempted sequence drops the target states filed
    for the head (it files new ones when recomputed); outputs stay equal, blocks come back."""
    from services.engine.speculative.eagle3 import _EagleState

    head = build_eagle3_head(model, tmp_path / "eagle3", list(range(100, 4100)))
    cfg = {"method": "eagle3", "model": head, "num_speculative_tokens": 3,
           "disable_by_batch_size": 0, "adaptive": False}  # fmt: skip
    per_block = plain.runner.bytes_per_block
    engine = LLM(model, dtype="float32", block_size=4, kv_cache_bytes=per_block * 56,
                 max_num_batched_tokens=24, speculative_config=json.dumps(cfg)).engine  # fmt: skip
    prompts = prompts_of_mixed_lengths()
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    want = run(plain, prompts, params)
    held_while_waiting = []

    def step():
        outs = real_step()
        for seq in engine.scheduler.waiting:
            state = seq.draft_state
            if isinstance(state, _EagleState) and state.hidden is not None:
                held_while_waiting.append(seq.seq_id)
        return outs

    real_step, engine.step = engine.step, step
    same(run(engine, prompts, params), want)
    assert engine.scheduler.num_preemptions > 0
    assert held_while_waiting == []
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_eagle3_pd_decode_side_drafts_only_from_filed_states(model, plain, tmp_path, monkeypatch):
    """The decode side of PD has no target states for the imported prompt: its first decode
    verifies no placeholder drafts (copies of the last token); the next ones draft from the
    states their steps filed. Output equal to the engine without speculation."""
    import services.engine.speculative.eagle3 as eagle3

    placeholders = []
    real = eagle3.no_drafts
    monkeypatch.setattr(
        eagle3, "no_drafts", lambda items: (placeholders.extend(items), real(items))
    )
    head = build_eagle3_head(model, tmp_path / "eagle3", list(range(100, 4100)))
    cfg = {"method": "eagle3", "model": head, "num_speculative_tokens": 3,
           "disable_by_batch_size": 0, "adaptive": False}  # fmt: skip
    engine = LLM(model, dtype="float32", block_size=4, kv_cache_bytes=KV_BYTES,
                 speculative_config=json.dumps(cfg)).engine  # fmt: skip
    prompt = prompts_of_mixed_lengths()[4]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = run(plain, [prompt], params)[0][0][1]
    first = SamplingParams(temperature=0, max_tokens=1)
    assert tuple(kv_handoff(plain, engine, prompt, first, params)) == ref
    assert placeholders == []
    stats = engine.stats().spec
    assert stats is not None and stats.num_drafts > 0


def eagle3_reference_draft(target: str, head: str, tokens: list[int]) -> int:
    """The head's first draft after ``tokens`` (the prompt and the target's first token),
    computed from the checkpoint files alone: transformers' hidden states of the target
    (inputs of layers 0, 1, 1), fc, the midlayer over [norm(embedding of the next token),
    norm(state)] with causal attention and RoPE, norm, lm_head, d2t."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    w = torch.load(Path(head) / "pytorch_model.bin", weights_only=True)
    cfg = json.loads((Path(head) / "config.json").read_text())
    heads, kv, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]

    def norm(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rope(x, pos):  # x [n, h, d], Llama's rotate-half
        d = x.shape[-1]
        inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        ang = torch.cat([pos[:, None] * inv] * 2, dim=-1)[:, None, :]
        half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1)
        return x * ang.cos() + half * ang.sin()

    with torch.no_grad():
        states = hf(torch.tensor([tokens[:-1]]), output_hidden_states=True).hidden_states
        h = torch.cat([states[0], states[1], states[1]], dim=-1)[0] @ w["fc.weight"].T
        emb = hf.model.embed_tokens(torch.tensor(tokens[1:]))
        x = torch.cat([norm(emb, w["midlayer.input_layernorm.weight"]),
                       norm(h, w["midlayer.hidden_norm.weight"])], dim=-1)  # fmt: skip
        n, pos = x.shape[0], torch.arange(x.shape[0], dtype=torch.float32)
        q = rope((x @ w["midlayer.self_attn.q_proj.weight"].T).view(n, heads, -1), pos)
        k = rope((x @ w["midlayer.self_attn.k_proj.weight"].T).view(n, kv, -1), pos)
        v = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(n, kv, -1)
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                           v.transpose(0, 1), is_causal=True)  # fmt: skip
        total = h + o.transpose(0, 1).reshape(n, -1) @ w["midlayer.self_attn.o_proj.weight"].T
        m = norm(total, w["midlayer.post_attention_layernorm.weight"])
        gate, up = m @ w["midlayer.mlp.gate_proj.weight"].T, m @ w["midlayer.mlp.up_proj.weight"].T
        out = total + (F.silu(gate) * up) @ w["midlayer.mlp.down_proj.weight"].T
        d = int((norm(out[-1], w["norm.weight"]) @ w["lm_head.weight"].T).argmax())
    return d + int(w["d2t"][d])


@pytest.mark.parametrize("family, tp", [("llama", 1), ("qwen3", 1), ("llama", 2)])
def test_eagle3_first_draft_equals_a_reference(tiny_model_dir, family, tp, tmp_path, monkeypatch):
    """The hidden states of the right target layers reach the head, shifted by one token,
    and its draft vocabulary maps to the target's: the engine's first draft equals one
    computed from the checkpoint files with transformers (Llama and Qwen3 targets; with a
    target of two tensor-parallel ranks the head runs whole on the driver, with the target's
    whole embedding)."""
    from services.engine.speculative import eagle3

    model = str(tiny_model_dir(family))
    draft_vocab = list(range(7, 49152, 3))
    head = build_eagle3_head(model, tmp_path / "eagle3", draft_vocab, seed=1)
    cfg = {"method": "eagle3", "model": head, "num_speculative_tokens": 2,
           "disable_by_batch_size": 0, "adaptive": False}  # fmt: skip
    engine = LLM(model, dtype="float32", block_size=4, kv_cache_bytes=KV_BYTES,
                 speculative_config=json.dumps(cfg), tensor_parallel_size=tp).engine  # fmt: skip
    seen: list[tuple[list[int], int]] = []
    original = eagle3.Eagle3Proposer._draft

    def spy(self, items, batch, first):
        original(self, items, batch, first)
        seen.extend((list(s.seq.token_ids), s.draft_token_ids[0]) for s in items)

    monkeypatch.setattr(eagle3.Eagle3Proposer, "_draft", spy)
    prompts = prompts_of_mixed_lengths()[1:4]
    run(engine, prompts, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.close()
    firsts = {tuple(tokens[: len(p)]): (tokens, d) for p in prompts for tokens, d in seen
              if tokens[: len(p)] == p and len(tokens) == len(p) + 1}  # fmt: skip
    assert len(firsts) == len(prompts)
    for tokens, draft in firsts.values():
        assert draft in draft_vocab
        assert draft == eagle3_reference_draft(model, head, tokens)


def test_eagle3_whole_embedding_reads_the_targets_tensor_only(tmp_path):
    """Under tensor parallelism a head without an embedding gets the target's, read from its
    checkpoint: that exact tensor (not another ending in embed_tokens.weight, in a file sorted
    first), from the one file a sharded checkpoint's index names (the other is unreadable),
    or from a memory-mapped .bin; a .bin that cannot be mapped is a clear error."""
    from types import SimpleNamespace

    import torch
    from safetensors.torch import save_file

    from services.engine.speculative.eagle3 import whole_embedding

    emb, decoy = torch.randn(8, 4), torch.zeros(8, 4)
    target = SimpleNamespace(config=SimpleNamespace(load_format="auto"), model_path="",
                             device=torch.device("cpu"), dtype=torch.float32)  # fmt: skip

    def read(folder: Path) -> torch.Tensor:
        target.model_path = str(folder)
        return whole_embedding(target).weight  # type: ignore[arg-type]

    shards = tmp_path / "shards"
    shards.mkdir()
    save_file({"model.mtp.embed_tokens.weight": decoy}, shards / "a.safetensors")
    save_file({"model.embed_tokens.weight": emb}, shards / "b.safetensors")
    assert torch.equal(read(shards), emb)  # the old scan took a's decoy
    weight_map = {"model.mtp.embed_tokens.weight": "a.safetensors",
                  "model.embed_tokens.weight": "b.safetensors"}  # fmt: skip
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (shards / "a.safetensors").write_bytes(b"not safetensors")
    assert torch.equal(read(shards), emb)
    bins = tmp_path / "bins"
    bins.mkdir()
    torch.save({"model.mtp.embed_tokens.weight": decoy, "embed_tokens.weight": emb},
               bins / "pytorch_model.bin")  # fmt: skip
    assert torch.equal(read(bins), emb)
    torch.save({"embed_tokens.weight": emb}, bins / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)  # fmt: skip
    with pytest.raises(ValueError, match="memory-mapped"):
        read(bins)
    with pytest.raises(ValueError, match="no model.embed_tokens.weight"):
        read(tmp_path)
