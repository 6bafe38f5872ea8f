"""Following an etcd key (or every key under a prefix) for as long as a process lives: list it,
watch it from the next revision, and after any failure start over on a new client.

Membership (``MembershipWatcher``: the workers' prefix) and desired roles
(``DesiredRoleWatcher``: one worker's key) follow etcd this way. etcd3aio resumes a watch by
revision when etcd restarts; what it cannot resume (a compacted revision, a watch etcd
cancelled, e.g. for an auth token it forgot when it restarted) ends here and is listed again,
so a change made while the watch was down is still seen. Meanwhile the caller keeps its last
view: a process goes on serving while etcd is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from etcd3aio import Etcd3Client, prefix_range_end

from services.common.etcd_client import ETCD_OP_TIMEOUT_S, connect_etcd

log = logging.getLogger(__name__)

# After a failure the loop waits BACKOFF_MIN_S, doubling up to BACKOFF_MAX_S while it keeps
# failing; a listing that succeeds starts the backoff over.
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 2.0

OnListing = Callable[[Sequence[Any]], None]  # etcd KeyValue messages
OnEvents = Callable[[Sequence[Any]], None]  # etcd Event messages (type 0 put, 1 delete)


async def follow_key(
    endpoints: list[str], key: str, on_listing: OnListing, on_events: OnEvents, what: str,
    prefix: bool = False,
) -> None:  # fmt: skip
    """Until cancelled: ``on_listing(kvs)`` with the current value(s) of ``key`` (every key under
    it where ``prefix``), then ``on_events(events)`` for each batch of changes after that
    listing. Any failure (etcd away, a broken, compacted or cancelled watch, a callback that
    raised) is logged as ``what`` failing, and the loop lists again on a new client after the
    backoff. Every etcd call is bounded (``ETCD_OP_TIMEOUT_S``); the watch is not: it waits for
    changes, and etcd3aio re-establishes it when its connection breaks."""
    backoff = BACKOFF_MIN_S
    raw = key.encode()
    range_end = prefix_range_end(raw) if prefix else None
    while True:
        client: Etcd3Client | None = None
        try:
            client = await asyncio.wait_for(connect_etcd(endpoints), ETCD_OP_TIMEOUT_S)
            assert client.kv is not None and client.watch is not None
            resp = await client.kv.get(raw, range_end=range_end, timeout=ETCD_OP_TIMEOUT_S)
            on_listing(resp.kvs)
            backoff = BACKOFF_MIN_S
            async for wresp in client.watch.watch(
                raw, range_end=range_end, start_revision=resp.header.revision + 1
            ):
                if wresp.compact_revision:
                    raise RuntimeError("watch compacted; listing again")
                if wresp.canceled:
                    raise RuntimeError(f"watch canceled by etcd ({wresp.cancel_reason})")
                if wresp.events:
                    on_events(wresp.events)
            raise RuntimeError("watch ended; listing again")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, backoff)
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, BACKOFF_MAX_S)
