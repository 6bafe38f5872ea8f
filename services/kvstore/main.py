"""Start the kvstore: supervise mooncake_master, serve the KV index, register in etcd."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import uuid

import grpc

from services.common import event_loop
from services.common.dataclass_cli import add_dataclass_args, from_args
from services.common.grpc_utils import SERVER_OPTIONS, add_port
from services.common.membership import (
    InstanceInfo,
    MembershipWatcher,
    Registrar,
    kvstore_prefix,
)
from services.common.net import free_port
from services.common.proto import kvstore_pb2_grpc as kpb_grpc
from services.kvstore.config import KVStoreConfig
from services.kvstore.index import KVIndex
from services.kvstore.master import MasterPorts, MasterSupervisor, find_master_binary, master_argv
from services.kvstore.metrics import KVStoreMetrics
from services.kvstore.server import KVIndexServicer

log = logging.getLogger("epdserve.kvstore")

READY_PREFIX = "EPDSERVE_KVSTORE_READY"  # the launcher waits for this line on stdout
ROLE = "kvstore"  # the role in its etcd advertisement


def build_parser(prog: str = "epdserve kvstore") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run the global KV index and its Mooncake Store master."
    )
    add_dataclass_args(parser.add_argument_group("kvstore"), KVStoreConfig)
    parser.add_argument("--log-level", default="INFO")
    return parser


def make_supervisor(cfg: KVStoreConfig) -> MasterSupervisor:
    """The master's supervisor; ports left at 0 are picked now and kept across restarts."""
    host = cfg.master_host
    ports = MasterPorts(
        host=host,
        rpc_port=cfg.master_rpc_port or free_port(host),
        metadata_port=cfg.master_metadata_port or free_port(host),
        metrics_port=cfg.master_metrics_port or free_port(host),
    )
    argv = master_argv(
        find_master_binary(cfg.master_binary), ports, cfg.master_kv_lease_ttl_ms, cfg.master_args
    )
    return MasterSupervisor(argv, ports)


def advertisement(
    metrics_port: int, master: MasterSupervisor | None, index: KVIndex
) -> dict[str, object]:
    """What workers and routers read from the kvstore's etcd value (``capacity``)."""
    info: dict[str, object] = {"metrics_port": metrics_port, "store_epoch": index.store_epoch}
    if master is not None:
        info["master_rpc_address"] = master.ports.rpc_address
        info["metadata_url"] = master.ports.metadata_url
    return info


async def serve(cfg: KVStoreConfig) -> int:
    assert cfg.instance_id is not None
    index = KVIndex(cfg.capacity_blocks)
    master = make_supervisor(cfg) if cfg.master else None
    servicer = KVIndexServicer(index, cfg.instance_id, master)
    registrar: Registrar | None = None

    def on_master_restart() -> None:
        servicer.on_master_restart()
        if registrar is not None:  # a new store epoch: say so in etcd too
            registrar.update(capacity={**registrar.info.capacity, "store_epoch": index.store_epoch})

    if master is not None:
        master.on_restart = on_master_restart
        log.info("starting mooncake_master: %s", " ".join(master.argv))
        await master.start()

    server = grpc.aio.server(options=SERVER_OPTIONS)
    kpb_grpc.add_KVIndexServiceServicer_to_server(servicer, server)
    port = add_port(server, f"{cfg.host}:{cfg.port}", cfg.grpc_tls)
    if port == 0:
        raise OSError(f"could not bind {cfg.host}:{cfg.port}")
    await server.start()
    address = f"{cfg.advertise_host or cfg.host}:{port}"
    metrics = KVStoreMetrics(cfg.instance_id, index, master)
    metrics_port = metrics.serve(cfg.host, cfg.metrics_port)

    watcher: MembershipWatcher | None = None
    if cfg.register:
        info = InstanceInfo(
            id=cfg.instance_id, address=address, role=ROLE, role_epoch=0, model="",
            incarnation=uuid.uuid4().hex[:12], pid=os.getpid(), host=socket.gethostname(),
            capacity=advertisement(metrics_port, master, index),
        )  # fmt: skip
        registrar = Registrar(
            cfg.etcd_endpoints, cfg.cluster, info, cfg.lease_ttl, kvstore_prefix(cfg.cluster)
        )
        await registrar.start()
        # Workers that leave the cluster take their index entries with them.
        watcher = MembershipWatcher(cfg.etcd_endpoints, cfg.cluster)
        watcher.add_listener(servicer.on_membership)
        await watcher.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = f"{READY_PREFIX} id={cfg.instance_id} address={address} metrics_port={metrics_port}"
    if master is not None:
        ready += f" master={master.ports.rpc_address} metadata_url={master.ports.metadata_url}"
    print(ready, flush=True)
    await stop.wait()

    log.info("shutting down kvstore %s", cfg.instance_id)
    if watcher is not None:
        await watcher.stop()
    if registrar is not None:
        await registrar.stop(deregister=True)
    await server.stop(grace=1.0)
    metrics.close()
    if master is not None:
        await master.stop()
    return 0


def main(argv: list[str] | None = None, prog: str = "epdserve kvstore") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s kvstore %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = from_args(KVStoreConfig, args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return event_loop.run(serve(cfg))
    # Port in use, no master binary, master won't start, a bad EPDSERVE_EVENT_LOOP.
    except (OSError, RuntimeError, ValueError) as exc:
        log.debug("start-up failed", exc_info=True)
        print(f"error: kvstore failed to start: {exc}", file=sys.stderr)
        return 1
