"""A background loop that holds one etcd lease: connect, grant, run the holder's body under
the lease, start over after any loss, revoke the lease when stopped.

The rebalancer's election (``router/rebalance/leader.py``) and the waiting board
(``router/waiting_board.py``) keep their keys this way: a key under the lease goes when its
router dies (the lease expires) or stops (revoked, so that the others see it at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from etcd3aio import Etcd3Client

from services.common.etcd_client import ETCD_OP_TIMEOUT_S, connect_etcd

log = logging.getLogger(__name__)

# How long after a loss the loop connects again: etcd away must not become a busy loop.
RETRY_S = 1.0

LeasedBody = Callable[[Etcd3Client, int], Awaitable[None]]


async def run_leased(
    endpoints: list[str], ttl: int, body: LeasedBody, what: str, level: int = logging.WARNING,
) -> None:  # fmt: skip
    """Run ``body(client, lease_id)`` under a fresh lease of ``ttl`` seconds until cancelled.

    ``body`` returns or raises when it has lost the lease or etcd; the loop logs the reason
    (at ``level``, prefixed ``what``), closes the client and starts over ``RETRY_S`` later.
    On cancellation the lease is revoked (bounded, shielded from the cancel) and the
    cancellation propagates. The lease is revoked whether or not the body wrote a key under
    it: an unused lease is harmless to revoke, and a write whose reply the cancel cut off
    may have landed."""
    while True:
        client: Etcd3Client | None = None
        lease_id = 0
        try:
            client = await asyncio.wait_for(connect_etcd(endpoints), ETCD_OP_TIMEOUT_S)
            assert client.lease is not None
            lease_id = (await client.lease.grant(ttl, timeout=ETCD_OP_TIMEOUT_S)).ID
            await body(client, lease_id)
        except asyncio.CancelledError:
            if lease_id and client is not None and client.lease is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(client.lease.revoke(lease_id, timeout=ETCD_OP_TIMEOUT_S))
            raise
        except Exception as exc:
            log.log(level, "%s: %s; retrying", what, exc)
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
        await asyncio.sleep(RETRY_S)
