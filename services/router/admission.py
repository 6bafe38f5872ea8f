"""Admission control: a bound on the prompt tokens of the requests the router holds.

A request is charged its prompt tokens (summed over its prompts) when it is admitted and
credited back when its response is finished (completed, failed or abandoned by the client),
not when its prefill ends: the router cannot see prefill end on the mixed path, and a bound
on whole requests also bounds the router's own memory. When the charge would take the total
over the limit the request is refused with 429 and ``Retry-After``; nothing waits in an
unbounded queue. A request alone in an empty router is always admitted, so that a prompt
larger than the limit (but within the model's context) is not refused forever.
"""

from __future__ import annotations

from services.router.errors import APIError


class Ticket:
    """One admitted request's charge; ``release`` is idempotent."""

    def __init__(self, control: AdmissionControl, tokens: int) -> None:
        self._control: AdmissionControl | None = control
        self.tokens = tokens

    def release(self) -> None:
        if self._control is not None:
            self._control.queued_tokens -= self.tokens
            self._control = None


class AdmissionControl:
    def __init__(self, max_queued_tokens: int, retry_after_s: int = 1) -> None:
        self.max_queued_tokens = max_queued_tokens
        self.retry_after_s = retry_after_s
        self.queued_tokens = 0  # prompt tokens of admitted, unfinished requests

    def admit(self, tokens: int) -> Ticket:
        """A ticket for ``tokens`` more queued prompt tokens, or a 429 APIError."""
        if self.queued_tokens > 0 and self.queued_tokens + tokens > self.max_queued_tokens:
            raise APIError(
                429,
                f"the router is at its limit of {self.max_queued_tokens} queued prompt tokens; "
                f"retry after {self.retry_after_s} s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.queued_tokens += tokens
        return Ticket(self, tokens)
