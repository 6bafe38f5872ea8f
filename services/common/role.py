"""The one lifecycle every worker role implements (prefill, decode, encode), driven by the worker."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection


class Role(ABC):
    """One role's machinery in a worker process (``services/prefill``, ``services/decode``,
    ``services/encoder``).

    The worker process (``services/worker/main.py``) builds every role it can take at
    start-up, so that a role change needs no restart; it calls ``start()`` once before it
    serves and ``stop()`` once after its calls have drained, and asks ``held()`` what a role
    change or a drain must wait for. It never reaches into a role's parts: what a role is
    made of (a KV sender, a receiver, an encoder cache) is the role's business.
    """

    name: str  # the worker role it serves: "prefill", "decode" or "encode"

    @abstractmethod
    def start(self) -> None:
        """Start its background work; called in the worker's event loop."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop its background work and free what it registered (the worker has stopped
        serving calls)."""

    def held(self) -> Collection[str]:
        """Ids of the requests whose resources it holds between calls (a decode worker's KV
        reservations). A role change waits for them as for in-flight calls; ListRequests
        reports them."""
        return ()

    async def release_held(self) -> None:  # noqa: B027 - most roles hold nothing
        """Free everything ``held()`` names (a role change past its drain timeout)."""
