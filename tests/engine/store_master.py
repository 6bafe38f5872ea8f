"""A real ``mooncake_master`` for tests of the KV store tier: free loopback ports, restartable
on the same ports (a restart empties the store, as in production)."""

from __future__ import annotations

import os
import signal
import subprocess

from services.common.net import free_port, wait_for_port
from services.common.parent_death import with_parent_death
from services.kvstore.master import (
    MasterPorts,
    find_master_binary,
    master_argv,
)
from services.kvstore.store_tier import MooncakeStoreTier, StoreConfig
from tests.waits import sigstop


class Master:
    def __init__(self) -> None:
        self.ports = MasterPorts("127.0.0.1", free_port(), free_port(), free_port())
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = master_argv(find_master_binary(), self.ports, 5000, [])
        # Dies with the test process, even when that crashes (an exec wrapper, not a
        # preexec_fn: gRPC's at-fork handlers abort a forked child, d10eedf).
        self.proc = subprocess.Popen(
            with_parent_death(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for port in (self.ports.rpc_port, self.ports.metadata_port):
            assert wait_for_port("127.0.0.1", port, 20), "mooncake_master did not start"

    def pause(self) -> None:
        """Stop the master (SIGSTOP): it accepts connections and answers nothing."""
        assert self.proc is not None
        sigstop(self.proc.pid)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def config(self) -> StoreConfig:
        return StoreConfig(
            self.ports.rpc_address, self.ports.metadata_url, segment_bytes=32 << 20,
            buffer_bytes=16 << 20, retry_s=0.2,
        )  # fmt: skip

    def store(self, model: str, layout: str) -> MooncakeStoreTier:
        return MooncakeStoreTier(self.config(), model, layout)
