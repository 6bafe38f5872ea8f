"""A thin wrapper over Mooncake's TransferEngine: one per worker, KV memory registered once.

Peers find each other by ``session_id`` ("host:rpc_port") with the P2PHANDSHAKE metadata
mode (no metadata server needed); ``protocol`` is "tcp" here and "rdma" in a cluster.
"""

from __future__ import annotations

import logging
import operator
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_POLL_S = 1e-4  # completion poll interval of a write (a fraction of a 1 MB write's time)


class TransferError(RuntimeError):
    """A Mooncake transfer failed (the peer vanished, the session is unknown, ...)."""


@dataclass
class MooncakeConfig:
    host: str = "127.0.0.1"  # the address peers use to reach this worker
    metadata: str = "P2PHANDSHAKE"  # or etcd://..., http://.../metadata
    protocol: str = "tcp"  # tcp | rdma
    device_name: str = ""  # RDMA NIC filter ("" = auto)

    def __post_init__(self) -> None:
        if self.protocol not in ("tcp", "rdma"):
            raise ValueError(f"mooncake protocol must be tcp or rdma, got {self.protocol!r}")


class MooncakeAgent:
    def __init__(self, config: MooncakeConfig) -> None:
        try:
            from mooncake.engine import TransferEngine
        except ImportError as e:  # pragma: no cover - depends on the platform extra
            raise RuntimeError(
                "Mooncake transfer engine is not installed: pip install 'epdserve[cpu]' "
                "(or [cuda] / [npu])"
            ) from e
        self.config = config
        self._te = TransferEngine()
        rc = self._te.initialize(config.host, config.metadata, config.protocol, config.device_name)
        if rc != 0:
            raise RuntimeError(f"Mooncake TransferEngine.initialize failed with {rc}")
        self.session_id = f"{config.host}:{self._te.get_rpc_port()}"
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self._regions: dict[int, int] = {}  # registered local memory: address -> bytes
        self._abandoned: list[int] = []  # writes given up on while still running (see _wait)

    def register(self, addr: int, nbytes: int) -> None:
        rc = self._te.register_memory(addr, nbytes)
        if rc != 0:
            raise RuntimeError(f"Mooncake register_memory({nbytes} bytes) failed with {rc}")
        with self._lock:
            self._regions[addr] = nbytes

    def unregister(self, addr: int) -> None:
        with self._lock:
            self._regions.pop(addr, None)
        rc = self._te.unregister_memory(addr)
        if rc != 0:
            logger.warning("Mooncake unregister_memory(%#x) failed with %d", addr, rc)

    def check_local(self, addrs: list[int], lens: list[int]) -> None:
        """TransferError unless every local range lies inside one registered region: a
        transfer never reads or writes this process's memory outside what was registered
        for it, whatever a peer's descriptor made the caller compute."""
        with self._lock:
            regions = sorted(self._regions.items())
        if not addrs:
            return
        # The usual case first: all of it inside one region (one cache, one staging buffer).
        lo, hi = min(addrs), max(map(operator.add, addrs, lens))
        if min(lens) >= 0 and any(a <= lo and hi <= a + size for a, size in regions):
            return
        for addr, n in zip(addrs, lens, strict=True):
            if n < 0 or not any(a <= addr and addr + n <= a + size for a, size in regions):
                raise TransferError(
                    f"local range [{addr:#x}, +{n}) is outside the registered memory"
                )

    def read(self, session: str, dsts: list[int], srcs: list[int], lens: list[int]) -> None:
        """Blocking batch read of a peer's registered ranges into local registered memory."""
        if not dsts:
            return
        self.check_local(dsts, lens)
        rc = self._te.batch_transfer_sync_read(session, dsts, srcs, lens)
        if rc != 0:
            raise TransferError(f"Mooncake read from {session} failed with status {rc}")

    def write(
        self,
        session: str,
        srcs: list[int],
        dsts: list[int],
        lens: list[int],
        deadline: float | None = None,
    ) -> None:
        """Write local ranges into a peer's registered memory; returns once all have landed.
        With ``deadline`` (a ``time.monotonic()`` value) no range is submitted at or after
        it: the ranges already submitted are waited for, then TransferError.

        NOTE: each range is submitted on its own (Mooncake spreads them over its TCP lanes)
        and completion is polled with short sleeps. ``batch_transfer_sync_write`` busy-spins
        on the status while it waits, taking a core from the transport's own I/O threads and
        from the prefill compute the writes overlap with: on 2 cores under a matmul load,
        per-layer writes ran at 0.34 GB/s that way and 0.53 GB/s this way.
        """
        if not srcs:
            return
        self.check_local(srcs, lens)
        total = sum(lens)
        ids: list[int] = []
        for i, (src, dst, n) in enumerate(zip(srcs, dsts, lens, strict=True)):
            if deadline is not None and time.monotonic() >= deadline:
                self._wait(ids, total)
                raise TransferError(
                    f"write to {session} stopped at its deadline after {i} of {len(srcs)} ranges"
                )
            bid = self._te.transfer_submit_write(session, src, dst, n)
            if bid == 0:
                # Submitting failed (unknown or stale session): let the synchronous call
                # retry the rest, which also drops a stale cached segment, and report.
                failed = self._wait(ids, total)
                rc = self._te.batch_transfer_sync_write(session, srcs[i:], dsts[i:], lens[i:])
                if rc != 0 or failed:
                    raise TransferError(f"Mooncake write to {session} failed with status {rc}")
                break
            ids.append(bid)
        else:
            failed = self._wait(ids, total)
            if failed:
                raise TransferError(f"Mooncake write to {session}: {failed} of {len(ids)} failed")
        with self._lock:
            self.bytes_sent += total

    def _wait(self, ids: list[int], nbytes: int) -> int:
        """Poll submitted writes until each is done; returns how many failed. Gives up on a
        write after Mooncake's own sync deadline (30 s + 1 s per GB), counting it failed.

        NOTE: a batch id given up on here (still running at the deadline, or reported
        TIMEOUT, -2) is never freed: the Python binding (mooncake-transfer-engine 0.3.13)
        has no free/release call. Its ``transfer_check_status`` frees a batch itself when
        it reports it done (1) or failed (-1), so only those leak, and Mooncake's
        ``freeBatchID`` refuses a batch whose tasks are unfinished anyway (the transport
        still holds them). ``get_batch_transfer_status`` frees on its own timeout but
        busy-waits for it, which is what this poll avoids."""
        if not ids:
            return 0
        start = time.monotonic()
        deadline = start + 30.0 + nbytes / 1e9
        # Sleep about as long as the bytes take at loopback speed, then poll finely.
        time.sleep(min(nbytes / 4e9, 0.05))
        failed = 0
        for bid in ids:
            while True:
                status = self._te.transfer_check_status(bid)  # 1 done, 0 running, < 0 failed
                if status == 1:
                    break
                if status < 0 or time.monotonic() > deadline:
                    failed += 1
                    if status == 0:
                        with self._lock:
                            self._abandoned.append(bid)
                    break
                time.sleep(_POLL_S)
        return failed

    def quiesced(self) -> bool:
        """Whether no write this agent gave up on can still be running (and land)."""
        with self._lock:
            self._abandoned = [b for b in self._abandoned if self._te.transfer_check_status(b) == 0]
            return not self._abandoned
