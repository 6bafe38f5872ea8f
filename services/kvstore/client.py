"""Finding the kvstore: workers (to publish) and routers (to look up) follow its etcd key and
keep one channel to it, replaced when the kvstore moves or restarts."""

from __future__ import annotations

import contextlib

import grpc

from services.common.grpc_utils import GrpcTLS, channel
from services.common.membership import InstanceInfo, MembershipWatcher, kvstore_prefix
from services.common.proto import kvstore_pb2_grpc as kpb_grpc


def pick_kvstore(instances: dict[str, InstanceInfo]) -> InstanceInfo | None:
    """The kvstore every process uses when etcd lists several: the first by id."""
    return instances[min(instances)] if instances else None


class KVStoreLocator:
    """The kvstore etcd names now (``pick_kvstore``), and a stub to it, so that all
    processes publish to and read from the same index."""

    def __init__(self, etcd_endpoints: list[str], cluster: str, tls: GrpcTLS | None = None) -> None:
        self.watcher = MembershipWatcher(etcd_endpoints, cluster, kvstore_prefix(cluster))
        self.tls = tls
        self._target: InstanceInfo | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: kpb_grpc.KVIndexServiceStub | None = None

    async def start(self) -> None:
        await self.watcher.start()

    async def stop(self) -> None:
        await self.watcher.stop()
        await self._close()

    def current(self) -> InstanceInfo | None:
        return pick_kvstore(self.watcher.instances)

    async def stub(self) -> tuple[kpb_grpc.KVIndexServiceStub | None, bool]:
        """(stub or None when there is no kvstore, whether the target changed since the
        previous call: a new kvstore, or the same one restarted, knows nothing of us)."""
        info = self.current()
        key = (info.address, info.incarnation) if info is not None else None
        old = self._target
        if key == ((old.address, old.incarnation) if old is not None else None):
            return self._stub, False
        await self._close()
        self._target = info
        if info is not None:
            self._channel = channel(info.address, self.tls)
            self._stub = kpb_grpc.KVIndexServiceStub(self._channel)
        return self._stub, True

    async def _close(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close(grace=None)
        self._channel = self._stub = None
