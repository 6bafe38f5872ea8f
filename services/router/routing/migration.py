"""Request migration: a stream whose worker died or hung mid-stream goes on on another worker."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field

from services.common.proto import worker_pb2 as pb
from services.router.errors import APIError
from services.router.routing.streams import merge_children

log = logging.getLogger(__name__)

# start(rid, progress): one completion's stream under the id ``rid`` (the request's, or after
# a migration a new one), continuing from what ``progress`` says the client already has.
StartStream = Callable[[str, "Progress"], Awaitable[AsyncGenerator[pb.GenerateResponse, None]]]


class Migrate(Exception):
    """The request's worker died (``kind`` "died") or hung ("hung") after streaming tokens."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass
class Progress:
    """What the client already has of a single-completion request: enough to continue it on
    another worker (request migration) without a duplicated or missing token."""

    tokens: list[int] = field(default_factory=list)  # generated so far
    chars: int = 0  # characters of text relayed
    base: int = 0  # tokens generated before the current stream started
    finished: bool = False
    migrations: int = 0

    def resume(self) -> pb.Resume | None:
        if not self.tokens:
            return None
        return pb.Resume(output_token_ids=self.tokens, emitted_chars=self.chars)

    def begin(self) -> None:
        self.base = len(self.tokens)

    def relay(self, msg: pb.GenerateResponse) -> pb.GenerateResponse:
        """Record ``msg`` and make its counts those of the whole request."""
        for d in msg.outputs:
            self.tokens.extend(d.token_ids)
            self.chars += len(d.text)
            d.completion_tokens += self.base
        self.finished = msg.finished
        return msg

    def record(self, d: pb.CompletionDelta) -> None:
        """Record one completion's delta from a stream of several completions."""
        self.tokens.extend(d.token_ids)
        self.chars += len(d.text)
        self.finished = self.finished or bool(d.finish_reason)


class Migration:
    """Continues streams that raised ``Migrate``, at most ``max_migrations`` times each;
    ``on_migration(kind)`` counts each one (a metric)."""

    def __init__(self, max_migrations: int, on_migration: Callable[[str], None]) -> None:
        self.max_migrations = max_migrations
        self.on_migration = on_migration

    async def single(
        self, request_id: str, progress: Progress, start: StartStream
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """One completion's stream, ``start``-ed again from its tokens each time its worker
        dies or hangs mid-stream."""
        reason = ""
        while True:
            progress.begin()
            # A migrated request gets a new id: its old worker may still hold the old one.
            rid = f"{request_id}-m{progress.migrations}" if progress.migrations else request_id
            gen = await start(rid, progress)
            try:
                async for msg in gen:
                    yield progress.relay(msg)
                return
            except APIError as err:
                if not reason or err.code != "no_workers" or len(progress.tokens) > progress.base:
                    raise
                # NOTE: say why a stream that was running fails: its worker died and no
                # worker (not even that one restarted, within the wait) could continue it.
                raise APIError(503, f"{reason} after {len(progress.tokens)} tokens, and no "
                               f"worker could continue the request: {err.message}",
                               code="no_workers") from None  # fmt: skip
            except Migrate as m:
                if progress.migrations >= self.max_migrations:
                    raise APIError(
                        503,
                        f"worker failed mid-stream after {progress.migrations} migrations: "
                        f"{m.reason}",
                    ) from None
                progress.migrations += 1
                reason = f"its worker {m.kind} ({m.reason})"
                self.on_migration(m.kind)
                log.warning("migrating %s after %d tokens (%s)", request_id,
                            len(progress.tokens), m.reason)  # fmt: skip
            finally:
                await gen.aclose()

    async def completions(
        self,
        request_id: str,
        n: int,
        together: AsyncGenerator[pb.GenerateResponse, None],
        start_child: Callable[[int, Progress], AsyncGenerator[pb.GenerateResponse, None]],
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """The ``n`` completions of one request streamed ``together`` from one worker. When
        that worker dies or hangs after streaming tokens, every unfinished completion ``i``
        goes on elsewhere, ``start_child(i, its progress)``, and keeps its index."""
        progress = [Progress() for _ in range(n)]
        try:
            async for msg in together:
                for d in msg.outputs:
                    progress[d.index].record(d)
                yield msg
            return
        except Migrate as m:
            if self.max_migrations < 1:
                raise APIError(503, f"worker failed mid-stream: {m.reason}") from None
            self.on_migration(m.kind)
            left = [i for i, p in enumerate(progress) if not p.finished]
            log.warning("migrating %d completions of %s (%s)", len(left), request_id, m.reason)
        finally:
            await together.aclose()
        subs: list[AsyncGenerator[pb.GenerateResponse, None]] = []
        for i in left:
            progress[i].migrations = 1
            subs.append(start_child(i, progress[i]))
        async for msg in merge_children(subs, left):
            yield msg
