"""`epdserve up`: a whole local cluster (etcd, workers, router) in one command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import socket
import sys
import threading
import time
from typing import Any

from services.cli import lora_groups
from services.cli.admin_config import config_dir
from services.cli.cluster_spec import ClusterSpec, ModelGroup, served_name_of
from services.cli.launcher import LocalCluster
from services.cli.supervisor import POLL_SLACK_S, RestartPolicy, Supervisor
from services.common.dataclass_cli import add_dataclass_args, from_args, parse_assignments
from services.engine.config import EngineConfig
from services.engine.model_files import check_model
from services.router.config import RouterConfig
from services.router.routing.restarts import MAX_RESTART_WAIT_S, RESTART_WAIT_S

EMBEDDED = "embedded"  # a --models-file entry's model: the embedded default (Helm's spelling)

# The engine's LoRA flags `up` gives every worker; --lora-modules is its own (per model).
LORA_FIELDS = ("enable_lora", "max_loras", "max_lora_rank")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", action="append", default=None,
        help="HF model folder or .gguf file (default: embedded SmolLM2-135M-Instruct); "
        "repeat it to serve several base models on one cluster: each model gets its own "
        "workers, as many of each role as --mixed/--prefill/--decode/--encode say",
    )  # fmt: skip
    p.add_argument(
        "--models-file", default=None, metavar="JSON",
        help="instead of --model: a JSON list of model groups, each with its own workers: "
        '[{"model": PATH, "served_model_name": NAME, "mixed": N, "prefill": N, "decode": N, '
        '"encode": N}, ...] (absent counts: 1 mixed worker, no others; model "embedded": '
        "the default model)",
    )  # fmt: skip
    p.add_argument(
        "--served-model-name", action="append", default=None,
        help="model name clients use; with several --model, one per model in their order",
    )  # fmt: skip
    p.add_argument(
        "--mixed",
        type=int,
        default=None,
        help="co-located (mixed-role) workers per model (default 1, or 0 with --prefill/--decode)",
    )
    p.add_argument(
        "--prefill", type=int, default=0, help="prefill workers per model (PD, with --decode)"
    )
    p.add_argument(
        "--decode", type=int, default=0, help="decode workers per model (PD, with --prefill)"
    )
    p.add_argument(
        "--encode", type=int, default=0,
        help="encoder workers (EPD: a vision-language --model; images are encoded there)",
    )  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="router HTTP port (default 8000)")
    p.add_argument(
        "--routers",
        type=int,
        default=1,
        help="router replicas sharing etcd, on ports --port, --port+1, ... (default 1)",
    )
    p.add_argument("--host", default="127.0.0.1", help="router HTTP address (default 127.0.0.1)")
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N] (default cpu)")
    p.add_argument(
        "--tensor-parallel-size", type=int, default=None, metavar="N",
        help="devices (ranks) of every worker: each worker drives N ranks (default 1)",
    )  # fmt: skip
    p.add_argument(
        "--engine-arg", action="append", default=[], metavar="KEY=VALUE",
        help="an engine setting of every worker (an EngineConfig field: dtype=bfloat16, "
        "kv_cache_bytes=4294967296, load_format=dummy, ...); repeatable",
    )  # fmt: skip
    p.add_argument(
        "--speculative-config", default=None, metavar="JSON",
        help="speculative decoding on every worker, in vLLM's JSON form: "
        '\'{"method": "ngram", "num_speculative_tokens": 4}\', \'{"method": "suffix"}\', '
        '\'{"method": "draft_model", "model": PATH}\' or \'{"method": "eagle3", "model": HEAD}\'',
    )  # fmt: skip
    p.add_argument(
        "--frontend-cores", default="", metavar="CPUS",
        help="CPUs (Linux list: 0 or 0-1) the routers run on; with --engine-arg cpu_cores=... "
        "on other CPUs it keeps the gateway off the model's cores (vLLM's CPU layout; see "
        "docs/performance.md). Default: not pinned",
    )  # fmt: skip
    p.add_argument("--cluster", default="local", help="cluster name in etcd (default local)")
    p.add_argument(
        "--policy",
        default=None,
        help="routing policy (default cache_aware with the kvstore, else least_load)",
    )
    p.add_argument(
        "--rebalance-policy",
        default="static",
        help="role rebalancing policy: static | queue | slo (default static)",
    )
    p.add_argument(
        "--worker-restart-wait-s",
        type=float,
        default=None,
        help="a request whose only worker of a role died or hangs waits this long for `up` to "
        f"restart it and goes on there (0: fail at once; default {RESTART_WAIT_S:g} s plus "
        "the time the liveness probes take to kill a hung worker and the restart backoff: "
        f"{default_restart_wait_s(RestartPolicy()):g} s with the default probes)",
    )
    p.add_argument(
        "--worker-mux",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the routers send their requests to a worker over one shared gRPC stream per "
        "worker instead of a call each (RouterConfig.worker_mux; default: the router's, on); "
        "--no-worker-mux: a call per request",
    )
    p.add_argument(
        "--kvstore",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the kvstore (global KV index + Mooncake Store master); default: on with "
        "more than one worker (--no-kvstore leaves it out)",
    )
    p.add_argument("--verbose", action="store_true", help="show the children's logs")
    # LoRA: the engine's own flags, given to every worker (EngineConfig documents them).
    lora = p.add_argument_group("LoRA adapters")
    lora.add_argument(
        "--lora-modules", nargs="*", default=[], metavar="[MODEL:]NAME=PATH",
        help="LoRA adapters (PEFT folders) the workers of MODEL (its served name) load at "
        "start; a request names NAME as its model. Without MODEL: the only model's (with "
        "several, say which). An adapter whose adapter_config.json names another base model, "
        "or whose shapes do not fit, is refused",
    )  # fmt: skip
    add_dataclass_args(
        lora, EngineConfig, skip=frozenset(EngineConfig.field_names()) - set(LORA_FIELDS)
    )
    # A dead child (worker, router, kvstore, etcd) is restarted with backoff; a crash loop
    # stops the cluster.
    add_dataclass_args(p.add_argument_group("restarts"), RestartPolicy)


def wants_kvstore(args: argparse.Namespace, num_workers: int) -> bool:
    """--kvstore / --no-kvstore, else on when there is more than one worker to route between."""
    return num_workers > 1 if args.kvstore is None else bool(args.kvstore)


def model_groups(args: argparse.Namespace, mixed: int) -> list[ModelGroup]:
    """One group per --model (at least the default model), each with the role counts; or
    the groups of --models-file, each with its own. ValueError for a bad file."""
    if getattr(args, "models_file", None):
        if args.model or args.served_model_name:
            raise ValueError("give --models-file or --model/--served-model-name, not both")
        return with_adapters(groups_from_file(args.models_file), args.lora_modules or [])
    models: list[str | None] = list(args.model or [None])
    names: list[str | None] = list(args.served_model_name or [])
    if len(names) > len(models) or (names and len(names) != len(models)):
        raise ValueError(f"{len(names)} --served-model-name for {len(models)} --model: give "
                         "one per model, or none")  # fmt: skip
    names += [None] * (len(models) - len(names))
    groups = [
        ModelGroup(model, name, mixed, args.prefill, args.decode, args.encode)
        for model, name in zip(models, names, strict=True)
    ]
    return with_adapters(groups, getattr(args, "lora_modules", None) or [])


def with_adapters(groups: list[ModelGroup], entries: list[str]) -> list[ModelGroup]:
    """``groups`` with the --lora-modules ``entries`` given to their models, every group's
    adapters checked against its model (lora_groups.py); ValueError before anything starts."""
    served = [served_name_of(g) for g in groups]
    lora_groups.assign(groups, served, entries)  # type: ignore[arg-type]
    for g, name in zip(groups, served, strict=True):
        lora_groups.check_adapters(g, name)
    return groups


def router_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The routers' settings `up` takes from its own flags (ValueError for a bad one, before
    anything starts)."""
    overrides = {"rebalance_policy": args.rebalance_policy,
                 "worker_restart_wait_s": restart_wait_s(args)}  # fmt: skip
    if getattr(args, "worker_mux", None) is not None:
        overrides["worker_mux"] = args.worker_mux
    RouterConfig(**overrides)  # type: ignore[arg-type]  # checks them
    return overrides


def restart_wait_s(args: argparse.Namespace) -> float:
    """--worker-restart-wait-s, else RESTART_WAIT_S counted from when `up` can see the worker
    is gone: a hung worker (SIGSTOP, a stuck loop) lives until its liveness probes kill it,
    then waits its restart backoff, and only then starts again. The router's wait starts when
    the worker stops answering, so a bare RESTART_WAIT_S left a restart under load (a slow
    start after ~40 s of probes) a few seconds short: 503 no_workers while it came back."""
    if args.worker_restart_wait_s is not None:
        return float(args.worker_restart_wait_s)
    return default_restart_wait_s(from_args(RestartPolicy, args))


def default_restart_wait_s(policy: RestartPolicy) -> float:
    """RESTART_WAIT_S after ``policy``'s probes kill a hung worker and its backoff ends."""
    wait = RESTART_WAIT_S + policy.detection_s + policy.restart_backoff_s
    return min(wait, MAX_RESTART_WAIT_S)


def check_models(groups: list[ModelGroup]) -> None:
    """ValueError for a model that is not there (neither a folder with config.json nor a
    .gguf file): said before any process starts, not by the router once etcd and the
    workers had started."""
    for g in groups:
        if g.model is not None:
            check_model(g.model)


def groups_from_file(path: str) -> list[ModelGroup]:
    """The model groups a --models-file lists (ValueError: unreadable, empty, a bad entry)."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    # RecursionError: JSON nested deeper than the parser's stack (a crash with a traceback).
    except (OSError, ValueError, RecursionError) as exc:
        raise ValueError(f"--models-file {path}: {exc}") from exc
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"--models-file {path}: a non-empty JSON list of model groups")
    fields = {f.name for f in dataclasses.fields(ModelGroup)}
    groups = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - fields:
            raise ValueError(f"--models-file {path}: entry {i} must be an object with "
                             f"\"model\" and only {sorted(fields)}")  # fmt: skip
        if entry["model"] is None or entry["model"] == EMBEDDED:
            # NOTE: null was taken silently for the embedded default; a mistyped or empty
            # value (a template's unset variable) must not serve another model.
            if entry["model"] is None:
                raise ValueError(f"--models-file {path}: entry {i}: \"model\" is null; give an "
                                 f"HF folder, a .gguf file or \"{EMBEDDED}\" (the default "
                                 "model)")  # fmt: skip
            entry = {**entry, "model": None}
        loras = entry.get("lora_modules", [])
        if not isinstance(loras, list) or not all(isinstance(m, str) for m in loras):
            raise ValueError(f"--models-file {path}: entry {i}: lora_modules is a list of "
                             "\"name=path\"")  # fmt: skip
        for module in loras:
            if lora_groups.split_entry(module)[0] is not None:
                raise ValueError(f"--models-file {path}: entry {i}: lora_modules entries are "
                                 f"name=path (the entry is the model), got {module!r}")  # fmt: skip
        try:
            groups.append(ModelGroup(**entry))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--models-file {path}: entry {i}: {exc}") from exc
    return groups


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Every worker's engine settings from the flags; ValueError for a bad one (checked here,
    before anything starts)."""
    overrides = parse_assignments(EngineConfig, args.engine_arg)
    if args.speculative_config is not None:
        overrides["speculative_config"] = args.speculative_config
    if args.tensor_parallel_size is not None:
        overrides["tensor_parallel_size"] = args.tensor_parallel_size
    overrides |= {k: getattr(args, k) for k in LORA_FIELDS if hasattr(args, k)}
    EngineConfig(**overrides)
    return overrides


def ports_in_use(host: str, port: int, routers: int) -> list[int]:
    """The routers' ports (``port``, ``port + 1``, ...) that something else holds: checked
    before anything starts, instead of a router failing after the model loaded (with a
    traceback in `up`'s message). Bound as uvicorn binds (SO_REUSEADDR)."""
    if not port:
        return []  # free ports are picked
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except OSError:
        return []  # a name that does not resolve: the router says so
    busy = []
    for p in range(port, port + routers):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, p))
            except OSError:
                busy.append(p)
    return busy


def run(args: argparse.Namespace) -> int:
    pd = bool(args.prefill or args.decode)
    mixed = (0 if pd else 1) if args.mixed is None else args.mixed
    try:
        groups = model_groups(args, mixed)
        check_models(groups)
        kvstore = wants_kvstore(args, sum(g.mixed + g.prefill + g.decode for g in groups))
        policy = args.policy or ("cache_aware" if kvstore else "least_load")
        overrides = engine_overrides(args)
        restarts = from_args(RestartPolicy, args)
        first, *more = groups
        spec = ClusterSpec(
            model=first.model, served_model_name=first.served_model_name,
            mixed=first.mixed, more_models=more, lora_modules=first.lora_modules,
            prefill=first.prefill, decode=first.decode, encode=first.encode, host=args.host,
            port=args.port,
            routers=args.routers, kvstore=kvstore,
            device=args.device, cluster=args.cluster, policy=policy, echo=args.verbose,
            router_overrides=router_overrides(args),
            engine_overrides=overrides,
            admin_dir=str(config_dir()), frontend_cores=args.frontend_cores,
        )  # fmt: skip
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    busy = ports_in_use(spec.host, spec.port, spec.routers)
    if busy:
        print(f"error: port {busy[0]} on {spec.host} is in use (another `epdserve up`?); "
              "choose others with --port", file=sys.stderr)  # fmt: skip
        return 2

    stop = threading.Event()
    serving = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()
        # While starting, interrupt at once; once serving, the main loop sees ``stop``
        # within 0.5 s (an exception raised at an arbitrary point there could leave a
        # subprocess lock held and hang the clean-up).
        if not serving.is_set():
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster = LocalCluster(spec)

    def say(msg: str) -> None:
        print(f"epdserve: {msg}", file=sys.stderr, flush=True)

    try:
        url = cluster.start(progress=say)
        served = ", ".join(served_name_of(g) for g in spec.groups())
        print(f"epdserve is serving {served} at {url}/v1", flush=True)
        print(f"  OpenAI:    OPENAI_BASE_URL={url}/v1", flush=True)
        print(f"  Anthropic: ANTHROPIC_BASE_URL={url}", flush=True)
        if len(cluster.base_urls) > 1:
            print(f"  Routers:   {' '.join(cluster.base_urls)}", flush=True)
        print("  Operate:   epdserve status | roles set ID ROLE | drain ID | rebalance", flush=True)
        print("  Ctrl-C stops the cluster.", flush=True)
        serving.set()
        # NOTE: a child dying during start-up fails `up` at once (above); once serving, dead
        # children are restarted and the others keep serving (the router migrates streams).
        supervisor = Supervisor(cluster.children(), restarts, say)
        try:
            while not stop.is_set():
                failure = supervisor.poll()
                if failure is not None:
                    say(failure)
                    return 1
                time.sleep(POLL_SLACK_S)
        finally:
            supervisor.close()
        return 0
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError, ValueError, FileNotFoundError) as exc:
        say(f"failed: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip clean-up
        say("stopping ...")
        cluster.stop()
        say("stopped")
