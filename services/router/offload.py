"""The router's pool of threads for the CPU work of preparing a request (tokenizing a prompt,
rendering a chat template, compiling an output grammar), so that the event loop, which relays
every stream and load report, never waits for one request's preparation.

What a thread buys, measured (benchmarks/RESULTS.md, "router event loop"): the Hugging Face
fast tokenizer encodes with the GIL released (transformers goes through ``encode_batch``)
and llguidance compiles with it released, so the loop runs on meanwhile; the GIL is taken
back only to build the result (for a 1 MB prompt, one list of 0.5 M ids: ~0.1-0.2 s at a
time). A Jinja chat template is Python and holds the GIL, but the interpreter hands it back
to the loop every switch interval (5 ms), so the loop is slowed, not stopped. ``json.loads``
holds the GIL for the whole parse: a thread would not help, so request bodies are parsed
on the loop (bounded by ``--max-body-bytes``).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

# Work on fewer characters (or token ids) than this runs inline. Measured (benchmark's
# --threshold): the hop to a thread and back adds ~0.06-0.1 ms to the request, while a chat
# template + encode holds the loop ~0.1 ms at 200 characters, ~0.3 ms at 1,000 and
# ~1.4 ms at 4,000: below 1,024 the stall is about the hop's price, above it grows.
INLINE_BELOW = 1024


class Offload:
    """Runs functions on ``threads`` threads and awaits them; small inputs run inline.

    NOTE: the functions must be safe to run concurrently: the tokenizer's encode and chat
    template are (``Tokenizer.load`` settles its truncation state first), and so are the
    grammar checks (``compile_grammar``'s cache is thread-safe)."""

    def __init__(self, threads: int, inline_below: int = INLINE_BELOW) -> None:
        if threads < 1:
            raise ValueError(f"the preparation pool needs at least one thread, got {threads}")
        self.inline_below = inline_below
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="router-prep")

    async def run(self, size: int | None, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``: inline when ``size`` (characters or token ids of its
        input) is below ``inline_below``, else on the pool; ``size`` None: a cost the input's
        size does not tell (a grammar), always on the pool. Exceptions (e.g. a 400) come
        back as raised; a cancelled caller drops work that has not started yet."""
        if size is not None and size < self.inline_below:
            return fn(*args, **kwargs)
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def close(self) -> None:
        """Stop taking work; queued work is dropped, running work finishes in its thread."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def text_size(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
    """Characters of text in chat messages (string contents and text parts) and tools: about
    what the chat template renders and the tokenizer then encodes."""
    size = len(json.dumps(tools)) if tools else 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            size += len(content)
        elif isinstance(content, list):
            texts = (p.get("text") for p in content if isinstance(p, dict))
            size += sum(len(t) for t in texts if isinstance(t, str))
    return size
