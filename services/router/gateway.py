"""Gateway: everything one router process holds (pool, orchestrator, tokenizer, metrics...),
built from its config, started and stopped as one; the HTTP handlers receive it."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from services.common.lora_registry import LoRARegistry
from services.common.membership import MembershipWatcher
from services.common.tracing import Tracing
from services.router.admission import AdmissionControl
from services.router.auth import load_admin_token, load_api_keys
from services.router.config import RouterConfig
from services.router.errors import APIError
from services.router.metrics import RouterMetrics
from services.router.model_swap import ModelSwapper
from services.router.offline import OfflineAdmission
from services.router.offload import Offload
from services.router.phases import RouterPhases
from services.router.rebalance.leader import LeaderElection
from services.router.rebalance.rebalancer import Rebalancer
from services.router.rebalance.role_store import RoleStore
from services.router.response_store import ResponseStore
from services.router.routing.kv_index import KVIndexClient
from services.router.routing.orchestrator import Orchestrator
from services.router.routing.poison import PoisonTracker
from services.router.routing.policies.factory import create_policy
from services.router.routing.unavailable import (
    ASLEEP_RETRY_AFTER_S,
    in_transition,
    no_worker_error,
)
from services.router.routing.workers import WorkerPool
from services.router.shutdown import Shutdown
from services.router.tokenization import Tokenizer
from services.router.tokenizers import Tokenizers
from services.router.waiting_board import WaitingBoard

log = logging.getLogger(__name__)

# A request for a model whose workers all sleep waits this long for one to wake up, then gets
# a 503 with Retry-After (ASLEEP_RETRY_AFTER_S, seconds).
ASLEEP_WAIT_S = 5.0
# A router (re)started beside serving workers opens its port once it has read them from etcd
# (a request in the moment between was a 503 "no workers available"); with etcd away it
# starts after this long anyway, and learns the workers when etcd answers.
FIRST_LISTING_WAIT_S = 5.0
STARTING_POLL_S = 0.1  # how often a request waiting for a starting worker looks again


class Gateway:
    """Everything one router process holds; the HTTP handlers receive it."""

    def __init__(self, cfg: RouterConfig, tokenizer: Any) -> None:
        self.cfg = cfg
        self.metrics = RouterMetrics()
        self.tracing = Tracing(cfg.otlp_traces_endpoint, "epdserve-router")
        self.pool = WorkerPool(
            cfg.load_report_interval_ms, cfg.load_stale_s, cfg.request_timeout_s, cfg.grpc_tls,
            cfg.worker_mux,
        )  # fmt: skip
        # Each served model's tokenizer; ``tokenizer`` (the router's --model) is the default.
        self.tokenizers = Tokenizers(tokenizer, cfg.model, self.pool, Tokenizer.load)
        self.policy = create_policy(cfg.policy)
        self.kv_index = KVIndexClient(cfg.etcd_endpoints, cfg.cluster, cfg.grpc_tls)
        self.orchestrator = Orchestrator(
            self.pool,
            self.policy,
            cfg.request_timeout_s,
            cfg.max_attempts,
            max_migrations=cfg.max_migrations,
            stall_timeout_s=cfg.stall_timeout_s,
            restart_wait_s=cfg.worker_restart_wait_s,
            lora_slack=cfg.lora_affinity_slack,
            on_migration=lambda reason: self.metrics.migrations.labels(reason).inc(),
            kv_index=self.kv_index,
            poison=PoisonTracker(cfg.poison_max_deaths, frozen_s=cfg.load_stale_s / 2),
            phases=RouterPhases(self.metrics, self.tracing),
        )
        self.watcher = MembershipWatcher(cfg.etcd_endpoints, cfg.cluster)
        self.watcher.add_listener(self.pool.on_membership)
        self.started_at = int(time.time())
        self.shutdown = Shutdown(cfg.shutdown_grace_s)  # begun by main.GatewayServer on SIGTERM
        self.admin_token = load_admin_token(cfg.admin_token_file)
        self.api_keys = load_api_keys(cfg.api_keys_file)  # NOTE: never logged
        self.admission = AdmissionControl(cfg.max_queued_tokens)  # online requests
        self.offline = OfflineAdmission(cfg, self.pool, self.metrics)  # service tier flex
        self.orchestrator.has_room = self.offline.has_room
        # Tokenization, chat templates and grammar checks of requests, off the event loop.
        self.offload = Offload(cfg.preprocess_threads)
        # This replica's name among several routers (the leader election's candidate name).
        self.identity = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # Stored Responses API responses (every router's), and this router's background runs.
        self.responses = ResponseStore(
            cfg.etcd_endpoints, cfg.cluster, cfg.response_ttl_s, cfg.response_max_record_bytes,
            cfg.response_max_records, cfg.response_local_bytes,
            os.path.join(cfg.batch_root, "responses"),
        )  # fmt: skip
        self.background: dict[str, asyncio.Task[None]] = {}
        # The LoRA adapters loaded through the API, for workers that start later.
        self.lora_registry = LoRARegistry(cfg.etcd_endpoints, cfg.cluster)
        # Held by each LoRA load and unload of this router (api/lora.py): one at a time.
        self.lora_admin = asyncio.Lock()
        self.rebalancer = Rebalancer(
            self.pool, RoleStore(cfg.etcd_endpoints, cfg.cluster), self.metrics.rebalance,
            LeaderElection(cfg.etcd_endpoints, cfg.cluster, self.identity),
            cfg.rebalance_policy, cfg.rebalance_param_dict, cfg.governor_config,
            cfg.rebalance_interval_s,
        )  # fmt: skip
        # Wake-ups of sleeping models for waiting requests; with a cap, the leader's swaps.
        self.swapper = ModelSwapper(
            cfg, self.pool,
            WaitingBoard(cfg.etcd_endpoints, cfg.cluster, self.identity,
                         read=lambda: self.rebalancer.is_leader),
            is_leader=lambda: self.rebalancer.is_leader,
        )  # fmt: skip

    async def start(self) -> None:
        await self.watcher.start()
        try:
            await asyncio.wait_for(self.watcher.synced.wait(), FIRST_LISTING_WAIT_S)
        except TimeoutError:
            log.warning("no worker listing from etcd within %.0f s; starting without one",
                        FIRST_LISTING_WAIT_S)  # fmt: skip
        await self.kv_index.start()
        await self.rebalancer.start()
        await self.swapper.start()
        self.responses.start()

    async def stop(self) -> None:
        """Stop every part, in order. A step that fails is logged and the rest still run (an
        early failure left the worker pool's channels and the threads open); the first
        failure is raised at the end."""
        steps: list[tuple[str, Callable[[], Awaitable[object] | None]]] = [
            ("background responses", self._stop_background),
            ("model swapper", self.swapper.stop),
            ("response store", self.responses.close),
            ("LoRA registry", self.lora_registry.close),
            ("rebalancer", self.rebalancer.stop),
            ("membership watcher", self.watcher.stop),
            ("KV index client", self.kv_index.stop),
            ("worker pool", self.pool.close),
            ("tracing", lambda: asyncio.to_thread(self.tracing.shutdown)),
            ("preprocess threads", self.offload.close),
        ]
        failed: Exception | None = None
        for name, step in steps:
            try:
                result = step()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                log.exception("stopping the router: %s failed; stopping the rest", name)
                failed = failed or exc
        if failed is not None:
            raise failed

    async def _stop_background(self) -> None:
        tasks = list(self.background.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def served_models(self) -> dict[str, int]:
        """Served model -> context length: the workers' in the pool, and those of workers lost
        lately, while they may come back (restarts.py), or starting (routing/starting.py):
        requests for them wait. A context length known wins over a starting worker's 0."""
        wait_s = self.cfg.worker_restart_wait_s
        return {**self.pool.starting.models(wait_s), **self.pool.lost.models(wait_s),
                **self.pool.models()}  # fmt: skip

    def resolve_model(self, name: str, serving: bool = True) -> tuple[str, int]:
        """(served name, context length) for a requested model, or 404 / 503; ``serving``:
        some worker must be usable for it too (not needed only to tokenize)."""
        # The common case first: a base model of the pool's workers (its context length the
        # pool's: served_models' own precedence), one of them usable: what the checks below
        # return for it, without building the views they need for the other cases.
        listed = self.pool.models()
        if name in listed and (not serving or self.can_serve(name)):
            return name, listed[name]
        wait_s = self.cfg.worker_restart_wait_s
        models = self.served_models()
        if not models:
            raise APIError(503, "no workers available", code="no_workers")
        adapters = self.pool.adapters()
        parent = adapters.get(name) if name not in models else None
        if parent is not None:  # a LoRA adapter: its base model's context length
            models = {**models, name: models[parent]}
        if name not in models:
            # The adapters too: /v1/models lists them, a request may name one.
            # NOTE: a lost worker's adapters are among ``models`` too (restarts.py): once.
            known = sorted(m for m in models if m not in adapters)
            known += sorted(f"{a} (LoRA of {p})" for a, p in adapters.items())
            raise APIError(
                404, f"The model '{name}' does not exist; available: {', '.join(known)}",
                param="model", code="model_not_found",
            )  # fmt: skip
        if self.not_served_yet(name, wait_s) and name not in self.pool.lost.models(wait_s):
            # Its context length and tokenizer are known once a worker of it serves:
            # ``resolve_awake`` waits for that, other callers get the 503 with Retry-After.
            raise no_worker_error(self.pool, name, f"model '{name}' is starting: no worker of "
                                  "it serves yet", wait_s)  # fmt: skip
        # NOTE: a worker out of routing only for a moment still counts (the orchestrator
        # waits a little for it): with the only other one just died, that is no 503.
        if (
            serving
            and not self.can_serve(name)
            and not self.pool.may_serve(name)
            and not self.orchestrator.path_coming(name, 0.0)
        ):
            if self.pool.asleep(name):
                raise APIError(
                    503, f"model '{name}' is asleep: the workers it needs sleep (`epdserve models "
                    f"wake WORKER` wakes one); retry after {ASLEEP_RETRY_AFTER_S} s",
                    code="model_asleep", headers={"Retry-After": str(ASLEEP_RETRY_AFTER_S)},
                )  # fmt: skip
            if self.pool.all_in(name, "loading"):  # worker/model_load.py
                raise APIError(
                    503, f"model '{name}' is unavailable: its workers are loading another model; "
                    f"retry after {ASLEEP_RETRY_AFTER_S} s", code="model_unavailable",
                    headers={"Retry-After": str(ASLEEP_RETRY_AFTER_S)},
                )  # fmt: skip
            # A worker of it that died starting is due back (routing/starting.py).
            left = self.pool.starting.wait_left(name, wait_s)
            raise APIError(503, f"no usable worker for model '{name}'", code="no_workers",
                           headers={"Retry-After": str(left)} if left else None)  # fmt: skip
        return name, models[name]

    async def resolve_awake(self, name: str) -> tuple[str, int]:
        """``resolve_model`` for a request that generates: while the model is asleep, wait up
        to ASLEEP_WAIT_S for a worker of it to wake up, then the 503 with Retry-After. A
        waiting request is counted on the waiting board (the leader swaps from every router's).
        While the model's only workers are starting, wait for one to serve first."""
        await self.wait_started(name)
        deadline = time.monotonic() + ASLEEP_WAIT_S
        with contextlib.ExitStack() as counted:
            waits_for: str | None = None  # the base model it is counted as waiting for
            while True:
                try:
                    resolved = self.resolve_model(name)
                    self.swapper.asked(self.pool.base_model(name))
                    return resolved
                except APIError as err:
                    # NOTE: a model whose workers are draining to sleep (or to another role)
                    # is for a moment neither asleep nor serving: wait for either.
                    passing = err.code == "no_workers" and in_transition(self.pool, name)
                    if not (err.code == "model_asleep" or passing):
                        raise
                    if time.monotonic() >= deadline and passing:
                        raise no_worker_error(self.pool, name, err.message) from None
                    if time.monotonic() >= deadline:
                        raise
                base = self.pool.base_model(name)
                if waits_for is None:
                    waits_for = base
                    counted.enter_context(self.swapper.board.waiting(base))
                self.swapper.wanted(base)
                await asyncio.sleep(0.2)

    def only_starting(self, name: str) -> bool:
        """Workers of ``name`` are starting and none of it has a handle: its tokenizer and
        context length are not known yet (routing/starting.py)."""
        pool = self.pool
        return pool.starting.has(name) and not any(h.info.model == name
                                                   for h in pool.handles.values())  # fmt: skip

    def not_served_yet(self, name: str, wait_s: float) -> bool:
        """``only_starting(name)``, or its workers died starting less than ``wait_s`` ago (a
        restart is due): no tokenizer nor context length of it is known (the default
        tokenizer is another model's)."""
        pool = self.pool
        return name in pool.starting.models(wait_s) and not any(
            h.info.model == name for h in pool.handles.values()
        )

    async def wait_started(self, name: str) -> None:
        """While ``only_starting(name)``, wait for one of its workers to serve, up to the start
        budget (``worker_restart_wait_s`` from the worker's start: ``path_coming`` then says
        no) and the request's deadline; then the no_workers 503, its Retry-After what is left
        of the budget."""
        cfg = self.cfg
        deadline = time.monotonic() + min(cfg.worker_restart_wait_s, cfg.request_timeout_s)
        while self.only_starting(name):
            if time.monotonic() >= deadline or not self.orchestrator.path_coming(name, 0.0):
                raise no_worker_error(self.pool, name, f"no usable worker for model '{name}': "
                                      "its workers are starting", cfg.worker_restart_wait_s)  # fmt: skip
            await asyncio.sleep(STARTING_POLL_S)

    async def tokenizer(self, model: str) -> Tokenizer:
        """The tokenizer of ``model``, a name ``resolve_model`` accepted."""
        return await self.tokenizers.get(model)  # type: ignore[no-any-return]

    def can_serve(self, model: str | None = None) -> bool:
        """A mixed worker, or a prefill + decode pair, is usable for ``model``."""
        pool = self.pool
        return bool(pool.candidates("mixed", model)) or (
            bool(pool.candidates("prefill", model)) and bool(pool.candidates("decode", model))
        )

    def healthy(self) -> bool:
        return self.can_serve()
