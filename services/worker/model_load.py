"""Loading another model onto a worker (xLLM's multi-model serving): ``epdserve models load
WORKER --model PATH`` reaches the ``LoadModel`` RPC through the router's admin API.

The RPC checks the new model before touching anything (a bad path, no config.json, an
unsupported architecture or no weights is INVALID_ARGUMENT, and the worker keeps serving),
drains the worker as a role change does (it advertises "loading"), answers, and has main.py
restart the process in place (``os.execv``, same pid) with the same flags, the new
``--model``, and the old model's own settings (served name, context length, LoRA modules,
speculative config, expert placement, reranker prompt) dropped. The restart frees all of the
old model (weights, KV cache, Mooncake registrations, graphs), and the new model starts
through the path every worker starts through: its tokenizer folder, KV layout, adapters and
role machinery are advertised as at start-up, with a new incarnation, so routers drop the old
handle and put the new one in the new model's pool.

If the new model fails to start (broken weights, out of memory, a setting its command line
refuses), the process restarts once more with its old command line and advertises why
(``capacity["load_error"]``): it serves its old model again, and the admin API reports the
failure. Its etcd key stays throughout, "loading" (worker/lease_handover.py): a process that
dies outright is seen gone within seconds.

NOTE: the move lasts as long as the process: a supervisor or Kubernetes restarting the worker
starts the model of its own command line again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from multiprocessing import resource_tracker
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import grpc

from services.common.dataclass_cli import to_argv
from services.common.proto import worker_pb2 as pb
from services.engine.config import EngineConfig
from services.engine.model_files import MAX_NAME_CHARS, served_name
from services.worker import lease_handover
from services.worker.config import WorkerConfig
from services.worker.errors import BAD_REQUEST, Rules, Status, call_status

if TYPE_CHECKING:
    from services.worker.role_controller import RoleController
    from services.worker.state import WorkerState

log = logging.getLogger(__name__)

# The command line that brings the old model back when the new one fails to start (JSON);
# present only between the restart and the new model's ready line.
FALLBACK_ENV = "EPDSERVE_WORKER_FALLBACK_ARGV"
# Why the new model did not start: the process that fell back advertises it.
ERROR_ENV = "EPDSERVE_WORKER_LOAD_ERROR"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
PATH_MAX = 4096  # Linux's, in bytes


class LoadInProgress(Exception):
    """A second LoadModel while one is under way."""


LOAD: Rules = {ValueError: BAD_REQUEST, LoadInProgress: Status(grpc.StatusCode.FAILED_PRECONDITION)}


def check_model(model: str) -> None:
    """ValueError unless ``model`` looks loadable here: a .gguf file, or a folder with a
    config.json naming an architecture this engine has and weight files."""
    from services.engine.model_loader import load_hf_config
    from services.engine.models.registry import architecture

    if len(model) > PATH_MAX:  # also keeps the error messages below to a trailer's size
        raise ValueError(f"model path is longer than {PATH_MAX} characters")
    path = Path(model).expanduser()
    try:  # NOTE: is_file/is_dir raise what is not ENOENT-like (a name too long, no permission)
        if path.is_file() and path.suffix == ".gguf":
            return
        if not path.is_dir():
            raise ValueError(f"model {model!r} is neither a folder nor a .gguf file on this worker")
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {model} has no config.json")
    except OSError as exc:
        raise ValueError(f"model {model!r} cannot be read on this worker: {exc.strerror}") from None
    try:
        hf_config = load_hf_config(str(path))
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"model folder {model}: config.json cannot be read: {exc}") from None
    architecture(hf_config)  # ValueError: unsupported
    if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        raise ValueError(f"model folder {model} has no weight files (*.safetensors, *.bin)")


def engine_for(ecfg: EngineConfig, model: str, name: str | None) -> EngineConfig:
    """``ecfg`` serving ``model`` instead: settings tied to the old model are dropped.
    ValueError: the result does not check out."""
    return dataclasses.replace(
        ecfg, model=model, served_model_name=name or None, max_model_len=None, lora_modules=[],
        speculative_config=None, eplb_placement=None, classifier_from_tokens=None,
    )  # fmt: skip


def worker_argv(wcfg: WorkerConfig, ecfg: EngineConfig) -> list[str]:
    """argv that starts this worker again with these settings (as cli/commands.py does)."""
    level = logging.getLevelName(logging.getLogger().level)
    return [sys.executable, "-m", "services.worker", *to_argv(wcfg), *to_argv(ecfg),
            "--log-level", str(level)]  # fmt: skip


class ModelReload:
    """A restart main.py runs once the server stopped: the argv and the one to fall back to."""

    def __init__(self) -> None:
        self.argv: list[str] | None = None
        self.fallback: list[str] | None = None

    def exec(self) -> NoReturn:
        assert self.argv is not None and self.fallback is not None
        os.environ[FALLBACK_ENV] = json.dumps(self.fallback)
        os.environ.pop(ERROR_ENV, None)
        log.info("restarting with another model: %s", " ".join(self.argv))
        _exec(self.argv)


def fall_back(exc: BaseException) -> None:
    """A start-up that failed after a model load: restart with the old command line, telling
    it why (returns only when this process was not started by a model load)."""
    raw = os.environ.pop(FALLBACK_ENV, None)
    if raw is None:
        return
    reason = f"{type(exc).__name__}: {exc}"[:1000]
    log.error("the new model failed to start (%s); starting the previous one again", reason)
    os.environ[ERROR_ENV] = reason
    _exec(json.loads(raw))


def started() -> None:
    """Call once serving: a model load that started this process succeeded (no fall-back any
    more), or this fall-back advertised why one failed."""
    os.environ.pop(FALLBACK_ENV, None)
    os.environ.pop(ERROR_ENV, None)
    os.environ.pop(lease_handover.ENV, None)


def _exec(argv: list[str]) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    # NOTE: Mooncake's C++ listeners (its RPC and TCP transport ports, on 0.0.0.0) are opened
    # without O_CLOEXEC and nothing closes them: across execv they stayed open in the new
    # incarnation, listening with nobody accepting, two more ports at every model load.
    # Marked close-on-exec here rather than closed: threads still running may hold them.
    # The old incarnation's multiprocessing resource tracker (started with the tensor-parallel
    # ranks) exits once its pipe closes at the exec, and nothing in the new image reaps it: a
    # zombie child per model load. Stopped and reaped here (a private call, hence guarded).
    stop = getattr(getattr(resource_tracker, "_resource_tracker", None), "_stop", None)
    if stop is not None:
        with contextlib.suppress(Exception):
            stop()
    for fd in map(int, os.listdir("/dev/fd")):  # Linux and macOS
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            if fd > 2:
                os.set_inheritable(fd, False)
    os.execv(argv[0], argv)


class WorkerModelLoad:
    """Checks a new model, drains the worker and schedules the restart."""

    def __init__(self, state: WorkerState, roles: RoleController, model: str) -> None:
        self.state = state
        self.roles = roles
        self.model = model  # the served name it holds
        self.reload = ModelReload()
        # Set by main.py: its settings, and how to end serving (then it runs ``reload``).
        self.configs: tuple[WorkerConfig, EngineConfig] | None = None
        self.stop = lambda: None

    async def load(self, model: str, name: str) -> tuple[str, float]:
        """Drain and schedule the restart; returns (new served name, drain seconds).
        ValueError: a model this worker cannot load; LoadInProgress."""
        if self.configs is None:
            raise ValueError("this worker cannot load another model (started without flags)")
        # The restart's argv would read a leading '-' as a flag (argparse exits), and execv
        # refuses a NUL or an argument past 128 KiB (E2BIG): each ended the drained worker
        # with no fall-back. The name also travels in every registration and /v1/models.
        if len(name) > MAX_NAME_CHARS:
            raise ValueError(f"served_model_name is longer than {MAX_NAME_CHARS} characters")
        if name.startswith("-") or not name.isprintable():
            raise ValueError(f"served_model_name {name!r} must not start with '-' or hold NUL "
                             "or another character that is not printable")  # fmt: skip
        async with self.roles.lock:
            if self.reload.argv is not None:
                raise LoadInProgress(f"worker {self.state.instance_id} is loading a model")
            await asyncio.to_thread(check_model, model)
            wcfg, ecfg = self.configs
            new = engine_for(ecfg, str(Path(model).expanduser().resolve()), name)
            new_name = name or served_name(new.model)
            st = self.state
            wcfg = dataclasses.replace(wcfg, instance_id=st.instance_id, role=st.role)
            log.info("loading model %s (%s): draining", new_name, new.model)
            st.flipping = st.loading = True
            st.on_change()
            started = time.monotonic()
            try:
                await self.roles.drain(f"loaded model {new_name}")
            except BaseException:  # cancelled (the caller went away): serve the old model on
                st.flipping = st.loading = False
                st.on_change()
                raise
            self.reload.argv = worker_argv(wcfg, new)
            self.reload.fallback = worker_argv(wcfg, ecfg)
        self.stop()
        return new_name, time.monotonic() - started


class LoadModelRPCs:
    """``LoadModel`` of the WorkerService (mixed into its servicer)."""

    loader: WorkerModelLoad

    async def LoadModel(  # noqa: N802 - gRPC method name
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadModelResponse:
        async with call_status(context, LOAD):
            name, drained = await self.loader.load(request.model, request.served_model_name)
        return pb.LoadModelResponse(previous_model=self.loader.model, model=name,
                                    drain_seconds=drained)  # fmt: skip
