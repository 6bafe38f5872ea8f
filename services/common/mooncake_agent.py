"""A thin wrapper over Mooncake's TransferEngine: one per worker, KV memory registered once.

Peers find each other by ``session_id`` ("host:rpc_port") with the P2PHANDSHAKE metadata
mode (no metadata server needed); ``protocol`` is "tcp" here and "rdma" in a cluster.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

logger = logging.getLogger(__name__)


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

    def register(self, addr: int, nbytes: int) -> None:
        rc = self._te.register_memory(addr, nbytes)
        if rc != 0:
            raise RuntimeError(f"Mooncake register_memory({nbytes} bytes) failed with {rc}")

    def unregister(self, addr: int) -> None:
        rc = self._te.unregister_memory(addr)
        if rc != 0:
            logger.warning("Mooncake unregister_memory(%#x) failed with %d", addr, rc)

    def read(self, session: str, dsts: list[int], srcs: list[int], lens: list[int]) -> None:
        """Blocking batch read of a peer's registered ranges into local registered memory."""
        if not dsts:
            return
        rc = self._te.batch_transfer_sync_read(session, dsts, srcs, lens)
        if rc != 0:
            raise TransferError(f"Mooncake read from {session} failed with status {rc}")

    def write(self, session: str, srcs: list[int], dsts: list[int], lens: list[int]) -> None:
        """Blocking batch write of local ranges into a peer's registered memory."""
        if not srcs:
            return
        rc = self._te.batch_transfer_sync_write(session, srcs, dsts, lens)
        if rc != 0:
            raise TransferError(f"Mooncake write to {session} failed with status {rc}")
        with self._lock:
            self.bytes_sent += sum(lens)
