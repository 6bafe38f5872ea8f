"""Start a worker: load the engine, serve gRPC, register in etcd, drain on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from importlib import metadata
from typing import Any

import grpc

from services.common import event_loop
from services.common.aio import cancel_and_wait
from services.common.dataclass_cli import from_args
from services.common.grpc_utils import SERVER_OPTIONS, add_port
from services.common.heap import freeze_startup_objects
from services.common.lora_registry import LoRARegistry
from services.common.membership import InstanceInfo, Registrar
from services.common.mooncake_agent import MooncakeAgent, MooncakeConfig
from services.common.phases import PhaseInterceptor
from services.common.proto import worker_pb2_grpc as pb_grpc
from services.common.tracing import Tracing
from services.decode.fence import grpc_fence
from services.decode.kv_receiver import KVReceiver
from services.decode.role import DecodeRole
from services.encoder.cache import EncoderCache
from services.encoder.handoff import EmbeddingFetcher
from services.encoder.metrics import ImageMetrics
from services.encoder.role import EncodeRole
from services.engine.async_engine import AsyncLLMEngine
from services.engine.config import EngineConfig
from services.engine.image_processing import load_image_processor
from services.engine.kv_staging import KVStaging
from services.engine.model_files import model_source
from services.engine.speculative.states_push import StatesArena
from services.prefill.kv_sender import KVSender
from services.prefill.rank_push import RankPushes
from services.prefill.role import PrefillRole
from services.worker import lease_handover, model_load
from services.worker.config import READY_PREFIX, WorkerConfig, build_parser
from services.worker.health import add_health
from services.worker.image_inputs import ImageLoader
from services.worker.kv_events import KVEventPublisher, kv_layout_key
from services.worker.kv_store import attach_kv_store
from services.worker.lora import restore_adapters
from services.worker.pooling import check_role, pooling_task
from services.worker.role_controller import DesiredRoleWatcher
from services.worker.server import WorkerServicer
from services.worker.state import WorkerState

log = logging.getLogger("epdserve.worker")


async def serve(
    wcfg: WorkerConfig,
    ecfg: EngineConfig,
    reload: model_load.ModelReload | None = None,
    handover: lease_handover.LeaseKeeper | None = None,
) -> int:
    """Run the worker until SIGTERM, or until a LoadModel call asks for ``reload``;
    ``handover``: the lease of the key a model load's restart left (worker/lease_handover.py),
    given up once this process registered."""
    engine = AsyncLLMEngine(ecfg)
    log.info("loading model %s ...", ecfg.model or "(default)")
    await engine.start()
    assert wcfg.instance_id is not None
    check_role(engine, wcfg.role)
    state = WorkerState(wcfg.instance_id, WorkerConfig.new_incarnation(), wcfg.role)
    prefill_role, decode_role = setup_kv_transfer(wcfg, ecfg, engine)
    servicer = WorkerServicer(
        engine, state, wcfg.load_report_interval_ms, prefill=prefill_role, decode=decode_role,
        drain_timeout_s=wcfg.role_drain_timeout_s, supports_pd=prefill_role is not None,
    )  # fmt: skip

    if prefill_role is not None and prefill_role.sender.staging is not None:
        servicer.metrics.watch_staging(prefill_role.sender.staging, decode_role.receiver.staging)
    if decode_role is not None and decode_role.receiver.states is not None:
        servicer.metrics.watch_draft_states(decode_role.receiver.states)
    setup_images(wcfg, engine, servicer)
    servicer.loader.configs = (wcfg, ecfg)
    servicer.engine_stall_s = wcfg.engine_stall_s
    servicer.sleeper.engine_sleep.spill_dir = wcfg.sleep_dir or None
    if reload is not None:
        servicer.loader.reload = reload
    for role in servicer.parts():
        role.start()
    tracing = Tracing(wcfg.otlp_traces_endpoint, "epdserve-worker", wcfg.instance_id)
    # Phase histograms and spans of every request call (common/phases.py).
    phases = PhaseInterceptor(servicer.metrics, state, tracing)
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[phases])
    pb_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    add_health(
        server, engine, wcfg.engine_stall_s
    )  # grpc.health.v1: `epdserve up` and Kubernetes probe it
    port = add_port(server, f"{wcfg.host}:{wcfg.port}", wcfg.grpc_tls)
    if port == 0:
        raise RuntimeError(f"could not bind {wcfg.host}:{wcfg.port}")
    await server.start()
    address = f"{wcfg.advertise_host or wcfg.host}:{port}"

    load_error = os.environ.get(model_load.ERROR_ENV, "")
    registrar: Registrar | None = None
    desired: DesiredRoleWatcher | None = None
    restoring: asyncio.Task[None] | None = None
    publisher: KVEventPublisher | None = None
    if wcfg.register:
        info = InstanceInfo(
            id=wcfg.instance_id,
            address=address,
            role=state.role,
            role_epoch=state.role_epoch,
            model=engine.model_name,
            incarnation=state.incarnation,
            pid=os.getpid(),
            host=socket.gethostname(),
            capacity={
                "max_model_len": engine.max_model_len,
                # Where routers load this model's tokenizer from (model_files.model_source).
                "model_path": model_source(ecfg.model),
                "max_num_seqs": ecfg.max_num_seqs,
                "num_total_blocks": engine.stats().num_total_blocks,
                "kv_transfer": wcfg.kv_transfer,
                "encode": servicer.encoder is not None,  # can take the encode role
                # A pooling model's task ("embed", "classify"), or None: it generates.
                "pooling": pooling_task(engine),
                # The prompt a causal LM made a yes/no reranker judges (router/api/pooling.py).
                "score_template": "qwen3_reranker" if ecfg.classifier_from_tokens else None,
                # Cache-aware routers hash prompts into blocks exactly like this engine.
                "block_size": ecfg.block_size,
                "kv_layout": kv_layout_key(engine.engine),
                # PD pairs need the same size (rank i writes into rank i).
                "tensor_parallel_size": ecfg.tensor_parallel_size,
            },
        )
        if load_error:  # this process brought the old model back (worker/model_load.py)
            info.capacity["load_error"] = load_error
        registrar = Registrar(wcfg.etcd_endpoints, wcfg.cluster, info, ttl=wcfg.lease_ttl)
        state.on_change = lambda: registrar.update(  # type: ignore[union-attr]
            role=state.role, role_epoch=state.role_epoch, draining=state.draining,
            state=state.phase,
        )  # fmt: skip
        await registrar.start()
        desired = DesiredRoleWatcher(
            wcfg.etcd_endpoints, wcfg.cluster, wcfg.instance_id, servicer.roles
        )
        await desired.start()
        publisher = KVEventPublisher(
            engine, wcfg.instance_id, state.incarnation, engine.model_name, info.capacity["kv_layout"],
            wcfg.etcd_endpoints, wcfg.cluster, wcfg.grpc_tls,
        )  # fmt: skip
        await publisher.start()
        try:
            await asyncio.wait_for(registrar.registered.wait(), timeout=30)
        except TimeoutError:
            log.warning("etcd not reachable yet; serving and retrying registration")
        if handover is not None:  # revoked once our key replaced the handed-over one
            await asyncio.to_thread(handover.release, registrar.registered.is_set())
        # NOTE: after registering: a load through the API records its adapter after loading
        # it on the workers it knows, then loads it on those that joined meanwhile; only a
        # worker that router has not seen yet by then can miss it (router/api/lora.py).
        if ecfg.lora_enabled:
            registry = LoRARegistry(wcfg.etcd_endpoints, wcfg.cluster)
            restoring = asyncio.create_task(restore_adapters(engine, registry, engine.model_name))
    await attach_kv_store(
        wcfg,
        engine,
        (lambda: publisher.locator.watcher.instances) if publisher is not None else None,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servicer.loader.stop = stop.set
    metrics_port = servicer.metrics.serve(wcfg.host, wcfg.metrics_port)
    model_load.started()
    freeze_startup_objects()
    print(
        f"{READY_PREFIX} id={wcfg.instance_id} address={address} role={state.role} "
        f"model={engine.model_name} metrics_port={metrics_port}",
        flush=True,
    )
    exit_code = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        if not getattr(engine, "is_running", True):
            # A dead engine must say so: leave the cluster and exit non-zero.
            log.error("engine is not running any more; shutting the worker down")
            exit_code = 1
            break

    # Graceful shutdown: leave the cluster first so no new work arrives, refuse what still
    # does, let in-flight requests finish, then stop.
    log.info("shutting down: deregistering, draining %d in-flight", len(state.inflight))
    state.draining = True
    if restoring is not None:
        await cancel_and_wait(restoring)
    if desired is not None:
        await desired.stop()
    if publisher is not None:
        await publisher.stop()
    reloading = servicer.loader.reload.argv is not None
    if registrar is not None and not reloading:
        await registrar.stop(deregister=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(state.idle.wait(), timeout=wcfg.drain_timeout_s)
    servicer.closing.set()
    await server.stop(grace=2.0)
    for role in servicer.parts():
        await role.stop()
    servicer.metrics.close()
    await asyncio.to_thread(tracing.shutdown)
    await engine.shutdown()
    if registrar is not None and reloading:
        # The key stays, "loading", for the restarted image to keep (worker/lease_handover.py).
        lease = await registrar.hand_over(lease_handover.HANDOVER_TTL_S)
        if lease is not None:
            os.environ[lease_handover.ENV] = lease_handover.handover_env(
                lease, wcfg.etcd_endpoints, registrar.key, registrar.info.to_json()
            )
    log.info("worker %s stopped", wcfg.instance_id)
    return exit_code


def setup_kv_transfer(wcfg: WorkerConfig, ecfg: EngineConfig, engine: AsyncLLMEngine):
    """Both PD roles' machinery, set up once so that a role flip needs no restart: the KV
    cache is registered with Mooncake at start-up (CPU memory directly; on CUDA the CUDA
    Mooncake wheel registers device memory; with the non-CUDA wheel on an accelerator the KV
    goes through pinned host staging slots, see services/engine/kv_staging.py)."""
    if wcfg.kv_transfer == "none":
        return None, None
    llm_engine = engine.engine
    assert llm_engine is not None
    unregistrable = ecfg.device_type != "cpu" and _mooncake_flavour() == "non-cuda"
    if unregistrable and wcfg.kv_staging == "off":
        raise ValueError(
            "the installed Mooncake (non-CUDA wheel) cannot register device memory: use "
            "--kv-staging auto, the accelerator build (pip install 'epdserve[cuda]' or "
            "'[npu]'), or --kv-transfer none"
        )
    mooncake = MooncakeConfig(
        host=wcfg.advertise_host or wcfg.host,
        protocol=wcfg.mooncake_protocol,
        device_name=wcfg.mooncake_device,
    )
    agent = MooncakeAgent(mooncake)
    runner = llm_engine.runner
    layout = runner.layout
    staging = receive = None
    if wcfg.kv_staging == "on" or (wcfg.kv_staging == "auto" and unregistrable):
        # NOTE: with tensor parallelism a rank's pushes take slots of their own while the
        # driver picks every rank's receive slots, so each rank holds a send and a receive
        # set (rank_push.py): --kv-staging-bytes is split between the two on every rank.
        sets = 1 if runner.ranks is None else 2
        slots = max(1, wcfg.kv_staging_bytes // sets // runner.bytes_per_block)
        staging = KVStaging(runner.kv_cache, layout.fingerprint, slots, agent.register)
        receive = staging if sets == 1 else KVStaging(runner.kv_cache, layout.fingerprint,
                                                      slots, agent.register)  # fmt: skip
    else:
        agent.register(layout.base_addr, layout.total_bytes)
    sender = KVSender(
        agent,
        layout,
        ecfg.block_size,
        min_write_bytes=wcfg.kv_push_min_write_bytes,
        staging=staging,
    )
    llm_engine.layer_hook = sender.on_layer_done
    # Tensor parallelism: every other rank registers its own cache (or staging slots) with a
    # transfer engine of its own and pushes its own heads (services/prefill/rank_push.py).
    ranks = None
    if runner.ranks is not None:
        ranks = RankPushes(runner.ranks, mooncake, ecfg.block_size, wcfg.kv_push_min_write_bytes,
                           staging.num_slots if staging is not None else 0)  # fmt: skip
    # An EAGLE-3 head's states go with the KV (services/engine/speculative/states_push.py).
    form = getattr(llm_engine.executor.drafter, "states_form", None)
    states = None
    if form is not None and wcfg.draft_states_bytes > 0:
        width, dtype = form()
        states = StatesArena(width, dtype, wcfg.draft_states_bytes, agent.register)
    receiver = KVReceiver(
        engine, layout, wcfg.reserve_timeout_s, staging=receive,
        write_grace_s=wcfg.kv_write_grace_s, fence=grpc_fence(wcfg.grpc_tls),
        fence_timeout_s=wcfg.kv_fence_timeout_s,
        rank_stage_in=ranks.stage_in if ranks is not None and staging is not None else None,
        states=states,
    )  # fmt: skip
    log.info(
        "KV transfer: Mooncake %s session %s%s%s%s", wcfg.mooncake_protocol, agent.session_id,
        f", through {staging.num_slots} host staging slots" if staging is not None else "",
        " each way" if receive is not staging else "",
        f"; EAGLE-3 states pushed with it ({states.nbytes >> 20} MiB registered)"
        if states is not None else "",
    )  # fmt: skip
    prefill = PrefillRole(
        engine, sender, ecfg.block_size, wcfg.kv_transfer_timeout_s, ranks, states
    )
    rank_caches = [(e.session_id, e.layout) for e in ranks.endpoints] if ranks else []
    return prefill, DecodeRole(engine, receiver, agent.session_id, rank_caches)


def setup_images(wcfg: WorkerConfig, engine: AsyncLLMEngine, servicer: WorkerServicer) -> None:
    """Image inputs of a vision-language model (nothing for a text model): the loader that
    turns a request's images into engine inputs (reading an encoder's embeddings through
    the PD roles' Mooncake agent when there is one) and the encode role, whose cache lives
    in memory registered with that agent."""
    llm_engine = engine.engine
    assert llm_engine is not None
    model: Any = llm_engine.runner.model
    if not getattr(model, "is_multimodal", False):
        if wcfg.role == "encode":
            raise ValueError(f"role encode needs a vision-language model, not {engine.model_name}")
        return
    processor = load_image_processor(str(llm_engine.model_path))
    metrics = ImageMetrics(servicer.metrics.registry, engine.model_name, servicer.state.instance_id)
    agent = servicer.prefill.sender.agent if servicer.prefill is not None else None
    fetcher = EmbeddingFetcher(agent) if agent is not None else None
    servicer.images = ImageLoader(processor, fetcher, metrics, wcfg.kv_transfer_timeout_s)
    if agent is not None:
        cache = EncoderCache(wcfg.encoder_cache_bytes, agent.register, agent.unregister)
        servicer.encoder = EncodeRole(
            engine, cache, processor, agent.session_id, servicer.state.instance_id, metrics,
            int(model.spatial_merge_size),
        )  # fmt: skip


def _mooncake_flavour() -> str:
    """Which Mooncake wheel is installed: non-cuda, npu, cuda (or none)."""
    for dist, flavour in (
        ("mooncake-transfer-engine-non-cuda", "non-cuda"),
        ("mooncake-transfer-engine-npu", "npu"),
        ("mooncake-transfer-engine", "cuda"),
        ("mooncake-transfer-engine-cuda13", "cuda"),
    ):
        try:
            metadata.version(dist)
            return flavour
        except metadata.PackageNotFoundError:
            continue
    return "none"


def main(
    argv: list[str] | None = None,
    prog: str = "epdserve worker",
    handover: lease_handover.LeaseKeeper | None = None,
) -> int:
    if handover is None:
        handover = lease_handover.keep_from_env()
    parser = build_parser(prog)
    parser.exit_on_error = False  # argument errors raise: a model load's restart falls back
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            raise ValueError(f"unrecognized arguments: {' '.join(unknown)}")
        logging.basicConfig(
            level=args.log_level.upper(),
            format="%(asctime)s %(levelname)s worker %(name)s: %(message)s",
            stream=sys.stderr,
        )
        wcfg = from_args(WorkerConfig, args)
        ecfg = from_args(EngineConfig, args)
    except (ValueError, argparse.ArgumentError) as exc:
        model_load.fall_back(exc)  # started by a model load: the old command line again
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    reload = model_load.ModelReload()
    try:
        code = event_loop.run(serve(wcfg, ecfg, reload, handover))
    except Exception as exc:
        model_load.fall_back(exc)  # started by a model load: the old model again
        if handover is not None:  # leave the cluster now, not when the lease runs out
            handover.release(revoke=True)
        if not isinstance(exc, ValueError | OSError):
            raise
        # A bad model path, a port in use: say it in one line.
        log.debug("start-up failed", exc_info=True)
        print(f"error: worker failed to start: {exc}", file=sys.stderr)
        return 1
    if reload.argv is not None:
        reload.exec()
    return code
