"""A worker's etcd key from its first lines, advertising "starting", so that routers know it
while it imports and loads its model (seconds to minutes): ``epdserve up``'s start, a
scale-up, a killed worker restarted. Routers keep it apart (no address yet) and let requests
for its model wait for it (router/routing/starting.py).

The key is written on a lease of its own, kept alive from a thread (the event loop does not
run yet, and the engine's start blocks a while), like a model load's handed-over lease
(lease_handover.py): the worker's registration replaces the key, then the lease is revoked
(``serve`` releases it as it releases a handed-over one). A process that dies while starting
stops the keep-alives: its key is gone within the lease's TTL (START_LEASE_TTL_S).

NOTE: the key is put only if it is unchanged since it was read (a transaction): written late,
on a loaded etcd, it must never replace the registration of the same process.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import uuid

from etcd3aio import Etcd3Client

from services.common import process_id
from services.common.dataclass_cli import from_args
from services.common.etcd_client import ETCD_OP_TIMEOUT_S, connect_etcd
from services.common.membership import InstanceInfo, instance_key
from services.engine.config import EngineConfig
from services.engine.model_files import served_name
from services.worker import lease_handover
from services.worker.config import WorkerConfig, build_parser

log = logging.getLogger(__name__)

STARTING = "starting"  # the advertised state (membership.WORKER_STATES)
# The starting key's lease TTL (at least --lease-ttl). NOTE: the keep-alive thread competes
# with the imports for the GIL, and a C extension's load holds it throughout (libtorch: seconds
# on a loaded machine): a 3 s lease had 1 s left at load 25 and ran out once, and the router
# then forgot the worker (a 404 for its model). As long as a handed-over lease's, for the same
# reason; a worker killed while starting stays listed that long at most.
START_LEASE_TTL_S = lease_handover.HANDOVER_TTL_S
# The announcement's connect, read, grant and put together: etcd away, the worker starts on
# unannounced (its registration is retried later as ever).
ANNOUNCE_TIMEOUT_S = 2 * ETCD_OP_TIMEOUT_S


def announce(argv: list[str]) -> lease_handover.LeaseKeeper | None:
    """Write this worker's key, "starting", from a thread (the caller goes on to the heavy
    imports at once); None where there is nothing to announce: a model load's restart (the
    key is handed over, "loading"), ``--no-register``, or arguments that do not parse (the
    worker's ``main`` reports them)."""
    if os.environ.get(lease_handover.ENV) or {"-h", "--help"} & set(argv):
        return None
    parser = build_parser()
    parser.exit_on_error = False
    try:
        args, _ = parser.parse_known_args(argv)
        wcfg = from_args(WorkerConfig, args)
        ecfg = from_args(EngineConfig, args)
    except (ValueError, argparse.ArgumentError, SystemExit) as exc:
        log.debug("not announcing the start: %s", exc)
        return None
    if not wcfg.register:
        return None
    assert wcfg.instance_id is not None
    info = InstanceInfo(
        id=wcfg.instance_id, address="", role=wcfg.role, role_epoch=0,
        model=ecfg.served_model_name or served_name(ecfg.model),
        incarnation=uuid.uuid4().hex[:12], pid=os.getpid(), host=socket.gethostname(),
        capacity={"max_model_len": ecfg.max_model_len} if ecfg.max_model_len else {},
        state=STARTING, proc=process_id.identity(),
    )  # fmt: skip
    key = instance_key(wcfg.cluster, wcfg.instance_id)
    keeper = StartingKey(key, info, max(wcfg.lease_ttl, START_LEASE_TTL_S), wcfg.etcd_endpoints)
    keeper.start()
    return keeper


class StartingKey(lease_handover.LeaseKeeper):
    """Puts the "starting" key on a new lease, then keeps that lease alive until ``release``."""

    def __init__(self, key: str, info: InstanceInfo, ttl: int, endpoints: list[str]) -> None:
        super().__init__(0, ttl, endpoints, key)
        self.info = info

    async def _keep(self) -> None:
        try:
            self.lease = await asyncio.wait_for(self._put(), timeout=ANNOUNCE_TIMEOUT_S)
        except Exception as exc:  # start unannounced
            log.info("could not announce the start in etcd (%s)", exc)
            return
        if self.lease:
            log.info("announced %s as starting (lease %x)", self.key, self.lease)
            await super()._keep()

    async def _put(self) -> int:
        """The new lease the key was put on; 0: not put (this process registered already,
        or the key changed meanwhile)."""
        client: Etcd3Client = await connect_etcd(self.endpoints)
        try:
            assert client.kv is not None and client.lease is not None
            got = await client.kv.get(self.key, timeout=ETCD_OP_TIMEOUT_S)
            if got.kvs and self._ours(got.kvs[0].value):
                return 0
            unchanged = (client.kv.txn_compare_value(self.key, got.kvs[0].value) if got.kvs
                         else client.kv.txn_compare_create_revision(self.key, 0))  # fmt: skip
            grant = await client.lease.grant(self.ttl, timeout=ETCD_OP_TIMEOUT_S)
            put = client.kv.txn_op_put(self.key, self.info.to_json(), lease=grant.ID)
            resp = await client.kv.txn(compare=[unchanged], success=[put],
                                       timeout=ETCD_OP_TIMEOUT_S)  # fmt: skip
            if not resp.succeeded:
                await client.lease.revoke(grant.ID, timeout=ETCD_OP_TIMEOUT_S)
                return 0
            return int(grant.ID)
        finally:
            await client.close()

    def _ours(self, value: bytes) -> bool:
        """``value`` is this process's own registration (serving already)."""
        try:
            info = InstanceInfo.from_json(value)
        except (ValueError, TypeError):
            return False
        return info.pid == self.info.pid and info.host == self.info.host
