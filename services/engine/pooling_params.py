"""What a pooling request asks for (torch-free: the router and the worker build these)."""

from __future__ import annotations

from dataclasses import dataclass

# "embed": the last token's final hidden state, L2-normalised (Qwen3-Embedding); "classify":
# the classification head's scores on the last token (a reranker's relevance).
POOLING_TASKS = ("embed", "classify")


@dataclass
class PoolingParams:
    """One pooling request's options; ``__post_init__`` rejects bad values with ValueError."""

    task: str = "embed"
    # Matryoshka: keep the first ``dimensions`` values of the embedding, then renormalise.
    # None keeps the model's hidden size. Embed only.
    dimensions: int | None = None

    def __post_init__(self) -> None:
        if self.task not in POOLING_TASKS:
            raise ValueError(f"pooling task must be one of {POOLING_TASKS}, got {self.task!r}")
        if self.dimensions is not None:
            if self.task != "embed":
                raise ValueError("dimensions applies to embeddings only")
            if self.dimensions < 1:
                raise ValueError(f"dimensions must be >= 1, got {self.dimensions}")


@dataclass
class PoolingOutput:
    """The result of one pooling request."""

    request_id: str
    data: list[float]  # the embedding, or the head's scores (one per label)
    num_prompt_tokens: int  # tokens run through the model
    error: str | None = None  # set when the engine failed this request alone
