"""Speculative decoding: proposers guess a sequence's next tokens (n-gram, suffix: without a
model; a draft model), one forward pass of the target verifies them all, and the accepted ones
are appended.

The pieces: ``config.py`` (``SpeculativeConfig``, vLLM's ``--speculative-config`` JSON),
``ngram.py``, ``suffix.py`` and ``draft_model.py`` (the proposers), ``setup.py`` (an engine's
speculator and draft model), ``speculator.py`` (which sequences speculate and
how far: the adaptive length, the counters). The scheduler asks the speculator for drafts and
reserves their lookahead slots; the model runner computes them as one chunk of ``1 + k``
query tokens over the cached context; ``acceptance.py`` samples every verified position with
the ordinary sampler and appends tokens while they match the draft.

NOTE: a decode with drafts runs as a prefill chunk (causal within the chunk, after the
cached context), so every backend's chunked-prefill path verifies drafts. On CUDA that is
the torch reference attention (TritonAttention runs only one-token decodes in its Triton
kernel): speculative sequences fall back to the torch path, the rest of the batch keeps the
kernel, and a step with drafts does not replay the decode-only CUDA graphs.
"""
