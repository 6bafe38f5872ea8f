"""Structured outputs: constrained output follows its JSON schema / regex / choice / grammar,
greedy constrained tokens equal a transformers reference masked the same way, and n > 1,
mixed batches and resumed requests keep their constraints."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import pytest
import torch

from services.engine import LLM, SamplingParams
from services.engine.resume import Resume
from services.engine.sampling_params import StructuredOutputsParams
from services.engine.sequence import Sequence
from services.engine.structured_output import StructuredOutputs, apply_masks
from tests.conftest import TINY_KV_BYTES
from tests.engine.test_correctness import DEVICES, on

SCHEMA = {
    "type": "object",
    "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["age", "color"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,5}-[0-9]{3}"
CHOICES = ["alpha", "beta", "gamma delta"]
PROMPTS = [[1, 415, 3721, 314, 253, 2040], [1, 19556, 28, 10, 901, 7, 200, 3000, 12]]


def constraint(kind: str) -> StructuredOutputsParams:
    return {
        "json": StructuredOutputsParams(json=SCHEMA),
        "regex": StructuredOutputsParams(regex=REGEX),
        "choice": StructuredOutputsParams(choice=CHOICES),
        "grammar": StructuredOutputsParams(grammar='start: "yes" | "no" | "maybe"'),
    }[kind]


def check_output(kind: str, text: str) -> None:
    if kind == "json":
        value = json.loads(text)
        assert set(value) == {"age", "color"}, text
        assert isinstance(value["age"], int) and 0 <= value["age"] <= 150, text
        assert value["color"] in ("red", "green", "blue"), text
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES
    else:
        assert text in ("yes", "no", "maybe")


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=4,
               kv_cache_bytes=TINY_KV_BYTES)  # fmt: skip


def params(kind: str, **kwargs) -> SamplingParams:
    kwargs.setdefault("max_tokens", 40)
    return SamplingParams(structured_outputs=constraint(kind), **kwargs)


@pytest.mark.parametrize("kind", ["json", "regex", "choice", "grammar"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_output_follows_the_constraint(llm, kind, temperature):
    outs = llm.generate(PROMPTS, params(kind, temperature=temperature, seed=11))
    for out in outs:
        c = out.outputs[0]
        assert c.finish_reason == "stop" and c.stop_reason is None
        check_output(kind, c.text)


def test_json_object(llm):
    so = StructuredOutputsParams(json_object=True)
    out = llm.generate("Hello there", SamplingParams(temperature=0, structured_outputs=so))[0]
    assert out.outputs[0].finish_reason == "stop"
    assert isinstance(json.loads(out.outputs[0].text), dict)


def test_n2_and_a_mixed_batch(llm):
    """Each of n completions has its own matcher; unconstrained rows of the same batch are
    not touched by the masks (their greedy output is the one of a run alone)."""
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], free)[0].outputs[0].token_ids
    n2 = params("json", temperature=1.0, seed=3, n=2)
    outs = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[0]], [n2, free, params("regex")])
    assert len(outs[0].outputs) == 2
    for c in outs[0].outputs:
        check_output("json", c.text)
    assert outs[1].outputs[0].token_ids == alone
    check_output("regex", outs[2].outputs[0].text)


def hf_masked_greedy(model_dir, prompt: list[int], so: StructuredOutputsParams) -> list[int]:
    """Reference: transformers forward passes over the whole sequence; each step's logits
    masked by an llguidance matcher built here, then argmax, until the grammar ends."""
    import llguidance
    import llguidance.hf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    tok = llguidance.hf.from_tokenizer(AutoTokenizer.from_pretrained(str(model_dir)), vocab)
    grammar = {
        "json": lambda: llguidance.LLMatcher.grammar_from_json_schema(
            so.json, defaults={"whitespace_flexible": False}
        ),
        "regex": lambda: llguidance.LLMatcher.grammar_from_regex(so.regex),
    }[so.key[0]]()
    matcher = llguidance.LLMatcher(tok, grammar)
    ids, out = list(prompt), []
    with torch.no_grad():
        while not matcher.is_stopped() and len(out) < 60:
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            mask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
            matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
            bits = (mask[0].unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1
            allowed = bits.flatten()[:vocab].bool()
            t = int(logits.masked_fill(~allowed, float("-inf")).argmax())
            assert matcher.consume_token(t)
            ids.append(t)
            out.append(t)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["json", "regex"])
def test_greedy_equals_masked_transformers(tiny_model_dir, device, kind):
    model_dir = tiny_model_dir("llama")
    so = constraint(kind)
    engine = LLM(str(model_dir), dtype="float32", **on(device))
    got = engine.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=60, structured_outputs=so)
    )
    for prompt, out in zip(PROMPTS, got, strict=True):
        ref = hf_masked_greedy(model_dir, prompt, so)
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "so",
    [
        {"json": {"type": "objectx"}},
        {"json": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}},
        {"regex": "a(b"},
        {"grammar": "start: undefined_rule"},
    ],
)
def test_a_bad_constraint_is_a_value_error(llm, so):
    with pytest.raises(ValueError, match="invalid structured_outputs"):
        llm.generate(PROMPTS[0], SamplingParams(structured_outputs=StructuredOutputsParams(**so)))
    assert not llm.engine.has_unfinished_requests()


def test_a_panic_of_the_matcher_reaches_the_client_without_its_backtrace(llm, monkeypatch):
    """llguidance's matcher panics on some grammars only with the tokenizer (a grammar of
    100,000 symbols, 8 s to reach: faked here); its message went out with the Rust backtrace."""
    import llguidance

    class Panicked:
        def __init__(self, *args) -> None:
            pass

        def is_error(self) -> bool:
            return True

        def get_error(self) -> str:
            return "panic: assertion failed: symbols\n<backtrace>\n   0: <unknown>\n   1: <unknown>"

    real = llguidance.LLMatcher
    for name in dir(real):  # the grammar compiler's class methods stay the real ones
        if not name.startswith("_") and not hasattr(Panicked, name):
            setattr(Panicked, name, getattr(real, name))
    monkeypatch.setattr(llguidance, "LLMatcher", Panicked)
    with pytest.raises(ValueError) as info:
        llm.engine.structured.new_matcher(StructuredOutputsParams(regex="[0-9]{7}"))
    assert str(info.value) == "invalid structured_outputs.regex: panic: assertion failed: symbols"


def replace_matcher_class(monkeypatch, build) -> None:
    """``llguidance.LLMatcher(...)`` calls ``build``; the grammar compiler's class methods
    stay the real ones."""
    import llguidance

    real = llguidance.LLMatcher
    monkeypatch.setattr(llguidance, "LLMatcher", build)
    for name in dir(real):
        if not name.startswith("_"):
            setattr(build, name, getattr(real, name))


def test_a_grammar_being_built_holds_no_other_request_back(llm, monkeypatch):
    """The step thread's ``new_matcher`` for a grammar already built does not wait for a
    ``prepare`` thread building another (faked: a build that waits to be released); it
    waited under the templates' lock, and every request of the worker with it."""
    import llguidance

    so = llm.engine.structured
    ready = StructuredOutputsParams(regex="[a-c]{4}")
    so.prepare(ready)
    building, release = threading.Event(), threading.Event()
    real = llguidance.LLMatcher

    def slow_build(*args):
        building.set()
        release.wait(30)
        return real(*args)

    replace_matcher_class(monkeypatch, slow_build)
    other = threading.Thread(target=so.prepare, args=(StructuredOutputsParams(regex="[d-f]{4}"),))
    other.start()
    try:
        assert building.wait(30)
        done = threading.Event()
        step = threading.Thread(target=lambda: (so.new_matcher(ready), done.set()))
        step.start()
        assert done.wait(10), "new_matcher waited for another grammar's build"
    finally:
        release.set()
        other.join(30)
        step.join(30)


def test_one_grammar_asked_for_by_many_threads_at_once_is_built_once(llm, monkeypatch):
    """Requests with the same new grammar prepared at once (a client's fan-out of one
    schema) build it once: the others wait for that build. Since the build left the lock,
    each prepare thread built it again (seconds of CPU each for a large schema, and every
    executor thread busy with it)."""
    import llguidance

    so = llm.engine.structured
    same = [StructuredOutputsParams(regex="[l-p]{7}") for _ in range(3)]
    builds, release = [], threading.Event()
    real = llguidance.LLMatcher

    def slow_build(*args):
        builds.append(args)
        release.wait(30)
        return real(*args)

    replace_matcher_class(monkeypatch, slow_build)
    threads = [threading.Thread(target=so.prepare, args=(p,)) for p in same]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    # Each thread builds or waits for a build before the builds are let go.
    while len(builds) + sum(b.waiters for b in getattr(so, "_building", {}).values()) < 3:
        assert time.monotonic() < deadline, "the threads did not all ask for the grammar"
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(30)
    assert len(builds) == 1
    assert all(p.__dict__.get("_prepared") for p in same)


def test_grammars_being_built_leave_the_default_executor_to_the_rest() -> None:
    """Many slow grammars being prepared at once (a client's) take threads of their own, not
    the event loop's default executor, which the worker's KV pushes and fences, KV staging
    and image preprocessing wait in: every thread of it was held by the builds."""
    from types import SimpleNamespace

    from services.engine import AsyncLLMEngine
    from services.engine.config import EngineConfig

    eng = AsyncLLMEngine(EngineConfig(model="m"))
    release = threading.Event()
    eng.engine = SimpleNamespace(structured=SimpleNamespace(
        prepare=lambda so: release.wait(30), prepare_cached=lambda so: False))  # fmt: skip
    params = SamplingParams(structured_outputs=StructuredOutputsParams(regex="a"))

    async def main() -> None:
        builds = [asyncio.ensure_future(eng.prepare(params)) for _ in range(40)]
        try:  # more than the default executor's threads (at most 32)
            await asyncio.wait_for(asyncio.to_thread(lambda: None), 5)
        finally:
            release.set()
            await asyncio.gather(*builds)

    asyncio.run(main())


def test_a_grammar_built_already_does_not_queue_behind_grammars_being_built(llm, monkeypatch):
    """A request whose grammar is cached (a popular schema, json_object) is prepared at once:
    it waited for a grammar thread behind other grammars being built (a client's slow regexes,
    seconds each: every constrained request of the worker with it, a PD decode side's past its
    reservation's deadline). Cached means built with its first mask (prepare's NOTE)."""
    import llguidance

    from services.engine import AsyncLLMEngine
    from services.engine.async_engine import GRAMMAR_THREADS
    from services.engine.config import EngineConfig

    so = llm.engine.structured
    so.prepare(StructuredOutputsParams(regex="[q-u]{5}"))  # built and cached
    release = threading.Event()
    real = llguidance.LLMatcher

    def slow_build(*args):
        release.wait(30)
        return real(*args)

    replace_matcher_class(monkeypatch, slow_build)
    eng = AsyncLLMEngine(EngineConfig(model="m"))
    eng.engine = llm.engine
    again = StructuredOutputsParams(regex="[q-u]{5}")  # another request of the cached grammar

    async def main() -> None:
        slow = [asyncio.ensure_future(eng.prepare(SamplingParams(
            structured_outputs=StructuredOutputsParams(regex=f"v{i}[0-9]"))))
            for i in range(GRAMMAR_THREADS + 1)]  # fmt: skip
        try:
            await asyncio.wait_for(eng.prepare(SamplingParams(structured_outputs=again)), 5)
        finally:
            release.set()
            await asyncio.gather(*slow)

    try:
        asyncio.run(main())
    finally:
        eng._grammars.shutdown(wait=False)
    assert again.__dict__["_prepared"][0] is so


def test_the_cached_grammars_are_bounded_by_their_build_cost_too(llm, monkeypatch):
    """A 12-byte regex such as (ab){500000} holds ~100 MB of lexer states (0.45-0.7 s of CPU to
    build, 49k vocabulary), and the cache kept GRAMMAR_CACHE_SIZE (64) of them whatever their
    size: 4-7 GB a client could pin in a worker with 64 small requests. Costly grammars (build
    CPU, faked here) now share a budget; the one used last is kept whatever its cost, and
    ordinary ones (a few ms) stay cached as before."""
    from services.engine import structured_output

    budget = getattr(structured_output, "GRAMMAR_CACHE_CPU_S", 1.0)
    so = StructuredOutputs(llm.engine.tokenizer, llm.engine.structured.vocab_size, [2])
    so.__dict__["tokenizer"] = llm.engine.structured.tokenizer  # built once per module
    clock = [0.0]
    monkeypatch.setattr(structured_output, "thread_time", lambda: clock[0], raising=False)
    real = so._build

    def build(key):
        clock[0] += budget * 0.6 if key[1].startswith("costly") else 0.001
        return real(key)

    monkeypatch.setattr(so, "_build", build)
    ordinary = [StructuredOutputsParams(regex=f"ordinary{i}[0-9]") for i in range(8)]
    for p in ordinary:
        so.prepare(p)
    for i in range(6):
        so.prepare(StructuredOutputsParams(regex=f"costly{i}[0-9]"))
    costly = [k for k in so._templates if k[1].startswith("costly")]
    assert costly == [("regex", "costly5[0-9]")]  # the last one only: 2 x 0.6 is over
    assert all(so.prepare_cached(p) for p in ordinary)


def test_prepare_computes_each_grammars_first_mask(llm, monkeypatch):
    """prepare() (a worker thread) computes the first mask of every grammar it is given, so
    that the step thread never builds a new grammar's lexer states (seconds for a regex like
    a{1000000}, every request of the worker waiting); it did so for the first grammar only."""
    import llguidance.torch

    masks = []
    fill = llguidance.torch.fill_next_token_bitmask
    monkeypatch.setattr(llguidance.torch, "fill_next_token_bitmask",
                        lambda *a: masks.append(a) or fill(*a))  # fmt: skip
    for regex in ("[0-9]{3}", "[a-f]{5}"):
        llm.engine.structured.prepare(StructuredOutputsParams(regex=regex))
    assert len(masks) == 2


def test_a_prepared_grammar_is_not_built_again_on_the_step_thread(llm, monkeypatch):
    """The grammar ``prepare`` built (a worker thread) is the one the step thread's
    ``new_matcher`` copies, even after more grammars than the cache holds were prepared
    meanwhile (other requests' prepares run while this one waits for the step thread): the
    evicted grammar was built again on the step thread, every request of the worker waiting
    (seconds for a regex like a{1000000})."""
    import llguidance

    from services.engine.grammar import GRAMMAR_CACHE_SIZE

    so = llm.engine.structured
    mine = StructuredOutputsParams(regex="[g-k]{6}")
    so.prepare(mine)
    for i in range(GRAMMAR_CACHE_SIZE):
        so.prepare(StructuredOutputsParams(regex=f"z{i}[0-9]"))
    builds = []
    real = llguidance.LLMatcher

    def counted(*args):
        builds.append(args)
        return real(*args)

    replace_matcher_class(monkeypatch, counted)
    matcher = so.new_matcher(mine)
    assert builds == [], "the step thread built a grammar prepare had built"
    assert not matcher.advance(llm.engine.tokenizer.encode("g", add_special_tokens=False)[0])


@pytest.mark.parametrize(
    "kwargs", [{}, {"regex": "a", "choice": ["a"]}, {"choice": []}, {"json": "{not json"}]
)
def test_exactly_one_well_formed_kind(kwargs):
    with pytest.raises(ValueError):
        StructuredOutputsParams(**kwargs)


@pytest.mark.parametrize("k", [1, 5])
def test_resume_continues_the_undisturbed_output(llm, k):
    engine = llm.engine
    p = params("json", temperature=0, max_tokens=60)
    ref = llm.generate(PROMPTS[1], p)[0].outputs[0]
    assert len(ref.token_ids) > k
    engine.add_request("resumed", PROMPTS[1], p, resume=Resume(tuple(ref.token_ids[:k])))
    tokens, reason = list(ref.token_ids[:k]), None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.outputs[0].token_ids
            reason = out.outputs[0].finish_reason
    assert tokens == ref.token_ids and reason == "stop"


def test_resumed_tokens_must_follow_the_constraint(llm):
    bad = tuple(llm.tokenizer.encode("hello", add_special_tokens=False))
    with pytest.raises(ValueError, match="do not follow"):
        llm.engine.add_request("bad-resume", PROMPTS[0], params("json"), resume=Resume(bad))
    assert not llm.engine.has_unfinished_requests()


def test_preempted_sequences_keep_their_matchers(llm, tiny_model_dir):
    """A KV cache too small for the batch forces recomputation; outputs are unchanged."""
    ps = [params("json", temperature=0, max_tokens=60)] * 4
    prompts = [PROMPTS[i % 2] + [500 + i] * 20 for i in range(4)]
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, ps)]
    per_block = llm.engine.runner.bytes_per_block
    small = LLM(
        str(tiny_model_dir("llama")), dtype="float32", block_size=4, kv_cache_bytes=per_block * 24
    )
    got = small.generate(prompts, ps)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == ref


def test_ids_past_the_tokenizer_are_masked(tiny_model_dir):
    """A model vocabulary larger than the tokenizer's: the extra ids are never allowed."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir("llama")))
    vocab = len(tok) + 100
    so = StructuredOutputsParams(regex="[0-9]+")
    seq = Sequence("r", [1, 2, 3], SamplingParams(structured_outputs=so))
    seq.structured = StructuredOutputs(tok, vocab, {2}).new_matcher(so)
    logits = torch.zeros(2, vocab)
    logits[:, len(tok) :] = 100.0  # the padding rows win unless masked
    masked = apply_masks(logits, [seq, Sequence("free", [1], SamplingParams())])
    assert int(masked[0].argmax()) < len(tok)
    assert tok.decode([int(masked[0].argmax())]).isdigit()
    assert int(masked[1].argmax()) >= len(tok)  # the unconstrained row is untouched
