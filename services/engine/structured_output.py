"""Structured outputs (guided decoding) with llguidance: a request's constraint is compiled
once into a grammar, each sequence follows it with its own matcher, and every sampling step
masks the logits of constrained rows to the tokens the grammar allows next. Compiling and
checking a constraint, which the router does too, is in the torch-free grammar.py.

NOTE: the matcher's state is a function of the output tokens only, so a preempted sequence
(whose KV is recomputed) keeps it, and a resumed or PD-imported sequence gets a fresh
matcher advanced through the outputs generated elsewhere.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Sequence
from time import thread_time
from typing import TYPE_CHECKING, Any, Protocol

import torch

from services.engine.grammar import GRAMMAR_CACHE_SIZE, compile_grammar, error_message
from services.engine.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    import llguidance

# The build CPU (a grammar's build and first mask, seconds of its thread) that the costly
# cached grammars may add up to; the one built last is kept whatever its cost. A grammar built
# in at most GRAMMAR_CACHE_CPU_S / GRAMMAR_CACHE_SIZE is cheap: only the count bounds those.
# NOTE: a stand-in for their memory, which llguidance does not tell: a grammar's lexer states
# hold it (~1-2 kB each), and building them takes the CPU. Measured (49k vocabulary):
# json_object, tool schemas, short regexes 2-4 ms and ~0 MB each; 12-byte regexes such as
# a{3000000} or (ab){500000} 0.45-0.7 s and 64-103 MB each, of which the count alone let a
# client pin 4-7 GB in a worker (now ~0.25 GB and the last one).
GRAMMAR_CACHE_CPU_S = 1.0
CHEAP_GRAMMAR_S = GRAMMAR_CACHE_CPU_S / GRAMMAR_CACHE_SIZE


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(
        self, matcher: llguidance.LLMatcher, vocab_size: int, eos_token_ids: list[int]
    ) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size  # bits in its mask
        self.eos_token_ids = eos_token_ids

    def advance(self, token: int) -> bool:
        """Consume a generated token; True once the grammar is complete (nothing but the end
        may follow) or the token was rejected (then the sequence cannot go on either)."""
        self.matcher.consume_token(token)
        return self.matcher.is_stopped()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, bitmask, row)


class _Build:
    """A grammar one thread builds; the others asking for it meanwhile wait for it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.template: llguidance.LLMatcher | None = None
        self.error: BaseException | None = None  # the build's, raised to every waiter
        self.waiters = 0


class StructuredOutputs:
    """An engine's grammar compiler and matcher factory. The llguidance tokenizer is made on
    first use (with the token trie of the first mask, ~1.5 s of CPU for a 49k vocabulary),
    so engines that never see a constraint do not pay for it. ``prepare`` does that work
    and compiles a request's grammar in the caller's thread, so that the step thread (every
    other request) does not wait for it."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self.hf_tokenizer = hf_tokenizer
        # The model's vocabulary (lm_head rows) may be larger than the tokenizer's: the mask
        # covers all of it, and ids the tokenizer does not know are never allowed.
        self.vocab_size = max(vocab_size, len(hf_tokenizer))
        # Every end-of-sequence id of the engine ends a complete output (not only the
        # tokenizer's own eos, e.g. a chat model's end-of-turn token).
        self.eos_token_ids = sorted(eos_token_ids)
        # key -> (template, its build CPU in seconds), least recently used first
        self._templates: dict[tuple[str, str], tuple[llguidance.LLMatcher, float]] = {}
        self._costly_s = 0.0  # the build CPU of those not cheap (CHEAP_GRAMMAR_S)
        self._building: dict[tuple[str, str], _Build] = {}  # grammars being built, by key
        self._lock = threading.Lock()  # the step thread and ``prepare`` callers

    def prepare(self, params: StructuredOutputsParams) -> None:
        """Build the tokenizer (and its token trie), the grammar's initial matcher and its
        first mask now (``_build``); ValueError as ``new_matcher``. Thread-safe; meant for a
        worker thread.

        NOTE: the grammar is kept on ``params`` (not a field: not sent, not compared), which
        ``new_matcher`` copies: the cache may have evicted it by then (more grammars than
        it holds prepared while this request waited for the step thread), and the step
        thread built it again."""
        params.__dict__["_prepared"] = (self, self._template(params.key))

    def prepare_cached(self, params: StructuredOutputsParams) -> bool:
        """``prepare`` when the grammar is cached (built, with its first mask: nothing left
        to do, so no thread is needed); False, doing nothing, when it is not."""
        with self._lock:
            entry = self._templates.pop(params.key, None)
            if entry is None:
                return False
            self._templates[params.key] = entry  # most recently used last
        params.__dict__["_prepared"] = (self, entry[0])
        return True

    @functools.cached_property
    def tokenizer(self) -> llguidance.LLTokenizer:
        import llguidance.hf

        eos = self.eos_token_ids or None
        try:
            return llguidance.hf.from_tokenizer(
                self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=eos
            )
        except ValueError as exc:  # e.g. not a fast (Rust) tokenizer
            raise ValueError(
                f"structured outputs are not available for this model: {exc}"
            ) from None

    def new_matcher(
        self, params: StructuredOutputsParams, output_token_ids: Sequence[int] = ()
    ) -> GrammarMatcher:
        """A matcher at the start of the grammar, advanced through ``output_token_ids``
        (outputs generated elsewhere); ValueError for a bad grammar or tokens it rejects.
        The grammar ``prepare`` built for ``params`` if it did, else the cache's."""
        owner, template = params.__dict__.get("_prepared", (None, None))
        if owner is not self:
            template = self._template(params.key)
        matcher = template.deep_copy()
        if output_token_ids and not matcher.consume_tokens(list(output_token_ids)):
            raise ValueError(
                "the resumed output tokens do not follow the structured output constraint: "
                f"{matcher.get_error()}"
            )
        return GrammarMatcher(matcher, self.vocab_size, self.eos_token_ids)

    def _template(self, key: tuple[str, str]) -> llguidance.LLMatcher:
        """The initial matcher of a grammar (a small LRU; copies are cheap, building the
        parser is not).

        NOTE: built outside the lock: the step thread takes it for every constrained request
        it adds, and waited (every request of the worker with it) for whatever grammar a
        ``prepare`` thread was building. A grammar being built is built once: a thread
        asking for it meanwhile waits for that build (requests of one schema arriving
        together each built it, seconds of CPU apiece for a large one)."""
        with self._lock:
            entry = self._templates.pop(key, None)
            if entry is not None:
                self._templates[key] = entry  # most recently used last
                return entry[0]
            build = self._building.get(key)
            mine = build is None
            if build is None:
                build = self._building[key] = _Build()
            else:
                build.waiters += 1
        if not mine:
            build.done.wait()
            if build.template is None:
                raise build.error or RuntimeError("the grammar's build failed")
            return build.template
        started = thread_time()
        try:
            _ = self.tokenizer  # NOTE: built once per engine (~1.5 s): not this grammar's cost
            started = thread_time()
            build.template = self._build(key)
        except BaseException as exc:
            build.error = exc
            raise
        finally:
            with self._lock:
                del self._building[key]
                if build.template is not None:
                    self._cache(key, build.template, thread_time() - started)
            build.done.set()
        return build.template

    def _cache(self, key: tuple[str, str], template: llguidance.LLMatcher, cpu_s: float) -> None:
        """Keep ``template`` (built in ``cpu_s``), evicting the least recently used grammars
        past GRAMMAR_CACHE_SIZE, and costly ones past GRAMMAR_CACHE_CPU_S (cheap ones stay:
        a popular schema is not built again, nor queued, for a client's costly ones). The
        caller holds the lock."""
        self._evict(key)
        while len(self._templates) >= GRAMMAR_CACHE_SIZE:
            self._evict(next(iter(self._templates)))
        if cpu_s > CHEAP_GRAMMAR_S:
            costly = [k for k, (_, c) in self._templates.items() if c > CHEAP_GRAMMAR_S]
            for old in costly:  # least recently used first
                if self._costly_s + cpu_s <= GRAMMAR_CACHE_CPU_S:
                    break
                self._evict(old)
            self._costly_s += cpu_s
        self._templates[key] = (template, cpu_s)

    def _evict(self, key: tuple[str, str]) -> None:
        entry = self._templates.pop(key, None)
        if entry is not None and entry[1] > CHEAP_GRAMMAR_S:
            self._costly_s = max(self._costly_s - entry[1], 0.0)  # NOTE: float drift

    def _build(self, key: tuple[str, str]) -> llguidance.LLMatcher:
        """A grammar's initial matcher, its first mask computed (before it is cached).

        NOTE: every grammar's first mask, not only the first grammar's: its lexer states are
        built by the first mask and shared by the template's copies, and a regex such as
        a{1000000} took 4.7 s there, on the step thread, stalling every request of the
        worker (measured: 3.5 s in ``prepare`` instead, then 0.0 s for the step thread's
        mask). Here, so that a cached grammar needs no more work (``prepare_cached``)."""
        import llguidance
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

        template = llguidance.LLMatcher(self.tokenizer, compile_grammar(*key))
        if template.is_error():
            # NOTE: a panic of llguidance's with this tokenizer (100,000 grammar symbols)
            # sent its Rust backtrace to the client.
            raise ValueError(
                f"invalid structured_outputs.{key[0]}: {error_message(template.get_error())}"
            )
        fill_next_token_bitmask(template.deep_copy(), allocate_token_bitmask(1, self.vocab_size))
        return template


class Constrained(Protocol):
    """What ``apply_masks`` reads of a sequence (an engine ``Sequence``): this module sits
    below sequence.py, which holds a ``GrammarMatcher``."""

    @property
    def structured(self) -> GrammarMatcher | None: ...


def apply_masks(logits: torch.Tensor, seqs: Sequence[Constrained]) -> torch.Tensor:
    """``logits`` ([len(seqs), vocab], any device) with -inf for the tokens that the grammar
    of each constrained row does not allow next: a new tensor, or ``logits`` itself when no
    row is constrained. The packed bitmask (32 tokens a word) is what crosses to the device;
    it is unpacked there."""
    rows = [i for i, s in enumerate(seqs) if s.structured is not None]
    if not rows:
        return logits
    matchers = [m for m in (s.structured for s in seqs) if m is not None]
    vocab = logits.shape[-1]
    bitmask = torch.zeros((len(rows), (matchers[0].vocab_size + 31) // 32), dtype=torch.int32)
    for j, m in enumerate(matchers):
        m.fill(bitmask, j)
    dead = (bitmask == 0).all(dim=1).tolist()
    bitmask = bitmask.to(logits.device)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    # Bit b of word w is token 32 w + b (">>" of a negative word fills with ones, "& 1" keeps
    # bit b); the mask covers at least the model's vocabulary.
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]
    for j, m in enumerate(matchers):
        if dead[j]:
            # NOTE: a matcher in an error state allows nothing; let the row end instead of
            # sampling from all -inf (NaN probabilities).
            allowed[j, [t for t in m.eos_token_ids if t < vocab]] = True
    if len(rows) == len(seqs):
        return logits.masked_fill(~allowed, float("-inf"))
    index = torch.tensor(rows, device=logits.device)
    out = logits.clone()
    out[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return out
