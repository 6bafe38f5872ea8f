"""logit_bias: validation, the sampler (CPU and device paths) and the offline engine against a
transformers reference (logits + bias, argmax, step by step)."""

from __future__ import annotations

import math

import pytest
import torch

from services.engine import LLM, SamplingParams
from services.engine.sampler import Sampler, apply_logit_bias
from services.engine.sequence import Sequence
from tests.conftest import TINY_KV_BYTES

EOS = 2
MAX_TOKENS = 10
PROMPTS = [[5, 100, 2000, 300], [17, 42, 4242, 999, 31337, 12], [7]]


def seq_of(output: list[int] = (), **params) -> Sequence:
    params.setdefault("max_tokens", None)
    seq = Sequence("r", [10, 11], SamplingParams(**params))
    for t in output:
        seq.append_token(t)
    return seq


# ---- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bias", "message"),
    [
        ({5: 100.5}, r"logit_bias values must be numbers in \[-100, 100\], got 100\.5 for 5"),
        ({5: -101}, r"logit_bias values must be numbers in \[-100, 100\], got -101"),
        ({5: math.nan}, r"logit_bias values must be numbers in \[-100, 100\], got nan"),
        ({5: math.inf}, r"logit_bias values"),
        ({5: "1"}, r"logit_bias values"),
        ({5: True}, r"logit_bias values"),
        ({-1: 1.0}, r"logit_bias keys must be token ids >= 0, got -1"),
        ({"5": 1.0}, r"logit_bias keys must be token ids >= 0, got '5'"),
        ({1.0: 1.0}, r"logit_bias keys"),
        ({True: 1.0}, r"logit_bias keys"),
        ([(5, 1.0)], r"logit_bias must be a dict"),
    ],
)
def test_bad_logit_bias_raises(bias, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(logit_bias=bias)


def test_logit_bias_values_become_floats() -> None:
    assert SamplingParams(logit_bias={3: -100, 4: 0.5, 0: 100}).logit_bias == {
        3: -100.0,
        4: 0.5,
        0: 100.0,
    }
    assert SamplingParams().logit_bias is None


# ---- the sampler -----------------------------------------------------------------------------


def test_apply_logit_bias_adds_per_row_and_keeps_the_input() -> None:
    logits = torch.zeros(3, 8)
    logits[1, 4] = -math.inf
    seqs = [seq_of(logit_bias={1: 2.5, 7: -1.0}), seq_of(), seq_of(logit_bias={4: 100.0})]
    out = apply_logit_bias(logits, seqs)
    want = torch.zeros(3, 8)
    want[0, 1], want[0, 7], want[1, 4], want[2, 4] = 2.5, -1.0, -math.inf, 100.0
    assert torch.equal(out, want)
    assert logits.count_nonzero() == 1  # the input is not modified
    assert apply_logit_bias(logits, [seq_of(), seq_of(), seq_of()]) is logits  # no copy


class _Reads(dict):
    """A logit_bias that counts how often its ids and values are read."""

    reads = 0

    def keys(self):
        self.reads += 1
        return super().keys()

    def values(self):
        self.reads += 1
        return super().values()

    def items(self):
        self.reads += 1
        return super().items()


def test_a_bias_is_read_once_per_request_not_at_each_step() -> None:
    """Before, each step rebuilt the bias from the dict: with a bias on every token (49,152
    ids) that was ~25 ms of CPU a step per sequence, holding the GIL (under load the worker
    missed its liveness probes and was killed). The n sequences of a request share it."""
    bias = _Reads({t: -1.0 for t in range(0, 300, 3)})
    params = seq_of(temperature=0.0).params
    params.logit_bias = bias
    seqs = [Sequence("r", [10, 11], params), seq_of(), Sequence("r", [10, 11], params)]
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(5))
    logits[0, 3] = -math.inf
    first = apply_logit_bias(logits, seqs)
    reads = bias.reads
    for _ in range(5):
        assert torch.equal(apply_logit_bias(logits, seqs), first)
    assert bias.reads == reads
    want = logits.clone()
    want[0, ::3] -= 1.0
    want[2, ::3] -= 1.0
    assert torch.equal(first, want) and first[0, 3] == -math.inf


@pytest.mark.parametrize("path", ["cpu", "device"])
def test_sampler_greedy_and_sampling_see_the_bias(path: str) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g)
    top = logits.argmax(dim=-1).tolist()
    seqs = [
        seq_of(temperature=0.0, logit_bias={17: 100.0}),
        seq_of(temperature=0.0, logit_bias={top[1]: -100.0}),
        seq_of(temperature=0.0),
        seq_of(temperature=1.0, logit_bias={250: 100.0}),
    ]
    sampler = Sampler({EOS}, seed=1)
    # ``_sample_on_device`` runs on CPU tensors too: it is the path CUDA logits take.
    sample = sampler._sample_on_cpu if path == "cpu" else sampler._sample_on_device
    before = logits.clone()
    for _ in range(20):
        tokens = sample(logits, seqs).token_ids
        assert tokens[0] == 17
        assert tokens[1] == int(logits[1].topk(2).indices[1])  # the runner-up
        assert tokens[2] == top[2]
        assert tokens[3] == 250
    assert torch.equal(logits, before)


def test_bias_comes_before_penalties_and_masks_stay() -> None:
    logits = torch.zeros(1, 20)  # the prompt is [10, 11]
    logits[0, 3] = -math.inf  # as a structured-output mask leaves it
    # +100 on a masked token cannot unmask it; min_tokens bans EOS after the bias.
    seq = seq_of(temperature=0.0, logit_bias={3: 100.0, EOS: 100.0, 6: 5.0}, min_tokens=1)
    assert Sampler({EOS})(logits, [seq]).token_ids == [6]
    # repetition_penalty divides the biased logit: (1 + 5) / 3 = 2 < 2.5.
    logits = torch.zeros(1, 20)
    logits[0, 6], logits[0, 8] = 1.0, 2.5
    seq = seq_of(output=[6], temperature=0.0, logit_bias={6: 5.0}, repetition_penalty=3.0)
    assert Sampler({EOS})(logits, [seq]).token_ids == [8]


def test_logprobs_are_of_the_unbiased_distribution() -> None:
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(3))
    raw = torch.log_softmax(logits[0], dim=-1)
    seq = seq_of(temperature=0.0, logprobs=2, logit_bias={11: 100.0})
    res = Sampler({EOS})(logits, [seq])
    assert res.token_ids == [11]
    lp = res.logprobs[0]
    assert lp.token_id == 11 and lp.logprob == pytest.approx(float(raw[11]))
    assert [c.token_id for c in lp.top] == raw.topk(2).indices.tolist()


# ---- the offline engine ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=4,
               kv_cache_bytes=TINY_KV_BYTES)  # fmt: skip


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kwargs)


def tokens_of(llm: LLM, params: SamplingParams, prompts=PROMPTS) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_plus_100_forces_the_token(llm) -> None:
    assert tokens_of(llm, greedy(logit_bias={4321: 100})) == [[4321] * MAX_TOKENS] * len(PROMPTS)


def test_minus_100_bans_the_greedy_choice(llm) -> None:
    plain = tokens_of(llm, greedy())
    for prompt, out in zip(PROMPTS, plain, strict=True):
        first = out[0]
        banned = tokens_of(llm, greedy(logit_bias={first: -100}), [prompt])[0]
        assert banned != out
        assert first not in banned


def test_sampling_with_bias(llm) -> None:
    plain = tokens_of(llm, greedy())
    banned = sorted({t for out in plain for t in out})
    params = SamplingParams(
        temperature=1.0, top_k=5, seed=11, max_tokens=MAX_TOKENS, ignore_eos=True,
        logit_bias=dict.fromkeys(banned, -100),
    )  # fmt: skip
    for out in tokens_of(llm, params):
        assert len(out) == MAX_TOKENS and not set(out) & set(banned)
    # Among only two tokens, a +100 bias wins every draw, even at a high temperature.
    forced = SamplingParams(temperature=2.0, seed=3, max_tokens=MAX_TOKENS,
                            logit_bias={99: 100, 98: 100}, ignore_eos=True)  # fmt: skip
    for out in tokens_of(llm, forced):
        assert set(out) <= {98, 99}


def test_n_completions_share_the_bias(llm) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=MAX_TOKENS,
                            ignore_eos=True, logit_bias={777: 100})  # fmt: skip
    out = llm.generate(PROMPTS[:1], params)[0]
    assert [o.token_ids for o in out.outputs] == [[777] * MAX_TOKENS] * 3
    params = SamplingParams(n=2, temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            logit_bias={777: 100})  # fmt: skip
    out = llm.generate(PROMPTS[:1], params)[0]
    assert [o.token_ids for o in out.outputs] == [[777] * MAX_TOKENS] * 2


def moderate_bias(vocab: int, seed: int = 0) -> dict[int, float]:
    """2000 random tokens with biases in [-3, 3] (the tiny model's logits have std ~1.6)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab, generator=g)[:2000].tolist()
    vals = (torch.rand(2000, generator=g) * 6 - 3).tolist()
    return dict(zip(ids, vals, strict=True))


def hf_biased_greedy(model_dir, prompts, bias: dict[int, float], max_tokens: int):
    """Reference: transformers forward passes; argmax of logits + bias at each step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    add = torch.zeros(model.config.vocab_size)
    # The wire carries float32 biases; so does the engine's addition.
    add[list(bias)] = torch.tensor(list(bias.values()), dtype=torch.float32)
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(max_tokens):
                logits = model(torch.tensor([ids])).logits[0, -1].float()
                ids.append(int((logits + add).argmax()))
            results.append(ids[len(prompt) :])
    return results


def test_moderate_bias_matches_transformers(llm, tiny_model_dir) -> None:
    bias = moderate_bias(llm.engine.runner.model.lm_head.out_features)
    got = tokens_of(llm, greedy(logit_bias=bias))
    assert got == hf_biased_greedy(tiny_model_dir("llama"), PROMPTS, bias, MAX_TOKENS)
    assert got != tokens_of(llm, greedy())  # the bias changed the output


def test_out_of_vocabulary_id_is_rejected(llm) -> None:
    vocab = llm.engine.runner.model.lm_head.out_features
    with pytest.raises(ValueError, match=rf"logit_bias token id {vocab} is not in the voc"):
        llm.generate(PROMPTS[0], greedy(logit_bias={5: 1.0, vocab: 1.0, vocab + 7: -1.0}))
    llm.generate(PROMPTS[0], greedy(logit_bias={vocab - 1: 1.0}))  # the last id is fine
