"""Admission control: a bound on the prompt tokens of the requests the router holds, per
base model.

A request is charged its prompt tokens (summed over its prompts) when it is admitted and
credited back when its response is finished (completed, failed or abandoned by the client),
not when its prefill ends: the router cannot see prefill end on the mixed path, and a bound
on whole requests also bounds the router's own memory. When the charge would take its model's
total over the limit the request is refused with 429 and ``Retry-After``; nothing waits in an
unbounded queue. Each model has the bound of its own (its workers are a pool of their own):
a flood of one model's requests never refuses another's. A request alone for its model is
always admitted, so that a prompt larger than the limit (but within the model's context) is
not refused forever.
"""

from __future__ import annotations

from services.router.errors import APIError


class Ticket:
    """One admitted request's charge; ``release`` is idempotent."""

    def __init__(self, control: AdmissionControl, model: str, tokens: int) -> None:
        self._control: AdmissionControl | None = control
        self.model = model
        self.tokens = tokens

    def release(self) -> None:
        if self._control is not None:
            self._control.by_model[self.model] -= self.tokens
            self._control = None


class AdmissionControl:
    def __init__(self, max_queued_tokens: int, retry_after_s: int = 1) -> None:
        self.max_queued_tokens = max_queued_tokens
        self.retry_after_s = retry_after_s
        # base model -> prompt tokens of its admitted, unfinished requests
        self.by_model: dict[str, int] = {}

    @property
    def queued_tokens(self) -> int:
        """Prompt tokens of admitted, unfinished requests, every model's."""
        return sum(self.by_model.values())

    def admit(self, tokens: int, model: str = "") -> Ticket:
        """A ticket for ``tokens`` more queued prompt tokens of ``model`` (a base model), or
        a 429 APIError."""
        queued = self.by_model.get(model, 0)
        if queued > 0 and queued + tokens > self.max_queued_tokens:
            of = f" for model '{model}'" if model else ""
            raise APIError(
                429,
                f"the router is at its limit of {self.max_queued_tokens} queued prompt tokens"
                f"{of}; retry after {self.retry_after_s} s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.by_model[model] = queued + tokens
        return Ticket(self, model, tokens)
