"""Start and stop a local cluster: etcd, workers and routers as child processes.

Used by `epdserve up` and by the cluster tests. Each child prints a ready line on stdout;
the launcher waits for it (showing progress) and then for each router's /health. Several
router replicas share etcd and serve at once on consecutive ports; one of them (the etcd
election's winner) runs the rebalancer.
"""

from __future__ import annotations

import os
import secrets
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from services.cli.admin_config import AdminFiles
from services.cli.children import EtcdChild, ManagedProcess
from services.cli.cluster_spec import ClusterSpec, ModelGroup, served_name_of
from services.cli.commands import kvstore_command, router_command, worker_command
from services.common.cpus import ENV as CPUS_ENV
from services.common.etcd_server import EtcdServer
from services.common.net import free_port, open_direct
from services.engine.config import EngineConfig
from services.kvstore.config import KVStoreConfig
from services.kvstore.main import READY_PREFIX as KVSTORE_READY
from services.router.config import RouterConfig
from services.router.shutdown import stop_wait_s
from services.worker.config import READY_PREFIX as WORKER_READY
from services.worker.config import WorkerConfig

ROUTER_READY = "EPDSERVE_ROUTER_READY"


# The workers' OpenMP threads sleep between parallel regions instead of spinning: the local
# cluster's processes share the machine's cores, and a spinning thread takes a core from the
# router, etcd and the worker's own I/O (docs/performance.md). Kept as the user set it.
WORKER_ENV_DEFAULTS = {} if "OMP_WAIT_POLICY" in os.environ else {"OMP_WAIT_POLICY": "PASSIVE"}


class LocalCluster:
    """etcd + workers + routers on this machine. ``start()`` returns when they are healthy."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.etcd = EtcdServer(security=spec.etcd_security)
        self.workers: list[ManagedProcess] = []
        self.routers: list[ManagedProcess] = []
        self.kvstore: ManagedProcess | None = None
        self.base_urls: list[str] = []  # one per router, in order
        self.base_url = ""  # the first router's
        self._worker_count = 0
        # The router's admin token: generated here, handed over in a 0600 file (never argv).
        # NOTE: hex, not token_urlsafe: one of those in 64 starts with "-", and
        # `epdserve status --admin-token <token>` then reads it as an option.
        self.admin_token = secrets.token_hex(32)
        self.admin_files = AdminFiles(spec.admin_dir, self.admin_token)

    @property
    def admin_dir(self) -> Path:
        """Where the CLI finds the router's URL and admin token (0600 files); a private folder
        when the spec names none."""
        return self.admin_files.folder

    @property
    def router(self) -> ManagedProcess | None:
        """The first router (the one the CLI is pointed at)."""
        return self.routers[0] if self.routers else None

    def engine_config(self, group: int = 0) -> EngineConfig:
        """The engine of the workers of model ``group`` (0: the spec's own model)."""
        g = self.spec.groups()[group]
        overrides = dict(self.spec.engine_overrides)
        if g.lora_modules:
            overrides["lora_modules"] = list(g.lora_modules)
        return EngineConfig(
            model=g.model, served_model_name=g.served_model_name,
            device=self.spec.device, **overrides,  # type: ignore[arg-type]
        )  # fmt: skip

    def worker_plan(self) -> list[tuple[int, str]]:
        """(model group, role) of each worker, in start order."""
        return [(i, role) for i, g in enumerate(self.spec.groups()) for role in g.roles()]

    def worker_roles(self) -> list[str]:
        return [role for _, role in self.worker_plan()]

    def worker_argv(self, index: int, role: str = "mixed", group: int = 0) -> list[str]:
        overrides = dict(self.spec.worker_overrides)
        if self.spec.kvstore:
            # With a kvstore, workers keep KV blocks in its Mooncake Store (found through etcd).
            overrides.setdefault("kv_store", "auto")
        wcfg = WorkerConfig(
            role=role, host=self.spec.host, port=0, instance_id=f"worker-{index}",
            cluster=self.spec.cluster, etcd=self.etcd.endpoint, lease_ttl=self.spec.lease_ttl,
            **overrides,  # type: ignore[arg-type]
        )  # fmt: skip
        return worker_command(wcfg, self.engine_config(group))

    def router_argv(self, index: int = 0) -> list[str]:
        port = self.spec.port + index if self.spec.port else free_port(self.spec.host)
        rcfg = RouterConfig(
            host=self.spec.host, port=port,
            cluster=self.spec.cluster, etcd=self.etcd.endpoint, model=self.spec.model,
            policy=self.spec.policy, admin_token_file=str(self.admin_files.token_file),
            **self.spec.router_overrides,  # type: ignore[arg-type]
        )  # fmt: skip
        return router_command(rcfg)

    def kvstore_argv(self) -> list[str]:
        kcfg = KVStoreConfig(
            host=self.spec.host, instance_id="kvstore-0", cluster=self.spec.cluster,
            etcd=self.etcd.endpoint, lease_ttl=self.spec.lease_ttl, master_host=self.spec.host,
            **self.spec.kvstore_overrides,  # type: ignore[arg-type]
        )  # fmt: skip
        return kvstore_command(kcfg)

    def start_kvstore(self) -> ManagedProcess:
        self.kvstore = ManagedProcess(
            "kvstore", self.kvstore_argv(), KVSTORE_READY, self.spec.echo,
            self.etcd.access.to_env(),
            # NOTE: probed at the gRPC level like a worker (any answer passes, UNIMPLEMENTED
            # too): a stopped kvstore was never seen, only its death. Not on mutual TLS.
            probe_grpc=not self.spec.kvstore_overrides.get("grpc_tls_ca"),
        )  # fmt: skip
        return self.kvstore

    def start_worker(self, role: str = "mixed", group: int = 0) -> ManagedProcess:
        i = self._worker_count
        self._worker_count += 1
        proc = ManagedProcess(
            f"worker-{i}", self.worker_argv(i, role, group), WORKER_READY, self.spec.echo,
            {**self.etcd.access.to_env(), **WORKER_ENV_DEFAULTS}, role=role,
            # NOTE: the probe speaks plain gRPC; a worker on mutual TLS is not probed. It
            # asks for the worker service: an engine stuck past engine_stall_s (a rank
            # stopped or hung for good) fails it, as a stopped process does.
            probe_grpc=not self.spec.worker_overrides.get("grpc_tls_ca"),
            probe_stall=True,
        )  # fmt: skip
        self.workers.append(proc)
        return proc

    def start_router(self) -> ManagedProcess:
        i = len(self.routers)
        name = "router" if i == 0 else f"router-{i}"
        proc = ManagedProcess(
            name, self.router_argv(i), ROUTER_READY, self.spec.echo,
            {**self.etcd.access.to_env(), **self.router_env()},
            probe_path="/health", ssl_context=self.http_ssl_context(),
        )  # fmt: skip
        self.routers.append(proc)
        return proc

    def router_env(self) -> dict[str, str]:
        """The routers' own environment: their CPUs, when the spec pins them."""
        return {CPUS_ENV: self.spec.frontend_cores} if self.spec.frontend_cores else {}

    def children(self) -> list[EtcdChild | ManagedProcess]:
        """Every process `up` keeps running: etcd, the kvstore, workers and routers."""
        return [EtcdChild(self.etcd), *filter(None, [self.kvstore]), *self.workers, *self.routers]

    def start(self, timeout: float = 900.0, progress: Callable[[str], None] | None = None) -> str:
        """Start everything; returns the router's base URL. Raises if a child dies."""
        say = progress or (lambda _msg: None)
        self.prepare_model(say)
        say(f"starting etcd on {self.etcd.endpoint}")
        self.etcd.start()
        if self.spec.kvstore:
            self.start_kvstore()
        for group, role in self.worker_plan():
            self.start_worker(role, group)
        self.admin_files.write_token()
        for _ in range(self.spec.routers):
            self.start_router()
        started = time.monotonic()
        last_note = 0.0
        pending = [*self.workers, *self.routers, *([self.kvstore] if self.kvstore else [])]
        while pending:
            for p in list(pending):
                if p.ready.is_set():
                    pending.remove(p)
                    say(f"{p.name} ready ({time.monotonic() - started:.0f}s): {p.ready_line}")
                elif not p.alive():
                    raise RuntimeError(p.describe_failure())
            elapsed = time.monotonic() - started
            if elapsed > timeout:
                raise TimeoutError(f"not ready after {timeout:.0f}s: {[p.name for p in pending]}")
            if pending and elapsed - last_note >= 5.0:
                last_note = elapsed
                say(
                    f"loading model... {elapsed:.0f}s, waiting for {', '.join(p.name for p in pending)}"
                )
            time.sleep(0.1)
        self.base_urls = [r.ready_field("url") for r in self.routers]
        self.base_url = self.base_urls[0]
        self.admin_files.point_cli(self.base_urls)
        for router, url in zip(self.routers, self.base_urls, strict=True):
            self.wait_healthy(
                timeout=max(30.0, timeout - (time.monotonic() - started)), router=router, url=url
            )
        say(f"cluster ready in {time.monotonic() - started:.0f}s")
        return self.base_url

    def prepare_model(self, say: Callable[[str], None]) -> None:
        """Convert a GGUF (or the default model) once here, before the children start (they
        would race to fill one cache folder), and check its LoRA adapters' shapes against the
        folder (up.py checks a folder model's earlier): ValueError before any process starts."""
        from services.cli import lora_groups
        from services.engine.model_loader import resolve_model

        groups: list[ModelGroup | ClusterSpec] = [self.spec, *self.spec.more_models]
        for g in groups:
            if g.model is not None and not g.model.endswith(".gguf"):
                continue
            say(f"preparing model {g.model or '(embedded default)'} ...")
            g.served_model_name = served_name_of(g)
            g.model = resolve_model(g.model)
            lora_groups.check_adapters(g, g.served_model_name)

    def wait_healthy(
        self,
        timeout: float = 60.0,
        router: ManagedProcess | None = None,
        url: str | None = None,
    ) -> None:
        """Wait for one router's /health (default: the first router)."""
        router = router or self.router
        url = url or self.base_url
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if router is not None and not router.alive():
                raise RuntimeError(router.describe_failure())
            try:
                with open_direct(
                    url + "/health", timeout=2.0, context=self.http_ssl_context()
                ) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"router at {url} not healthy after {timeout:.0f}s")

    def http_ssl_context(self) -> ssl.SSLContext | None:
        """How to trust an HTTPS gateway (``spec.gateway_ca``, else the system's CAs)."""
        if self.spec.gateway_ca is None:
            return None
        return ssl.create_default_context(cafile=self.spec.gateway_ca)

    def stop(self) -> None:
        """Stop the routers, then the workers (they drain), then the kvstore and etcd. Safe
        to call twice."""
        # Each group is signalled at once, then waited for: stopping takes the slowest
        # member's time, not the sum.
        grace = RouterConfig(**self.spec.router_overrides).shutdown_grace_s  # type: ignore[arg-type]
        for group, timeout in ((self.routers, stop_wait_s(grace)), (self.workers, 30)):
            for p in group:
                p.signal(signal.SIGTERM)
            for p in group:
                p.stop(timeout=timeout)
        if self.kvstore is not None:
            self.kvstore.stop(timeout=15)
        self.etcd.cleanup()
        self.admin_files.forget()
