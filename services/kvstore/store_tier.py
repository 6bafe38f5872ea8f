"""The worker's client of Mooncake Store: the KV tier every worker serving a model shares.

Keys name the model and the KV layout (dtype, layers, kv heads, head dim, block size:
the engine's layout fingerprint) before the engine's chained block hash, so workers whose
blocks are not interchangeable never read each other's. Values are the engine's encoded
blocks (``services/engine/kv_store_format.BlockCodec``); this module only moves bytes.

The store is a cache, so nothing here raises for store trouble: an unreachable or
restarted master makes reads miss and writes fail, and the engine recomputes. Mooncake's
own client reconnects after a short master outage; when it stays cut off while the
master answers again (a long outage), or never connected, a fresh client is set up, at
most once every ``retry_s``. NOTE: ``setup`` holds the GIL while it waits for the master, so
a connection is only tried when the master answers (``_master_answers``), only from the
engine's background store threads, and with Mooncake's master RPCs bounded (``MASTER_RPC_ENV``).
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import threading
import time
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.common.net import open_direct

log = logging.getLogger(__name__)

HEALTHY, NOT_INITIALIZED, MASTER_UNREACHABLE = 0, 1, 2  # MooncakeDistributedStore.health_check
# Mooncake's defaults wait for a master that does not answer 30 s per RPC, and its setup tries 20
# times (~10 min), holding the GIL: a master stopped just after ``_master_answers`` froze the
# worker whole until the kvstore killed the master (a decode worker was 'gone' 5-12 s). Its RPCs
# answer in milliseconds: after 1 s, one try, a call is a miss and a setup fails (1.3 s, GIL
# held) and is tried again ``retry_s`` later. Read by Mooncake's store client (not the KV
# transfer engine) when a client is created; an operator's own values win.
MASTER_RPC_ENV = {"MC_RPC_TIMEOUT_MS": "1000", "MC_STORE_CLIENT_SETUP_RETRIES": "1"}
_LEFT_OPEN: list[Any] = []  # clients not closed: their master did not answer (close())


@dataclass(frozen=True)
class StoreConfig:
    """Where the Mooncake master is and what this client brings to the store."""

    master: str  # the master's rpc address, host:port
    metadata_url: str  # transfer-engine metadata, e.g. http://host:port/metadata
    local_host: str = "127.0.0.1"  # address other store clients reach this one at
    segment_bytes: int = 256 << 20  # memory this client lends to the store's pool
    buffer_bytes: int = 64 << 20  # this client's staging buffer for transfers
    protocol: str = "tcp"  # tcp | rdma
    device: str = ""  # RDMA device filter
    retry_s: float = 5.0  # least time between two connection attempts

    def __post_init__(self) -> None:
        host, _, port = self.master.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"KV store master must be host:port, got {self.master!r}")
        if not self.metadata_url.startswith(("http://", "etcd://", "P2PHANDSHAKE")):
            raise ValueError(f"KV store metadata must be an http:// URL, got {self.metadata_url!r}")
        if self.segment_bytes <= 0 or self.buffer_bytes <= 0:
            raise ValueError("KV store segment and buffer sizes must be > 0")


def block_key(model: str, layout_key: str, block_hash: int) -> str:
    """The store key of one block."""
    return f"epd/{model}/{layout_key}/{block_hash:016x}"


def _port_open(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout).close()
    except OSError:
        return False
    return True


def _master_answers(c: StoreConfig, timeout: float = 1.0) -> bool:
    """Whether the master is there to set a client up with: its RPC port accepts and, with
    an HTTP metadata server (``mooncake_master``'s own), that server answers at all.

    NOTE: a stopped master's port still accepts (the kernel completes the handshake), and
    Mooncake's ``setup`` then retries for minutes holding the GIL: the whole worker froze
    (its event loop, etcd lease and gRPC health with it). A master that stops between this
    check and ``setup`` can still do that; the kvstore kills a master that stops answering."""
    if not _port_open(c.master, timeout):
        return False
    if not c.metadata_url.startswith("http://"):
        return True  # etcd:// or P2PHANDSHAKE: nothing of the master's own to ask
    try:
        with open_direct(c.metadata_url, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # an answer ("metadata not found" is a 404)
    except (OSError, ValueError, http.client.HTTPException):
        return False


class MooncakeStoreTier:
    """``StoreTier`` (services/engine/kv_tiers.py) on Mooncake Store; thread-safe.
    ``config`` is fixed, or a function giving the current one (None: no store known now),
    read before each connection and call, so a master that moved is followed."""

    def __init__(
        self,
        config: StoreConfig | Callable[[], StoreConfig | None],
        model: str,
        layout_key: str,
    ) -> None:
        self._source = config if callable(config) else lambda: config
        self.config: StoreConfig | None = None  # that of the current client
        self.model = model
        self.layout_key = layout_key
        self._client: Any = None
        # Clients replaced after losing the master. NOTE: they are closed only in close():
        # another store thread may still be inside a call on one, and closing a Mooncake
        # client under a running call crashes the process.
        self._retired: list[Any] = []
        self._lock = threading.Lock()  # one (re)connection at a time
        self._next_try = 0.0
        self.num_setups = 0  # clients set up so far (tests and logs read it)
        for name, value in MASTER_RPC_ENV.items():  # NOTE: before any store thread runs
            os.environ.setdefault(name, value)

    def key(self, block_hash: int) -> str:
        return block_key(self.model, self.layout_key, block_hash)

    # ---- connection ------------------------------------------------------------------------

    def _connected(self) -> Any:
        """The client, setting one up when due; None while the store is out of reach."""
        c = self._source()
        with self._lock:
            if self._client is not None:
                if c == self.config:
                    return self._client
                log.info("KV store: master moved to %s", c.master if c else None)
                self._retired.append(self._client)
                self._client = None
                self._next_try = 0.0
            if c is None:
                return None
            now = time.monotonic()
            if now < self._next_try:
                return None
            self._next_try = now + c.retry_s
            if not _master_answers(c):
                return None
            from mooncake.store import MooncakeDistributedStore

            client = MooncakeDistributedStore()
            rc = client.setup(
                c.local_host, c.metadata_url, c.segment_bytes, c.buffer_bytes, c.protocol,
                c.device, c.master,
            )  # fmt: skip
            if rc != 0:
                log.warning("KV store: setup with master %s failed (%d)", c.master, rc)
                self._retired.append(client)  # closed with the others, never mid-call
                return None
            self.num_setups += 1
            log.info("KV store: connected to master %s", c.master)
            self._client, self.config = client, c
            return client

    def _on_error(self, client: Any, what: str, rc: int) -> None:
        """An operation failed: if the client lost the master for good, drop it so that
        the next call sets up a new one."""
        health = client.health_check()
        log.debug("KV store: %s failed (%d), health %d", what, rc, health)
        if health == HEALTHY:
            return
        master = self.config.master if self.config else ""
        if health == MASTER_UNREACHABLE and not _port_open(master):
            return  # the master is away; Mooncake's client reconnects when it is back
        with self._lock:
            if self._client is client:
                log.warning("KV store: client cut off from master %s; reconnecting", master)
                self._retired.append(client)
                self._client = None
                self._next_try = 0.0

    # ---- StoreTier -------------------------------------------------------------------------

    def get_blocks(self, hashes: list[int]) -> list[bytes]:
        client = self._connected()
        if client is None or not hashes:
            return []
        keys = [self.key(h) for h in hashes]
        exists = client.batch_is_exist(keys)
        n = 0
        while n < len(keys) and exists[n] == 1:
            n += 1
        if n < len(keys) and exists[n] < 0:
            self._on_error(client, "lookup", exists[n])
        if n == 0:
            return []
        values = client.get_batch(keys[:n])
        out: list[bytes] = []
        for value in values:
            if not value:  # evicted meanwhile, or the master went away
                break
            out.append(value)
        return out

    def put_blocks(self, hashes: list[int], values: list[bytes]) -> list[int]:
        client = self._connected()
        if client is None or not hashes:
            return []
        keys = [self.key(h) for h in hashes]
        exists = client.batch_is_exist(keys)
        if any(e < 0 for e in exists):
            self._on_error(client, "lookup", min(exists))
            return []
        todo = [i for i, e in enumerate(exists) if e != 1]
        if todo:
            rc = client.put_batch([keys[i] for i in todo], [values[i] for i in todo])
            if rc != 0:
                self._on_error(client, "put", rc)
                exists = client.batch_is_exist(keys)  # which of them made it
                return [h for h, e in zip(hashes, exists, strict=True) if e == 1]
        return list(hashes)

    def close(self) -> None:
        """Close every client; call once no store call is running any more.

        NOTE: Mooncake's ``close`` against a master that does not answer holds the GIL for
        45-99 s (so does the client's destructor): a worker told to stop froze that long. With
        such a master the clients are left open, and kept referenced so that no destructor
        runs: the worker's process ends with ``os._exit`` (services/common/fast_exit.py)."""
        with self._lock:
            clients = [*self._retired, self._client] if self._client else self._retired
            self._client, self._retired = None, []
            self._next_try = float("inf")
            config = self.config
        if not clients:
            return
        if config is None or not _master_answers(config):
            log.warning("KV store: master does not answer; %d client(s) left open", len(clients))
            _LEFT_OPEN.extend(clients)
            return
        for client in clients:
            client.close()
