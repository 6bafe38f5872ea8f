"""The tensor-parallel group of one worker: its rank, size and collectives.

The group is a process group object of its own (``ProcessGroupGloo`` / ``NCCL`` / ``HCCL``
over a ``TCPStore`` on 127.0.0.1), never torch.distributed's default group: several engines
may live in one process (tests build a TP=1 and a TP=2 engine side by side).

Backends: gloo on the CPU (every test runs here), nccl on CUDA, hccl on Ascend through
torch_npu. The hccl path follows torch_npu's documented ``ProcessGroupHCCL(store, rank, size)``
and is untested: no NPU was at hand. Gloo fails a collective at once when a peer's process is
gone ("Connection closed by peer"), which is how a dead rank surfaces in the driver.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Any

import torch

# A collective waits this long for a peer before failing (a hung, not dead, rank).
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=300)


class RankFailure(RuntimeError):
    """A rank of the group died or a collective failed: the whole group is unusable."""


@dataclass
class TPGroup:
    """One rank's view of its tensor-parallel group (``pg`` None when size is 1)."""

    rank: int = 0
    size: int = 1
    pg: Any = None
    device: torch.device = torch.device("cpu")  # where collectives' tensors live
    # Seconds spent in the forward pass's collectives, waiting for peers included (a metric;
    # on accelerators it counts only the host side of the launches).
    comm_seconds: float = 0.0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the ranks, in place."""
        if self.size > 1:
            start = time.perf_counter()
            self.pg.allreduce([x]).wait()
            self.comm_seconds += time.perf_counter() - start
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' ``x`` concatenated along the last dimension, in rank order."""
        if self.size == 1:
            return x
        start = time.perf_counter()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.pg.allgather([parts], [x]).wait()
        self.comm_seconds += time.perf_counter() - start
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over the ranks (e.g. KV blocks: every rank needs as many)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        if self.device.type != "cpu":
            t = t.to(self.device)
        self.pg.allreduce([t], _min_op()).wait()
        return int(t.item())


def _min_op() -> Any:
    import torch.distributed as dist

    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MIN  # type: ignore[assignment]
    return opts


def create_store(world: int) -> Any:
    """The group's rendezvous on the driver (rank 0): a TCPStore on a free loopback port."""
    import torch.distributed as dist

    return dist.TCPStore(
        "127.0.0.1", 0, world, True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False
    )


def join_group(store: Any, rank: int, size: int, device: torch.device) -> TPGroup:
    """This process's rank in the group whose rendezvous is ``store`` (rank 0: the store
    itself; other ranks: ``("127.0.0.1", port)`` of it)."""
    import torch.distributed as dist

    if isinstance(store, tuple):
        host, port = store
        store = dist.TCPStore(host, port, size, False, timeout=COLLECTIVE_TIMEOUT)
    pg: Any
    if device.type == "cpu":
        pg = dist.ProcessGroupGloo(store, rank, size, COLLECTIVE_TIMEOUT)
    elif device.type == "cuda":
        torch.cuda.set_device(device)
        pg = dist.ProcessGroupNCCL(store, rank, size, dist.ProcessGroupNCCL.Options())
    elif device.type == "npu":
        import torch_npu  # noqa: F401  (untested: no NPU here)

        pg = torch.distributed.ProcessGroupHCCL(store, rank, size)  # type: ignore[attr-defined]
    else:
        raise ValueError(f"no tensor-parallel backend for device {device}")
    return TPGroup(rank, size, pg, device)
