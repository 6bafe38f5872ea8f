"""The benchmark's in-process messages: one prompt to send and what came back for it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SampleRequest:
    """One prompt of a dataset, ready to send."""

    prompt: str  # user text (for `prefix`: the question after the shared system prefix)
    prompt_len: int  # tokens of the text the server sees for /v1/completions (system + prompt)
    output_len: int  # max_tokens asked for (and min_tokens when ignore_eos is on)
    system: str | None = None  # shared system prefix (`prefix` dataset only)
    group: int | None = None  # prefix group index (`prefix` dataset only)
    images: list[str] = field(default_factory=list)  # data: URLs of its images (random-mm)

    @property
    def full_text(self) -> str:
        """The completion-endpoint prompt: system prefix and question joined."""
        return self.prompt if self.system is None else f"{self.system}\n\n{self.prompt}"


@dataclass
class RequestResult:
    """What one streamed request produced; times are seconds of time.perf_counter()."""

    prompt_len: int  # tokens of the prompt as counted by the benchmark's tokenizer
    expected_output_len: int  # max_tokens asked for
    success: bool = False  # the stream ended with [DONE], no error, at least one token
    error: str = ""  # why it failed (HTTP status and body, SSE error, timeout, exception)
    start: float = 0.0  # when the request was sent
    end: float = 0.0  # when it finished, successfully or not
    ttft: float = 0.0  # first non-empty chunk minus start
    latency: float = 0.0  # end of stream minus start (E2EL)
    itl: list[float] = field(default_factory=list)  # gaps between non-empty chunks
    output_tokens: int = 0  # usage.completion_tokens (chunk count when usage is missing)
    usage_reported: bool = False  # the server sent a usage block
    server_prompt_tokens: int | None = None  # usage.prompt_tokens as the server counted it
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens (prefix cache)
    chunks: int = 0  # non-empty content chunks received
    generated_text: str = ""  # concatenated streamed text

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (E2EL - TTFT) / (out - 1); None if out < 2."""
        if not self.success or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)
